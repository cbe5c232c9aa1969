"""Accuracy study (issue 8): ThumbNet against every bicubic baseline, with a
loss ablation, as a thin driver over `thumbnet_keras.pipeline`.

Each dataset's settings are overrides of `pipeline.ThumbNetParams` (`STUDY`).
Per dataset and seed, on the same data, recipe and epoch budget
(`fm_epochs + joint_epochs` for every trained arm):

* the main run, the steps `pipeline.run_thumbnet` runs (prepare,
  get_teacher, train_stage for every stage and factor, evaluate_run): arms
  teacher, teacher_bicubic, teacher_bicubic_bn, bicubic_cl, bicubic_kd,
  bicubic_kd_equal and thumbnet;
* one run per ablation (`ABLATIONS`: es_kd = CL + KD, es_kd_mm = + MM,
  es_kd_fm = + FM, es_full = all four losses without the FM pre-train epoch),
  on the main run's teacher, `joint` stage only, with
  `fm_epochs=0` and `joint_epochs` = the whole budget.

The teacher is trained once per dataset (a run with only `get_teacher`,
seed 0) and passed to every run as `teacher=`: ThumbNet distils a given frozen
teacher, and so the seeds vary what the arms learn, not what they learn from.
ELPV uses the shipped teacher (`thumbnet_keras/pretrained/elpv_teacher.keras`)
when present.

Protocol (selection on validation only):

    # 1. search seed 100 (never in the reported means): validation top-1 only
    python benchmarks/accuracy_study.py --search
    # 2. final runs, seeds 0 1 2, with chosen.json; test evaluated once per arm
    python benchmarks/accuracy_study.py
    # 3. tables + plot from the JSON
    python benchmarks/accuracy_study.py --summarize --markdown tables.md

`--search` trains every arm family (the bicubic baselines, ThumbNet, each
ablation) with the same grid of peak learning rates (`SEARCH_GRID`), reads
the validation top-1 the pipeline's best-epoch selection recorded for each
stage (no test batch is read), and writes the best value per family to
`docs/results/accuracy/chosen.json` (`accuracy_report.choose`).

Sizing (measured with TensorFlow on this 2-core CPU at a load of 4-5, i.e.
shared): the Fashion-MNIST teacher, tiny_cnn [32, 64, 128, 256] (a GAP head,
so that S takes the equal-cost baseline's odd thumbnail sizes; 3 stages, RF
9 px, under-fit in the previous study), trains at ~2 ms an image: ~110 s an
epoch on all 54,000 train images, ~18 min for its 10 epochs (86% validation
after 5 epochs on 9,000 images; >= 90% test expected on 54,000, checked in the
teacher arm). Ten arm-trainings of 6 epochs per seed and factor on all 54,000
images would take hours, so the arms use `limit_per_class=500` (4,500 train,
500 validation, 5,000 test; ~2-6 s an epoch per arm): ~8 min a final seed,
~7 min a search variant (no evaluation). Fashion-MNIST total ~55 min (teacher
18, search 2 x 7, final 3 x 8). ELPV with the shipped teacher (128 px), the
main run and `--ablations es_kd` only, search with `--factors 2`: ~14 min per
searched learning rate, 22-27 min per final seed (f = 2 and 4), 1 h 45 min in
all (measured 2026-11-28 with test suites running beside it).

Run with KERAS_BACKEND=tensorflow for speed on a CPU (any backend works).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_report import ARM_LABELS, choose, write_summary  # noqa: E402

SCHEMA_VERSION = 2
SEARCH_SEEDS = (100,)
FINAL_SEEDS = (0, 1, 2)
TEACHER_SEED = 0
# Stages of the main run trained with labels (selected on validation) -> arm.
TRAINED = {"joint": "thumbnet", "bicubic_cl": "bicubic_cl", "bicubic_kd": "bicubic_kd",
           "bicubic_kd_equal": "bicubic_kd_equal"}  # fmt: skip
# The study's main run is the paper's recipe (the product's defaults, FM and
# MM off, were set from this study's validation results): the defaults the
# study's runs were made with, pinned here outside the run-name hash, so the
# runs made before the defaults changed still resume (each run's own settings
# override them).
PAPER_WEIGHTS = {"fm_weight": 1.0, "mm_weight": 1.0, "fm_epochs": 2, "joint_epochs": 8,
                 "e_pretrain_epochs": 0}  # fmt: skip
# (e_pretrain came after the study: its runs, and the ablations, have none.)
SEARCH_GRID = (1e-3, 3e-3)  # peak learning rates, the same for every family
ABLATIONS = {  # loss weights of the E + S ablation runs (cl, kd stay as set)
    "es_kd": {"fm_weight": 0.0, "mm_weight": 0.0},
    "es_kd_mm": {"fm_weight": 0.0},
    "es_kd_fm": {"mm_weight": 0.0},
    # All four losses without the FM pre-train epoch: what the FM epoch costs.
    "es_full": {},
    # The default recipe since e_pretrain became a stage (2026-11-29): CL + KD
    # after 2 epochs of e_pretrain at the run's learning rate (E alone through
    # the frozen teacher); its epochs train E only, on top of S's budget.
    "es_kd_pre": {"fm_weight": 0.0, "mm_weight": 0.0, "e_pretrain_epochs": 2},
}
# ThumbNetParams overrides per dataset (the arms' runs); TEACHER: the teacher
# run's own (only when the dataset's teacher is trained here).
STUDY = {
    "fashion_mnist": dict(dataset="fashion_mnist", image_size=28, factors=[2, 4],
                          backbone="tiny_cnn", backbone_options={"widths": [32, 64, 128, 256]},
                          limit_per_class=500, fm_epochs=1, joint_epochs=5, batch_size=64),
    # The arms on all 54,000 train images (f=2 only): does the gap to the teacher
    # close when the students see the teacher's data? Learning rates: chosen on
    # fashion_mnist's validation search (CHOSEN_FROM), no search of its own.
    "fashion_mnist_full": dict(dataset="fashion_mnist", image_size=28, factors=[2],
                               backbone="tiny_cnn", backbone_options={"widths": [32, 64, 128, 256]},
                               limit_per_class=None, fm_epochs=1, joint_epochs=5, batch_size=64),
    "elpv": dict(dataset="elpv", image_size=64, factors=[2, 4], backbone="tiny_cnn",
                 backbone_options={"widths": [16, 32, 64, 96]}, fm_epochs=1, joint_epochs=5,
                 batch_size=32),
}  # fmt: skip
TEACHER = {
    "fashion_mnist": dict(limit_per_class=None, teacher_epochs=10, batch_size=128,
                          teacher_learning_rate=3e-3),
    "fashion_mnist_full": dict(limit_per_class=None, teacher_epochs=10, batch_size=128,
                               teacher_learning_rate=3e-3),
    "elpv": dict(teacher_epochs=30),
}  # fmt: skip
# The default recipe (E + S with CL + KD) and the baselines trained twice as
# long (12 epochs): fashion_mnist_full's arms kept their 5th or 6th of 6
# epochs, i.e. were still improving. The main run's joint stage is the
# default recipe here (FM and MM off, no FM pre-train), so its arm is recorded
# as es_kd (`DEFAULT_RECIPE`) and no ablation run is needed.
STUDY["fashion_mnist_long"] = STUDY["fashion_mnist_full"] | dict(
    fm_epochs=0, joint_epochs=12, fm_weight=0.0, mm_weight=0.0
)
TEACHER["fashion_mnist_long"] = TEACHER["fashion_mnist_full"]
CHOSEN_FROM = {
    "fashion_mnist_full": "fashion_mnist",
    "fashion_mnist_long": "fashion_mnist",
}  # study -> whose chosen.json entry
# study -> whose teacher run it shares (same settings, so the same run name).
TEACHER_FROM = {"fashion_mnist_long": "fashion_mnist_full"}
# Studies whose main run trains the default recipe: its `thumbnet` arm is es_kd.
DEFAULT_RECIPE = {"fashion_mnist_long"}
TEACHER_FIELDS = ("dataset", "image_size", "channels", "backbone", "backbone_options",
                  "limit_per_class", "batch_size", "optimizer", "weight_decay",
                  "warmup_epochs", "label_smoothing", "learning_rate")  # fmt: skip
# --quick: the whole protocol in a few minutes (tests/test_accuracy_study.py).
QUICK = dict(factors=[4], limit_per_class=20, teacher_epochs=1, fm_epochs=1, joint_epochs=1,
             batch_size=16, backbone_options={"widths": [8, 16]}, downscaler_width=8,
             bn_batches=2, throughput_batches=1)  # fmt: skip


def _log(message: str) -> None:
    print(message, flush=True)


def base_settings(dataset: str, quick: bool, factors=None) -> tuple[dict, dict]:
    """(the arms' ThumbNetParams overrides, the teacher run's extra ones)."""
    settings, teacher = dict(STUDY[dataset]), dict(TEACHER[dataset])
    if dataset == "elpv" and not quick:
        from thumbnet_keras import pretrained

        try:
            settings["teacher"] = pretrained.elpv_teacher_path()
            settings["image_size"] = pretrained.elpv_teacher_info()["input_shape"][0]
        except (AttributeError, FileNotFoundError) as err:
            _log(f"[elpv] no shipped teacher ({err}); training a tiny_cnn instead")
    if quick:
        # A default-recipe study has no FM pre-train stage (it would learn nothing).
        kept = {"fm_epochs": 0} if dataset in DEFAULT_RECIPE else {}
        settings |= QUICK | kept
        teacher = {"limit_per_class": QUICK["limit_per_class"]}
    if factors:
        settings["factors"] = list(factors)
    return settings, teacher


def run_name(settings: dict, name: str) -> str:
    """`<name>-<hash of settings>`. The hash covers the teacher file's
    content, not only its path: after a new teacher ships at the same path,
    the arms are trained again instead of the runs made against the old one
    being reused."""
    from thumbnet_keras.data.index import file_sha256

    identity = dict(settings)
    teacher = settings.get("teacher")
    if teacher and os.path.isfile(teacher):
        identity["teacher_sha256"] = file_sha256(teacher)
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:8]}"


def _resolve(settings: dict, name: str, work: Path) -> tuple[str, dict, dict]:
    """Claims `<work>/runs/<run_name(settings, name)>` and prepares its data."""
    from thumbnet_keras import pipeline

    params = pipeline.ThumbNetParams(
        **(PAPER_WEIGHTS | settings),
        run_name=run_name(settings, name),
        runs_dir=str(work / "runs"),
        data_dir=str(work / "data"),
    )
    run = pipeline.resolve_run(params)
    cfg = run["config"]
    prepared = pipeline.prepare_dataset(
        cfg["dataset"], cfg["data_dir"], cfg["limit_per_class"]
    )
    return run["run_dir"], cfg, prepared


def get_teacher(
    dataset: str, settings: dict, teacher: dict, work: Path, verbose
) -> str:
    """The dataset's teacher file: the given one, or trained once (stage 0)."""
    from thumbnet_keras import pipeline

    if settings.get("teacher"):
        return settings["teacher"]
    # Only what the teacher depends on, so that changing the arms' settings keeps it.
    own = {k: v for k, v in settings.items() if k in TEACHER_FIELDS}
    run_dir, _, prepared = _resolve(
        own | teacher | {"seed": TEACHER_SEED, "factors": [2]},
        f"{TEACHER_FROM.get(dataset, dataset)}-teacher",
        work,
    )
    return pipeline.get_teacher(run_dir, prepared, verbose=verbose)["path"]


