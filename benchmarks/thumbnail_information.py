"""Where does a thumbnail's accuracy go: its pixels, or the network at that size?

The shipped ELPV teacher (128x128), untouched, on images downscaled to 128/f
by the bicubic downscaler and scaled back up to 128 by bicubic resizing: the
thumbnail's information, seen by the network at its own feature-map sizes.
Against the teacher on the thumbnail itself (S before training, the
`teacher_bicubic` arm), the difference is what the small input costs the
architecture; against the teacher at 128, what the lost pixels cost.

    KERAS_BACKEND=tensorflow python benchmarks/thumbnail_information.py RUN_DIR

RUN_DIR: any run folder on the `elpv` manifest (e.g. runs/elpv-demo), for its
prepared splits. Prints JSON (top-1 per factor and split);
2026-11-29: `docs/results/thumbnail_information.json`.
"""

import json
import sys

import keras
import numpy as np
from keras import ops

from thumbnet_keras import pretrained
from thumbnet_keras.layers.downscaler import bicubic_downscaler
from thumbnet_keras.pipeline import Run
from thumbnet_keras.pipeline.datasets import split_batches


def main():
    run_dir = sys.argv[1]
    prepared = Run(run_dir).data()
    teacher = keras.saving.load_model(pretrained.elpv_teacher_path(), compile=False)
    out = {}
    for f in (1, 2, 4):
        down = (
            bicubic_downscaler((128, 128, 1), f, value_range=(0.0, 1.0))
            if f > 1
            else None
        )
        for split in ("validation", "test"):
            correct = n = 0
            for x, y in split_batches(prepared, split, 128, 1, 64):
                if down is not None:
                    t = down(x)
                    x = ops.clip(
                        ops.image.resize(t, (128, 128), interpolation="bicubic"),
                        0.0,
                        1.0,
                    )
                pred = np.argmax(np.asarray(teacher(x, training=False)), -1)
                correct += int(np.sum(pred == np.asarray(y).reshape(-1)))
                n += len(pred)
            out[f"f{f}_{split}"] = round(correct / n, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    from _report import script_args

    script_args(__doc__, ("RUN_DIR",))
    main()
