"""The `generalize` run: is a trained downscaler E a generic one?

ThumbNet claims E transfers: frozen, it should serve (a) another dataset and
(b) another backbone. For each experiment `(dataset, backbone)` and each seed,
a fresh S of `backbone` at thumbnail size (random init, the same seed for
both arms; the source's own backbone keeps its `backbone_options`) is
trained with CL on

* `learned`: E's thumbnails (E frozen), and
* `bicubic`: antialiased bicubic thumbnails,

with the pipeline's recipe (`pipeline.recipe`: AdamW or SGD-Nesterov with
weight decay, warm-up + cosine, label smoothing) for the same epochs, keeping
the epoch of best validation top-1 (`fit_resumable`); both are then evaluated
once on validation and test. The report (`generalize_report`) gives the mean
and spread over seeds of the difference learned - bicubic, whichever way it
comes out.

E's inputs: both arms read the target images as E's source run did, at its
image size and channels and in its value range (its normalization), whatever
the target's manifest says; E was trained, and clips, in that range.
`input_notes` lists where the target differs from E's source in a way that
limits what E can do (native resolution at or below the thumbnail's, colour
dropped, a different normalization); the report shows them.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from thumbnet_keras.pipeline.checkpoint import fit_resumable
from thumbnet_keras.pipeline.config import (
    ConfigError,
    GeneralizeConfig,
    GeneralizeParams,
    experiment_backbone,
)
from thumbnet_keras.pipeline.health import default_seed_scope
from thumbnet_keras.pipeline.rundir import (
    Run,
    atomic_write,
    check_writable,
    claim,
    default_run_name,
    read_json,
    write_json,
)

__all__ = [
    "ARMS",
    "arm_id",
    "arm_inputs",
    "check_target",
    "input_notes",
    "resolve_generalize",
    "train_generalize_arm",
    "write_generalize_report",
]

ARMS = ("learned", "bicubic")


def arm_id(index: int, seed: int, arm: str) -> str:
    """`exp<index>-s<seed>-<arm>`, the name of an arm's record and checkpoint."""
    return f"exp{index}-s{seed}-{arm}"


logger = logging.getLogger(__name__)


def _log(message: str) -> None:
    logger.info(message)


def _source(config: GeneralizeConfig) -> tuple[Run, dict, dict]:
    source = Run(config.source_run)
    if not source.config_json.is_file():
        raise ConfigError(
            f"Source run {config.source_run!r} is not a thumbnet run folder "
            "(no config.json)."
        )
    saved = source.config()["config"]
    downscaler = source.factor_dir(config.factor) / "downscaler.keras"
    if not downscaler.is_file():
        raise ConfigError(
            f"Source run {config.source_run!r} has no downscaler for factor "
            f"{config.factor} ({downscaler} missing); its factors: {saved['factors']}."
        )
    if not source.data_json.is_file():
        raise ConfigError(
            f"Source run {config.source_run!r} has no data.json: E's input "
            "range (its dataset's normalization) is unknown."
        )
    return source, saved, source.data(require=True)


def input_notes(
    source: dict, target: dict, image_size: int, channels: int, factor: int
) -> list[str]:
    """Where a target dataset differs from E's source in a way that limits E.

    Args:
        source, target: `{"name", "image_shape": [H, W, C], "normalization"}`
            of E's source dataset and of the target (H, W None if they vary).
        image_size, channels: E's input (the source run's).
        factor: E's factor; the thumbnail side is `image_size // factor`.

    Returns:
        Sentences for the report, empty when nothing differs.
    """
    notes = []
    thumb = image_size // factor
    height, width, target_channels = target["image_shape"]
    if height and width and max(height, width) <= thumb:
        notes.append(
            f"its images are {height}x{width}, no larger than the {thumb}x{thumb} "
            f"thumbnail (after resizing to {image_size}x{image_size}): the bicubic "
            "thumbnail already keeps their detail, so E has little to recover and "
            "its learned correction (fitted to the source's images) is mostly "
            "noise here; do not expect E to beat bicubic."
        )
    elif height and width and max(height, width) < image_size:
        notes.append(
            f"its images ({height}x{width}) are upsampled to E's "
            f"{image_size}x{image_size} input, so they hold less fine detail than "
            "the images E was trained on."
        )
    if target_channels != channels:
        what = (
            "RGB images are converted to gray (luminance): colour is lost in both arms"
            if target_channels == 3
            else "gray images are repeated to 3 channels"
        )
        notes.append(f"E takes {channels} channel(s): its {what}.")
    if target["normalization"] != source["normalization"]:
        notes.append(
            f"its manifest normalizes '{target['normalization']}', E's source "
            f"'{source['normalization']}': both arms read it in E's range "
            f"('{source['normalization']}')."
        )
    return notes


