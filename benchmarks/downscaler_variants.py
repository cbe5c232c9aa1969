"""E's designs on the accuracy study's Fashion-MNIST setting, validation only.

Trains the study's "E + S with CL + KD" arm (`accuracy_study.ABLATIONS["es_kd"]`:
no FM pre-training, `joint` stage for the whole budget, the learning rate
`chosen.json` picked for it unless `--learning-rate` is given) once per seed and factor with
`downscaler_variant="strided"` (the earlier E) and `"space_to_depth"` (the
default since issue 11), on the study's teacher, data and recipe. E's width is
sized as the product sizes it (`auto_downscaler_width`, per design). `--designs`
names other designs as `variant:depth` (E's body of `depth` separable convs;
default `strided:2 space_to_depth:2`), `--dataset fashion_mnist_full` uses the
study's all-of-train sizing (6,000 validation images) instead of 500 images
per class. Reports the best-epoch validation top-1 the pipeline recorded; no
test batch is read.

    KERAS_BACKEND=tensorflow python benchmarks/downscaler_variants.py \
        --seeds 0 1 2 --teacher runs/accuracy_study/runs/<teacher run>/teacher.keras \
        --learning-rate 0.001 --out docs/results/downscaler_variants.json

The teacher is the study's: `--teacher` names its file, else it is trained
under `--work-dir` as `benchmarks/accuracy_study.py` trains it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy_study as study  # noqa: E402

DESIGNS = ("strided:2", "space_to_depth:2")


def _design(text: str) -> tuple[str, int]:
    variant, _, depth = text.partition(":")
    if variant not in ("strided", "space_to_depth") or not depth.isdigit():
        raise argparse.ArgumentTypeError(
            f"a design is 'strided:<depth>' or 'space_to_depth:<depth>', "
            f"received {text!r}"
        )
    return variant, int(depth)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--factors", nargs="+", type=int, default=None)
    parser.add_argument("--work-dir", default="runs/accuracy_study")
    parser.add_argument("--teacher", help="A trained teacher .keras (else trained).")
    parser.add_argument(
        "--learning-rate", type=float, help="joint rate (default: chosen.json's)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--dataset", choices=("fashion_mnist", "fashion_mnist_full"),
        default="fashion_mnist",
    )  # fmt: skip
    parser.add_argument("--designs", nargs="+", type=_design, default=None)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    import keras

    from thumbnet_keras import pipeline
    from thumbnet_keras.evaluation.flops import count_flops

    work = Path(args.work_dir)
    designs = args.designs or [_design(d) for d in DESIGNS]
    settings, teacher_over = study.base_settings(args.dataset, args.quick, args.factors)
    teacher = args.teacher or study.get_teacher(
        args.dataset, settings, teacher_over, work, 0
    )
    if args.learning_rate is not None:
        lr = {"joint_learning_rate": args.learning_rate}
    else:  # The rate the study's search chose for this arm, if any.
        chosen = (
            Path(study.__file__).parent.parent / "docs/results/accuracy/chosen.json"
        )
        lr = {}
        if chosen.is_file() and not args.quick:
            lr = (
                json.loads(chosen.read_text()).get("fashion_mnist", {}).get("es_kd", {})
            )
    budget = settings["fm_epochs"] + settings["joint_epochs"]
    rows = []
    for seed in args.seeds:
        for variant, depth in designs:
            design = f"{variant}:{depth}"
            over = settings | study.ABLATIONS["es_kd"] | lr | {
                "fm_epochs": 0, "joint_epochs": budget, "teacher": teacher,
                "seed": seed, "downscaler_variant": variant,
                "downscaler_depth": depth,
            }  # fmt: skip
            tag = variant if depth == 2 else f"{variant}-depth{depth}"
            run_dir, cfg, prepared = study._resolve(
                over, f"e-{args.dataset}-{tag}-seed{seed}", work
            )
            pipeline.get_teacher(run_dir, prepared, verbose=0)
            for factor in cfg["factors"]:
                pipeline.train_stage(run_dir, factor, "joint", verbose=0)
                record = study._record(run_dir, factor, "joint")
                best, epoch = study._selected(record)
                e = keras.saving.load_model(
                    record["paths"]["downscaler"], compile=False
                )
                row = {"variant": variant, "depth": depth, "design": design,
                       "seed": seed, "factor": factor,
                       "val_top1": best, "best_epoch": epoch,
                       "e_macs": count_flops(e), "e_params": e.count_params(),
                       "run_dir": str(run_dir)}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    summary = {}
    for factor in sorted({r["factor"] for r in rows}):
        for variant, depth in designs:
            design = f"{variant}:{depth}"
            vals = [
                r["val_top1"]
                for r in rows
                if (r["factor"], r["design"]) == (factor, design)
            ]
            summary[f"f{factor}/{design}"] = {
                "mean": statistics.mean(vals), "values": vals,
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            }  # fmt: skip
    report = {"dataset": args.dataset, "settings": settings, "learning_rate": lr, "teacher": teacher,
              "seeds": args.seeds, "rows": rows, "summary": summary}  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