def _record(run_dir: str, factor: int, stage: str) -> dict:
    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.rundir import read_json
    from thumbnet_keras.pipeline.stages import stage_id

    return read_json(Run(run_dir).stage_record(stage_id(factor, stage)))


def train_arms(
    settings: dict, name: str, work: Path, verbose, ablations=ABLATIONS
) -> dict:
    """Trains the main run and the ablation runs; returns `{family: run_dir}`."""
    from thumbnet_keras import pipeline

    runs = {}
    run_dir, cfg, prepared = _resolve(settings["main"], f"{name}-main", work)
    pipeline.get_teacher(run_dir, prepared, verbose=verbose)
    for factor in cfg["factors"]:
        for stage in pipeline.STAGES:
            pipeline.train_stage(run_dir, factor, stage, verbose=verbose)
    runs["main"] = run_dir
    budget = cfg["fm_epochs"] + cfg["joint_epochs"]
    for arm in ablations:
        over = settings[arm] | ABLATIONS[arm] | {"fm_epochs": 0, "joint_epochs": budget}
        run_dir, cfg, prepared = _resolve(over, f"{name}-{arm}", work)
        pipeline.get_teacher(run_dir, prepared, verbose=verbose)
        stages = ("e_pretrain", "joint") if cfg["e_pretrain_epochs"] else ("joint",)
        for factor in cfg["factors"]:
            for stage in stages:
                pipeline.train_stage(run_dir, factor, stage, verbose=verbose)
        runs[arm] = run_dir
    return runs