def _dataset_info(prepared_or_manifest) -> dict:
    if isinstance(prepared_or_manifest, dict):  # a prepared summary (data.json)
        return {
            "name": prepared_or_manifest["name"],
            "image_shape": list(prepared_or_manifest["image_shape"]),
            "normalization": prepared_or_manifest["normalization"],
        }
    image = prepared_or_manifest.image
    return {
        "name": prepared_or_manifest.name,
        "image_shape": [image.height, image.width, image.channels],
        "normalization": prepared_or_manifest.normalization,
    }


def resolve_generalize(params: GeneralizeParams | GeneralizeConfig | dict) -> dict:
    """Validates a `generalize` run and claims its folder.

    Returns:
        `{"run_dir", "run_name", "resumed", "config", "experiments":
        [{"dataset", "backbone", "backbone_options", "notes"}], "image_size", "channels",
        "normalization", "downscaler", "source_run"}`.
    """
    from thumbnet_keras.pipeline.resolve import (
        check_backbone,
        generalize_inputs,
        load_manifest_checked,
    )

    if isinstance(params, dict):
        params = GeneralizeParams.model_validate(params)
    config = params.to_config() if isinstance(params, GeneralizeParams) else params
    source, saved, source_data = _source(config)
    source_info = _dataset_info(source_data)
    experiments, seen = [], {}
    for dataset, backbone in config.experiments:
        dataset = dataset or saved["dataset"]
        backbone = experiment_backbone(backbone, saved)
        manifest = load_manifest_checked(dataset)
        check_backbone(backbone)
        notes = input_notes(
            source_info,
            _dataset_info(manifest),
            saved["image_size"],
            saved["channels"],
            config.factor,
        )
        # The source's backbone keeps its options (e.g. tiny_cnn's widths).
        options = saved["backbone_options"] if backbone == saved["backbone"] else {}
        experiments.append(
            {
                "dataset": dataset,
                "name": manifest.name,  # What reports call it (`dataset` may be a path).
                "backbone": backbone,
                "backbone_options": options,
                "notes": notes,
            }
        )
        # `:`, `elpv:` and `elpv:tiny_cnn` can all name one experiment, and so
        # can `elpv.yaml` and `./elpv.yaml` (one manifest file); each was
        # trained and reported twice (trials).
        key = (os.path.realpath(manifest.path or dataset), backbone)
        seen.setdefault(key, []).append(f"{dataset}:{backbone}")
    repeated = sorted(" and ".join(names) for names in seen.values() if len(names) > 1)
    if repeated:
        raise ConfigError(
            f"--experiment {'; '.join(repeated)}: the same experiment given more "
            "than once (after filling in the source run's dataset and backbone, "
            "with dataset paths resolved); experiments must be distinct."
        )
    resolved = tuple((e["dataset"], e["backbone"]) for e in experiments)
    config = dataclasses.replace(config, experiments=resolved)
    if config.run_name is None:
        config = dataclasses.replace(
            config, run_name=default_run_name(f"generalize-{source.name}")
        )
    check_writable(config.runs_dir)
    downscaler = source.factor_dir(config.factor) / "downscaler.keras"
    run, resumed = claim(
        config.run_path,
        config.to_json(),
        kind="generalize",
        inputs=generalize_inputs(source, config.factor),
    )
    info = {
        "experiments": experiments,
        "image_size": saved["image_size"],
        "channels": saved["channels"],
        "normalization": source_info["normalization"],
        "source_dataset": source_info,
        "downscaler": str(downscaler),
        "source_run": str(source.path),
    }
    write_json(run.file("source.json"), info)
    return {
        "run_dir": str(run.path),
        "run_name": run.name,
        "resumed": resumed,
        "config": config.to_json(),
        **info,
    }


def _check_arm(arm: str) -> None:
    if arm not in ARMS:
        raise ConfigError(f"Unknown arm {arm!r}; arms: {', '.join(ARMS)}.")


