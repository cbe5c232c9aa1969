"""A trained classifier's top-1 when it is fed larger images than it was
trained on, with no fine-tuning (the question FixRes asks: does the test side
alone gain anything?). Issue 8: the ELPV teacher's road to 80%.

    KERAS_BACKEND=tensorflow python benchmarks/teacher_resolution.py \
        --model thumbnet_keras/pretrained/elpv_teacher.keras --sizes 128 144 160

The model is rebuilt from its config at each side (it must be convolutional
up to a global pooling, as MobileNetV2 is) with the same weights, and
evaluated on the prepared ELPV validation and test splits, resized by
`make_dataset` like every evaluation in the pipeline (gray, [0, 1]).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _report import emit  # noqa: E402


def at_side(model, side: int):
    """`model` rebuilt for (side, side, C) inputs, with its weights (the
    config rewrite `make_student` uses, which only shrinks)."""
    from thumbnet_keras.models.student import _rewrite_shapes, image_input_shape

    height, width, _ = image_input_shape(model)
    config = _rewrite_shapes(model.get_config(), (height, width), (side, side))
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def top1(model, prepared_dir: str, split: str, side: int, channels: int) -> float:
    from thumbnet_keras import data

    stream = data.make_dataset(
        prepared_dir, split, side, 32, False, channels=channels, normalization="unit"
    )
    correct = total = 0
    for images, labels in stream.as_numpy_iterator():
        predicted = np.asarray(model(images, training=False)).argmax(-1)
        correct += int((predicted == labels).sum())
        total += len(labels)
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A .keras classifier.")
    parser.add_argument("--sizes", type=int, nargs="+", required=True)
    parser.add_argument("--dataset", default="elpv")
    parser.add_argument("--data-dir", default="runs/_data")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args()

    import keras

    from thumbnet_keras.pipeline.datasets import prepare_dataset

    prepared = prepare_dataset(args.dataset, args.data_dir)
    model = keras.saving.load_model(args.model, compile=False)
    channels = int(model.inputs[0].shape[-1])
    rows = []
    for side in args.sizes:
        rebuilt = at_side(model, side)
        rows.append(
            {
                "side": side,
                "val_top1": top1(
                    rebuilt, prepared["prepared_dir"], "validation", side, channels
                ),
                "test_top1": top1(
                    rebuilt, prepared["prepared_dir"], "test", side, channels
                ),
            }
        )
    emit(
        {
            "model": args.model,
            "trained_side": int(model.inputs[0].shape[1]),
            "dataset": args.dataset,
            "rows": rows,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