def _selected(record: dict) -> tuple[float, int]:
    selection = record.get("selection") or {}
    if selection.get("monitor") != "val_accuracy":
        raise RuntimeError(
            f"Stage {record['id']} was not selected on validation ({selection}): "
            "the pipeline must record the best validation epoch."
        )
    return selection["best_value"], selection["best_epoch"]


def search(
    dataset: str,
    seed: int,
    work: Path,
    quick: bool,
    verbose,
    factors=None,
    ablations=tuple(ABLATIONS),
) -> dict:
    """One search seed: every grid value, validation top-1 of every trained arm."""
    from thumbnet_keras import pipeline

    settings, teacher_over = base_settings(dataset, quick, factors)
    teacher = get_teacher(dataset, settings, teacher_over, work, verbose)
    grid = SEARCH_GRID[:1] if quick else SEARCH_GRID
    variants = []
    for lr in grid:
        common = settings | {"teacher": teacher, "seed": seed}
        per_run = {"main": common | {f: lr for f in
                                     ("fm_learning_rate", "joint_learning_rate",
                                      "baseline_learning_rate")}}  # fmt: skip
        per_run |= {arm: common | {"joint_learning_rate": lr} for arm in ablations}
        runs = train_arms(
            per_run, f"{dataset}-search-seed{seed}-lr{lr:g}", work, verbose, ablations
        )
        arms = []
        for factor in settings["factors"]:
            named = [
                (TRAINED.get(s, s), runs["main"], s)
                for s in TRAINED
                if s in pipeline.STAGES
            ]
            named += [(arm, runs[arm], "joint") for arm in ablations]
            for arm, run_dir, stage in named:
                record = _record(run_dir, factor, stage)
                if (
                    "unavailable" in record
                ):  # bicubic_kd_equal when T's head is fixed-size
                    continue
                val, epoch = _selected(record)
                arms.append(
                    {"arm": arm, "factor": factor, "val_top1": val, "best_epoch": epoch}
                )
        variants.append({"value": lr, "runs": runs, "arms": arms})
    return {"kind": "search", "schema_version": SCHEMA_VERSION, "dataset": dataset,
            "seed": seed, "settings": settings, "teacher": teacher,
            "varied": "peak learning rate of every trained arm family",
            "variants": variants, "environment": _environment()}  # fmt: skip