def arm_inputs(run_dir: str, arm: str, prepared: dict):
    """What an arm's S reads: `(downscaler, data)`.

    `downscaler` is the source run's E (`"learned"`) or the antialiased
    bicubic resize (`"bicubic"`), frozen. `data` is `prepared` read in E's
    value range (the source run's normalization) for both arms: E was trained
    on, and clips to, that range, and the two arms must stay comparable.
    """
    import keras

    from thumbnet_keras.layers.downscaler import bicubic_downscaler

    _check_arm(arm)
    run = Run(run_dir)
    config = GeneralizeConfig.from_json(run.config()["config"])
    info = read_json(run.file("source.json"))
    shape = (info["image_size"], info["image_size"], info["channels"])
    data = dict(prepared, normalization=info["normalization"])
    if arm == "learned":
        downscaler = keras.saving.load_model(info["downscaler"], compile=False)
        if tuple(downscaler.inputs[0].shape[1:]) != shape:
            raise ConfigError(
                f"The downscaler takes {downscaler.inputs[0].shape[1:]}, not {shape}."
            )
    else:
        from thumbnet_keras.data.pipeline import value_range

        # Clipped as E clips (a "raw" source's E to [0, 255]; the bicubic arm
        # was not, and the two arms differed by more than E: a trial).
        downscaler = bicubic_downscaler(
            shape, config.factor, value_range=value_range(data["normalization"])
        )
    downscaler.trainable = False
    return downscaler, data


def _target_record(run: Run, index: int):
    return run.file(f"target-{index}.json")


def check_target(run_dir: str, index: int, prepared: dict) -> None:
    """Before experiment `index` trains or resumes on `prepared`:

    * the same data as its arms already trained on (the prepared index's
      fingerprint, recorded in `target-<index>.json`): a resumed run pooled
      seeds trained on other files (a trial: 27 and 36 test images in one
      row, the summary giving the first);
    * no test image E's source run trained on (byte-identical, its train
      and validation splits): with another `--limit-per-class` a dataset
      split here (ELPV, an image folder) is split otherwise, and 11 of a
      target's 20 test images were E's training images (a trial);
    * the report's notes from the prepared images' size (a folder's
      manifest gives none, so "no larger than the thumbnail" never showed).
    """
    run = Run(run_dir)
    record = _target_record(run, index)
    fingerprint = prepared.get("fingerprint")
    if record.is_file():
        saved = read_json(record)
        started = any(  # a finished arm, or one killed mid-way (checkpoints)
            p.name.startswith(f"exp{index}-")
            for p in (*run.path.glob("stages/*.json"), *run.path.glob("checkpoints/*"))
        )
        if (
            started
            and fingerprint
            and saved.get("fingerprint") not in (None, fingerprint)
        ):
            raise ConfigError(
                f"Generalize run {str(run.path)!r}: the files of experiment "
                f"{index}'s dataset {prepared.get('name')!r} changed since its "
                f"first arms trained (then: {saved.get('splits')}; now: "
                f"{prepared.get('splits')}). Its seeds would be pooled over "
                "two datasets: choose another --run-name, or restore the files."
            )
        if saved.get("fingerprint") == fingerprint and saved.get("checked"):
            _update_notes(run, index, prepared)
            return
    _check_no_source_images(run, prepared)
    write_json(
        record,
        {"fingerprint": fingerprint, "splits": prepared.get("splits"), "checked": True},
    )
    _update_notes(run, index, prepared)


def _check_no_source_images(run: Run, prepared: dict) -> None:
    """`ConfigError` when test images of `prepared` are among the images E's
    source run trained on; a warning when that cannot be checked."""
    import pyarrow.compute as pc

    from thumbnet_keras.data.index import IndexCorruptError, PreparedDataset

    info = read_json(run.file("source.json"))
    source = Run(info["source_run"])
    # require=True: the source's index as it trained (a target preparing the
    # source's own folder again, its files changed, compared the new index
    # with itself: a review).
    data = source.data(require=True)
    if data.get("fingerprint") == prepared.get("fingerprint"):
        return  # The same prepared split: its test is the source's test.

    def shas(prepared_dir: str, splits: list[str]) -> set[str]:
        table = PreparedDataset.load(prepared_dir).read_index(
            ["sha256", "split", "status"]
        )
        keep = pc.and_(
            pc.is_in(table["split"], value_set=_pa_array(splits)),
            pc.not_equal(table["status"], "quarantined"),
        )
        return set(table.filter(keep)["sha256"].to_pylist())

    try:
        trained = shas(data["prepared_dir"], ["train", "validation"])
    except (IndexCorruptError, KeyError, TypeError, OSError):
        logging.getLogger(__name__).warning(
            "Source run %s: its prepared data is gone, so whether the target's "
            "test images include images E trained on cannot be checked.",
            source.path,
        )
        return
    overlap = shas(prepared["prepared_dir"], ["test"]) & trained
    if overlap:
        limit = (source.config().get("config") or {}).get("limit_per_class")
        same = f"--limit-per-class {limit}" if limit else "no --limit-per-class"
        raise ConfigError(
            f"{len(overlap)} test image(s) of {prepared.get('name')!r} are "
            f"images E's source run {str(source.path)!r} trained on (its train "
            "and validation splits): E would be judged on what it learned. "
            f"For the source's own dataset, prepare its split ({same}, as the "
            "source run had); otherwise remove those images from the target."
        )


