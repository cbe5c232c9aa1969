"""The other side of "equal cost": bicubic + S (CL + KD) at the LARGEST
thumbnail that costs no more than E + S (issue 8, the study's f = 4 cell).

The pipeline's equal-cost arm (`bicubic_kd_equal`) takes the smallest side
whose bicubic + S costs at least E + S's MACs. On Fashion-MNIST at f = 4 that
is 9x9 at 2.3x E + S's cost (the tiny CNN's maps at 7x7 and 8x8 have the same
sizes, at 9x9 they grow), so "E + S is level with the equal-cost arm" there
compares it with a model more than twice as dear. This trains the arm at the
largest side at or under E + S's cost instead (8x8, 0.90x), in a copy of each
finished study run (same teacher, settings, stage seed and data order as the
run's own arms), evaluates every arm of the copy with the pipeline's
evaluator (`evaluate_run`: test once, paired differences on the same test
images) and prints one JSON object: per seed the new arm, ThumbNet and the
run's own arms, and ThumbNet minus the new arm.

    KERAS_BACKEND=tensorflow python benchmarks/equal_cost_under.py --factor 4 \
        --runs runs/accuracy_study/runs/fashion_mnist_long-final-seed{0,1,2}-main-* \
        --work-dir /tmp/ecu --out docs/results/accuracy/equal_cost_under_f4.json

The copies live under `--work-dir` (kept, so a re-run only evaluates); the
study's run folders are only read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path


def largest_side_under(teacher, factor: int, target_macs: int, value_range) -> dict:
    """The largest side `s >= H/f` whose bicubic + S costs <= `target_macs`
    (H/f itself when H/f + 1 already costs more)."""
    from thumbnet_keras.pipeline.equal_cost import bicubic_student_macs

    side = int(teacher.inputs[0].shape[1]) // factor
    macs = bicubic_student_macs(teacher, side, value_range)
    while True:
        nxt = bicubic_student_macs(teacher, side + 1, value_range)
        if nxt > target_macs:
            break
        side, macs = side + 1, nxt
    return {"size": side, "macs": int(macs), "target_macs": int(target_macs),
            "rule": "largest side at or under E + S's MACs"}  # fmt: skip


def _copy_run(src: Path, dst: Path, factor: int) -> None:
    """The run folder without its equal-cost arm, its evaluation and lock
    (a copy already there is kept: its finished stages are not trained again)."""
    if dst.exists():
        return
    equal = f"f{factor}-bicubic_kd_equal"
    shutil.copytree(
        src,
        dst,
        ignore=lambda d, names: [
            n
            for n in names
            if n in (equal, f"{equal}.json", "evaluation.json", "metrics.json", ".lock")
            or n.startswith("report")
        ],
    )
    config = json.loads((dst / "config.json").read_text())
    config["config"]["run_name"] = dst.name
    config["config"]["runs_dir"] = str(dst.parent)
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def _arms(evaluation: dict, factor: int) -> dict:
    return {
        a["name"]: {k: a.get(k) for k in ("input_size", "top1", "val_top1", "flops")}
        for a in evaluation["arms"]
        if a["factor"] in (None, factor)
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="Finished runs.")
    parser.add_argument("--factor", type=int, required=True)
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--out", help="Also write the JSON here.")
    args = parser.parse_args(argv)

    import keras

    from thumbnet_keras.pipeline import stages
    from thumbnet_keras.pipeline.evaluate import evaluate_run

    original = stages._equal_cost

    def under(run, config, prepared, factor, teacher):
        at_least = original(run, config, prepared, factor, teacher)
        result = largest_side_under(
            teacher, factor, at_least["target_macs"], stages._value_range(prepared)
        )
        return result | {"reached": True, "at_least": at_least}

    stages._equal_cost = under
    seeds = []
    for src in map(Path, args.runs):
        started = time.time()
        dst = Path(args.work_dir) / f"{src.name}-under"
        _copy_run(src, dst, args.factor)
        record = stages.train_stage(str(dst), args.factor, "bicubic_kd_equal", 0)
        evaluation = evaluate_run(str(dst), force=True)
        own = json.loads((src / "evaluation.json").read_text())
        thumbnet = next(
            a for a in evaluation["arms"]
            if a["name"] == "thumbnet" and a["factor"] == args.factor
        )  # fmt: skip
        versus = next(
            p for p in thumbnet["paired"] if p["versus"] == "bicubic_kd_equal"
        )
        seeds.append({
            "run": str(src),
            "seed": json.loads((src / "config.json").read_text())["config"]["seed"],
            "under": record["equal_cost"],
            "kept_epoch": record["selection"],
            "arms_in_copy": _arms(evaluation, args.factor),
            "run_own_arms": _arms(own, args.factor),
            "thumbnet_minus_under": versus,
            "seconds": round(time.time() - started, 1),
        })  # fmt: skip
        print(json.dumps(seeds[-1]), flush=True)
    diffs = [s["thumbnet_minus_under"]["difference"] for s in seeds]
    out = {
        "what": __doc__.split("\n\n")[0],
        "factor": args.factor,
        "seeds": seeds,
        "thumbnet_minus_under_mean": sum(diffs) / len(diffs),
        "environment": {
            "backend": keras.backend.backend(), "keras": keras.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "command": " ".join(sys.argv),
        },
    }  # fmt: skip
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