def _ablation_arm(run_dir: str, factor: int) -> dict:
    """Validation and test top-1 of an ablation run's E + S (pipeline evaluators)."""
    import keras

    from thumbnet_keras.pipeline import Run
    from thumbnet_keras.pipeline.datasets import split_batches
    from thumbnet_keras.pipeline.evaluate import compose, evaluate_model
    from thumbnet_keras.pipeline.stages import load_run, stage_id

    run, config = load_run(run_dir)
    prepared = Run(run_dir).data()
    folder = run.stage_dir(stage_id(factor, "joint"))
    load = lambda p: keras.saving.load_model(str(folder / p), compile=False)  # noqa: E731
    model = compose(load("downscaler.keras"), load("student.keras"), "thumbnet")
    batches = {
        split: split_batches(
            prepared, split, config.image_size, config.channels, config.batch_size
        )
        for split in ("validation", "test")
    }
    return evaluate_model(model, batches["test"], prepared["num_classes"], config.batch_size,
                          config.throughput_batches, validation=batches["validation"])  # fmt: skip


def _chosen(chosen: dict, run: str) -> dict:
    """The searched settings of one run. An ablation added after the search
    (not in `chosen`) takes the ThumbNet family's joint learning rate, the
    one searched for the same losses."""
    if run in chosen or run == "main":
        return chosen.get(run, {})
    main = chosen.get("main", {})
    return {k: main[k] for k in ("joint_learning_rate",) if k in main}


