"""Exports of a trained run, checked on the run's own test split (issue 11).

`tests/test_deploy.py` checks the exporters on a synthetic problem that every
model gets right; this measures them on real data. For each model of a run
(default: every factor's `f<f>/thumbnet.keras`), it exports ONNX, LiteRT
float32 and LiteRT int8 (calibrated on the run's train images, as
`thumbnet export` does) into `--work-dir`, runs each file in its own runtime
on the whole test split (raw pixels; the models normalize inside) and prints,
per model and format: test top-1, top-1 agreement with the Keras model, max
and mean absolute logit difference. The run folder is only read.

    KERAS_BACKEND=tensorflow python benchmarks/export_agreement.py \\
        --run runs/elpv-demo --work-dir /tmp/agreement \\
        --out docs/results/export_agreement_elpv.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FORMATS = ("onnx", "litert", "litert_int8")


def test_split(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """The run's test split as raw-pixel float32 images and labels."""
    from thumbnet_keras import data
    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.stages import load_run

    _, config = load_run(run_dir)
    prepared = Run(run_dir).data()
    stream = data.make_dataset(
        prepared["prepared_dir"], "test", config.image_size, 64, False,
        channels=config.channels, normalization="raw",
    )  # fmt: skip
    xs, ys = zip(*((np.asarray(x), np.asarray(y)) for x, y in stream), strict=True)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def measure(run_dir: str, model: str, work: Path, x: np.ndarray, y: np.ndarray) -> dict:
    """Exports `<run_dir>/<model>` in every format; scores on `(x, y)`, the
    run's test split (`test_split`)."""
    from thumbnet_keras import deploy
    from thumbnet_keras.pipeline.export import FORMAT_SUFFIX, export_model

    source = str(Path(run_dir) / model)
    logits = {"keras": deploy.load_runner(source)(x)}
    out = work / model.replace("/", "_").removesuffix(".keras")
    out.mkdir(parents=True, exist_ok=True)
    for fmt in FORMATS:
        path = export_model(
            source, fmt, str(out / f"model{FORMAT_SUFFIX[fmt]}"), run_dir
        )
        logits[fmt] = deploy.load_runner(path)(x)
    keras_top1 = logits["keras"].argmax(1)
    rows = {}
    for fmt, value in logits.items():
        diff = np.abs(value - logits["keras"])
        rows[fmt] = {
            "test_top1": float((value.argmax(1) == y).mean()),
            "agreement_with_keras": float((value.argmax(1) == keras_top1).mean()),
            "max_abs_logit_diff": float(diff.max()),
            "mean_abs_logit_diff": float(diff.mean()),
        }
    return {"model": model, "test_images": int(len(y)), "formats": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="A finished run folder.")
    parser.add_argument(
        "--models", nargs="+",
        help="Model files relative to the run (default: f<f>/thumbnet.keras per factor).",
    )  # fmt: skip
    parser.add_argument("--work-dir", required=True, help="Where the exports go.")
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args(argv)

    import keras

    from thumbnet_keras.pipeline.stages import load_run

    _, config = load_run(args.run)
    models = args.models or [f"f{f}/thumbnet.keras" for f in config.factors]
    x, y = test_split(args.run)  # read once, shared by every model
    result = {
        "run": str(Path(args.run).resolve()),
        "dataset": config.dataset,
        "backend": keras.backend.backend(),
        "command": " ".join(sys.argv),
        "models": [measure(args.run, m, Path(args.work_dir), x, y) for m in models],
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