def _pa_array(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _update_notes(run: Run, index: int, prepared: dict) -> None:
    """Experiment `index`'s report notes from its prepared images."""
    info = read_json(run.file("source.json"))
    notes = input_notes(
        info["source_dataset"],
        _dataset_info(prepared),
        info["image_size"],
        info["channels"],
        GeneralizeConfig.from_json(run.config()["config"]).factor,
    )
    if info["experiments"][index].get("notes") != notes:
        info["experiments"][index]["notes"] = notes
        write_json(run.file("source.json"), info)


@default_seed_scope()  # Keras' default seeds from `seed`, then back
def train_generalize_arm(
    run_dir: str,
    index: int,
    arm: str,
    prepared: dict,
    seed: int = 0,
    verbose: int | str = "auto",
) -> dict:
    """Trains and evaluates a fresh S of experiment `index` on `arm` thumbnails.

    S is initialized, and the data shuffled and augmented, with `seed` (the
    same for both arms), with the backends' deterministic kernels on
    (`health.configure_determinism`), whatever ran before in the process.
    The target images are read in E's value range (the source run's
    normalization), for both arms (`arm_inputs`).

    Returns:
        The arm's record: id, experiment, seed, arm, dataset, backbone,
        factor, normalization, top1 (test), val_top1, (top5), flops, params,
        images_per_second, history, epochs, selection, seconds.
    """
    from thumbnet_keras.models import backbones
    from thumbnet_keras.pipeline import progress
    from thumbnet_keras.pipeline.datasets import run_datasets, split_batches
    from thumbnet_keras.pipeline.evaluate import compose, evaluate_model
    from thumbnet_keras.pipeline.health import configure_determinism
    from thumbnet_keras.pipeline.recipe import (
        SparseCrossentropy,
        make_optimizer,
        steps_per_epoch,
    )

    _check_arm(arm)
    run = Run(run_dir)
    config = GeneralizeConfig.from_json(run.config()["config"])
    check_target(run_dir, index, prepared)
    info = read_json(run.file("source.json"))
    experiment = info["experiments"][index]
    sid = arm_id(index, seed, arm)
    if run.is_done(sid):
        _log(f"[{sid}] already finished, skipped")
        return read_json(run.stage_record(sid)) | {"skipped": True}
    downscaler, data = arm_inputs(run_dir, arm, prepared)
    size, channels = info["image_size"], info["channels"]
    thumb = tuple(downscaler.outputs[0].shape[1:])
    # After E: S starts equal in both arms. Op determinism on, as in the
    # run's stages, whatever an earlier run in this process switched.
    configure_determinism(seed, deterministic=True)
    student = backbones.build(
        experiment["backbone"],
        thumb,
        data["num_classes"],
        **experiment.get("backbone_options", {}),
    )
    model = compose(downscaler, student, f"{arm}_student")
    steps = steps_per_epoch(data, config.batch_size)
    model.compile(
        optimizer=make_optimizer(config, "student", config.epochs, steps, model),
        loss=SparseCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    _log(
        f"[{sid}] {experiment['backbone']} on {experiment['dataset']}, "
        f"{arm} thumbnails, seed {seed}"
    )
    train, test = run_datasets(data, size, channels, config.batch_size, seed)
    validation = split_batches(data, "validation", size, channels, config.batch_size)
    fit = fit_resumable(
        model,
        train,
        config.epochs,
        run.checkpoint_dir(sid),
        # A line per epoch, as the train stages log it (Keras' bar in a terminal).
        verbose=progress.keras_verbose(verbose),
        log=_log,
        callbacks=[progress.EpochProgress(sid, config.epochs)],
        validation_data=validation,
    )
    result = evaluate_model(
        model,
        test,
        data["num_classes"],
        config.batch_size,
        config.throughput_batches,
        validation=validation,
        return_correct=True,
    )
    from thumbnet_keras.pipeline.report import majority_shares

    # Each test image's top-1 hit, for the report's paired comparison of
    # the two arms on the same images ("1" right, "0" wrong).
    correct = "".join("1" if hit else "0" for hit in result.pop("correct"))
    record = {
        "id": sid,
        "experiment": index,
        "seed": seed,
        "arm": arm,
        "dataset": experiment["dataset"],
        "backbone": experiment["backbone"],
        "factor": config.factor,
        "normalization": data["normalization"],
        **result,
        "test_majority": majority_shares(data["prepared_dir"]).get("test"),
        "test_correct": correct,
        **fit,
    }
    write_json(run.stage_record(sid), record)
    run.discard_checkpoints(sid)
    return record


def write_generalize_report(run_dir: str) -> dict:
    """Writes `metrics.json` and `report.md` / `report.html` of a generalize run.

    Returns:
        `{"report_md", "report_html", "metrics_json", "markdown", "table",
        "per_seed", "summary"}`.
    """
    import html
    import re
    from pathlib import Path

    from thumbnet_keras.pipeline.generalize_report import (
        VERDICT_NOTE,
        generalize_markdown,
        majority_warning,
        summarize_generalize,
    )
    from thumbnet_keras.reports.render import _CSS, _html_table

    run = Run(run_dir)
    saved = run.config()
    config = GeneralizeConfig.from_json(saved["config"])
    info = read_json(run.file("source.json"))
    records = []
    for index in range(len(info["experiments"])):
        for seed in config.seeds:
            for arm in ARMS:
                path = run.stage_record(arm_id(index, seed, arm))
                if path.is_file():
                    records.append(read_json(path))
    summary = summarize_generalize(info["experiments"], records)
    title = f"ThumbNet generalization: {run.name}"
    intro = (
        f"A frozen downscaler E from `{info['source_run']}` (factor "
        f"{config.factor}) against bicubic thumbnails: for each seed "
        f"({', '.join(map(str, config.seeds))}), a fresh S (random init, the "
        f"same for both arms) trained with CL for {config.epochs} epochs "
        f"({config.optimizer}, peak rate {config.learning_rate}, warm-up + "
        "cosine), the epoch of best validation top-1 kept, then evaluated on "
        "validation and test. Differences are learned - bicubic in points, "
        "mean ± sample std over seeds."
    )
    markdown, table, per_seed = generalize_markdown(title, intro, summary)
    metrics = {
        "run_name": run.name,
        "source_run": info["source_run"],
        "downscaler": info["downscaler"],
        "summary": summary,
        # Per-image hits stay in the arm records (stages/), not here.
        "results": [
            {k: v for k, v in r.items() if k != "test_correct"} for r in records
        ],
        "config": saved["config"],
        "environment": saved["environment"],
    }
    write_json(run.metrics_json, metrics)
    notes = "".join(
        f"<li><b>{html.escape(r['dataset'])} / {html.escape(r['backbone'])}</b>: "
        f"{html.escape(n)}</li>"
        for r in summary
        for n in r["notes"]
    )
    if notes:
        notes = f"<h2>Where the target differs from E's source</h2><ul>{notes}</ul>"

    def inline(text: str) -> str:  # markdown's `code` and **bold** as HTML
        text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))
        return re.sub(r"\*\*([^*]*)\*\*", r"<strong>\1</strong>", text)

    warning = majority_warning(summary)
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        + (f"<p>{inline(warning)}</p>" if warning else "")
        + f"<p>{inline(intro)}</p>{_html_table(table)}"
        f"<p>{html.escape(VERDICT_NOTE)}</p>{notes}"
        f"<h2>Per seed</h2>{_html_table(per_seed)}</body></html>\n"
    )
    for name, text in (("report.md", markdown), ("report.html", page)):
        atomic_write(run.file(name), lambda tmp, t=text: Path(tmp).write_text(t))
    return {
        "metrics_json": str(run.metrics_json),
        "report_md": str(run.file("report.md")),
        "report_html": str(run.file("report.html")),
        "markdown": markdown,
        "table": table,
        "per_seed": per_seed,
        "summary": summary,
    }