def final(
    dataset: str,
    seed: int,
    chosen: dict,
    work: Path,
    quick: bool,
    verbose,
    factors=None,
    ablations=tuple(ABLATIONS),
) -> dict:
    """One final seed: train with the chosen settings, test every arm once."""
    from thumbnet_keras import pipeline

    settings, teacher_over = base_settings(dataset, quick, factors)
    teacher = get_teacher(dataset, settings, teacher_over, work, verbose)
    common = settings | {"teacher": teacher, "seed": seed}
    per_run = {run: common | _chosen(chosen, run) for run in ("main", *ablations)}
    runs = train_arms(per_run, f"{dataset}-final-seed{seed}", work, verbose, ablations)
    evaluation = pipeline.evaluate_run(runs["main"])["arms"]
    main_arm = {"thumbnet": "es_kd"} if dataset in DEFAULT_RECIPE else {}
    evaluated = [
        (main_arm.get(a["name"], a["name"]), a["factor"], a, runs["main"])
        for a in evaluation
    ]
    for arm in ablations:
        for factor in settings["factors"]:
            evaluated.append((arm, factor, _ablation_arm(runs[arm], factor), runs[arm]))
    arms = []
    for arm, factor, scores, run_dir in evaluated:
        row = {"arm": arm, "label": ARM_LABELS.get(arm, arm), "factor": factor,
               "input_size": scores.get("input_size") or settings["image_size"] // factor,
               "val_top1": scores["val_top1"], "test_top1": scores["top1"],
               "flops": int(scores["flops"]), "params": int(scores["params"])}  # fmt: skip
        stages = {"thumbnet": ["fm_pretrain", "joint"]}.get(
            arm, ["joint" if arm in ABLATIONS else arm]
        )
        if factor and all(s in pipeline.STAGES for s in stages):
            records = [_record(run_dir, factor, s) for s in stages]
            row["epochs"] = sum(r.get("epochs", 0) for r in records)
            row["best_epoch"] = records[-1].get("selection", {}).get("best_epoch")
            row["train_seconds"] = round(sum(r.get("seconds", 0.0) for r in records), 1)
        arms.append(row)
        _log(f"== {dataset} seed {seed} f={factor} {arm}: val {row['val_top1']:.4f} "
             f"test {row['test_top1']:.4f}")  # fmt: skip
    return {"kind": "final", "schema_version": SCHEMA_VERSION, "dataset": dataset,
            "seed": seed, "settings": settings, "teacher": teacher, "chosen": chosen,
            "runs": runs, "arms": arms, "environment": _environment()}  # fmt: skip


def _environment() -> dict:
    import keras

    return {"backend": keras.backend.backend(), "keras": keras.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "host_load_1min": round(os.getloadavg()[0], 2), "command": " ".join(sys.argv)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="Tiny data, about a minute."
    )
    parser.add_argument("--search", action="store_true", help="Write chosen.json.")
    parser.add_argument("--summarize", action="store_true", help="Only tables + plot.")
    parser.add_argument("--datasets", nargs="+", choices=sorted(STUDY))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--factors", nargs="+", type=int, help="Instead of STUDY's.")
    parser.add_argument("--work-dir")
    parser.add_argument("--results-dir")
    parser.add_argument("--markdown", help="Write the tables here.")
    parser.add_argument(
        "--ablations",
        nargs="*",
        choices=sorted(ABLATIONS),
        default=sorted(ABLATIONS),
        help="Ablation runs of a final seed (default: all; none with no value).",
    )
    parser.add_argument("--verbose", type=int, default=2)
    args = parser.parse_args(argv)
    work = Path(args.work_dir or f"runs/accuracy_study{'_quick' if args.quick else ''}")
    results = Path(
        args.results_dir
        or (work / "results" if args.quick else "docs/results/accuracy")
    )
    results.mkdir(parents=True, exist_ok=True)
    datasets = args.datasets or (
        ["fashion_mnist"] if args.quick else ["elpv", "fashion_mnist"]
    )
    chosen_path = results / "chosen.json"
    chosen = json.loads(chosen_path.read_text()) if chosen_path.is_file() else {}
    for dataset in [] if args.summarize else datasets:
        if args.search:
            records = []
            for seed in args.seeds or SEARCH_SEEDS:
                if seed in FINAL_SEEDS:
                    parser.error(f"search seed {seed} is a final seed")
                records.append(
                    search(
                        dataset,
                        seed,
                        work,
                        args.quick,
                        args.verbose,
                        args.factors,
                        tuple(args.ablations),
                    )
                )
                path = results / f"search-{dataset}-seed{seed}.json"
                path.write_text(json.dumps(records[-1], indent=1) + "\n")
            chosen[dataset] = choose(records)
            chosen_path.write_text(json.dumps(chosen, indent=1, sort_keys=True) + "\n")
            continue
        if dataset not in chosen and CHOSEN_FROM.get(dataset) in chosen:
            chosen[dataset] = chosen[CHOSEN_FROM[dataset]] | {
                "from": CHOSEN_FROM[dataset]
            }
        if dataset not in chosen:
            parser.error(
                f"no chosen settings for {dataset} in {chosen_path}: run --search first"
            )
        for seed in args.seeds or FINAL_SEEDS:
            record = final(
                dataset,
                seed,
                chosen[dataset],
                work,
                args.quick,
                args.verbose,
                args.factors,
                tuple(args.ablations),
            )
            # One file per (dataset, factors, seed): a --factors run adds to,
            # rather than replaces, the study's records of other factors.
            tag = "".join(f"-f{f}" for f in args.factors or ())
            (results / f"{dataset}{tag}-seed{seed}.json").write_text(
                json.dumps(record, indent=1) + "\n"
            )
    if not args.search:
        _log(write_summary(results, args.markdown)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
