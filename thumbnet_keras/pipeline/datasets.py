"""Preparing a dataset once for many runs, and the tf.data streams of a run."""

from __future__ import annotations

import logging
import os
from collections import Counter

from thumbnet_keras.pipeline.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "is_prepared",
    "prepare_dataset",
    "prepared_dir",
    "has_split",
    "run_datasets",
    "split_batches",
    "test_batches",
]


def prepared_dir(dataset: str, data_dir: str, limit_per_class: int | None) -> str:
    """`<data_dir>/<name>-<manifest hash>[-limit<N>]`: one folder per manifest
    content and limit, shared by every run that uses them."""
    from thumbnet_keras.pipeline.resolve import load_manifest_checked

    manifest = load_manifest_checked(dataset)
    limit = f"-limit{limit_per_class}" if limit_per_class else ""
    return os.path.join(
        data_dir, f"{manifest.name}-{manifest.content_hash()[:12]}{limit}"
    )


def is_prepared(dataset: str, data_dir: str, limit_per_class: int | None) -> bool:
    """Whether `prepared_dir(...)` holds a consistent prepared index."""
    from thumbnet_keras.data import IndexCorruptError, PreparedDataset

    try:
        PreparedDataset.load(prepared_dir(dataset, data_dir, limit_per_class))
    except (IndexCorruptError, ConfigError):
        return False
    return True


def _no_test_split(manifest, splits: dict) -> str:
    """Why a run cannot use data prepared without a test split, and the fix."""
    have = ", ".join(f"{k} {v}" for k, v in splits.items()) or "nothing"
    source = manifest.source
    fraction = manifest.split.test_fraction
    if manifest.source_splits() is not None:  # split folders, TFDS splits
        why = (
            "its source assigns every image a split and none is test, so none "
            "is carved from train: give the source a test split (e.g. a test "
            "folder in split_dirs)"
        )
    elif getattr(source, "split_column", None):
        why = (
            f"its source gives every row a split (column "
            f"{source.split_column!r}) and none says 'test', so none is carved "
            "from train: add rows with split 'test', or leave the column empty "
            "(null) on the rows split.test_fraction may draw from"
        )
        if not fraction:
            why += f" (and set split.test_fraction above 0; it is {fraction:g})"
    else:
        why = f"its split.test_fraction is {fraction:g}: set it above 0 (e.g. 0.2)"
    return (
        f"Dataset {manifest.name!r} has no test split (prepared: {have}), and a "
        f"run evaluates every model on one once training ends: {why}."
    )


def prepare_dataset(
    dataset: str, data_dir: str, limit_per_class: int | None = None
) -> dict:
    """Validates, splits and indexes a dataset (`data.prepare`), reusing the
    previous index when nothing changed.

    Returns:
        A JSON-able summary: `prepared_dir`, `name`, `class_names`,
        `num_classes`, `splits`, `image_shape`, `normalization`, `license`,
        `source_type`, `reused`.
    """
    from thumbnet_keras import data
    from thumbnet_keras.pipeline.resolve import load_manifest_checked

    manifest = load_manifest_checked(dataset)
    out = prepared_dir(dataset, data_dir, limit_per_class)
    prepared = data.prepare(manifest, out, limit_per_class=limit_per_class)
    # A fresh prepare warned of duplicates itself; a reused index says it again.
    report_data_notices(prepared.out_dir, quarantine_only=not prepared.reused)
    if not prepared.splits.get("test"):
        raise ConfigError(_no_test_split(manifest, prepared.splits))
    return {
        "dataset": dataset,
        "prepared_dir": prepared.out_dir,
        "name": prepared.name,
        "class_names": list(prepared.class_names),
        "num_classes": prepared.num_classes,
        "splits": dict(prepared.splits),
        "image_shape": list(prepared.image_shape),
        "normalization": prepared.normalization,
        "license": manifest.license,
        "source_type": prepared.source_type,
        "reused": bool(prepared.reused),
        "fingerprint": prepared.summary().get("fingerprint"),
    }


def prepared_summary(prepared_dir: str) -> dict | None:
    """The summary of the index `prepared_dir` holds now (its `fingerprint`
    of the manifest and every file's content, `splits`, `class_names`,
    `data.prepare`), or None when there is none. Read from its summary.json
    alone: `PreparedDataset.load` would hash the whole index each time
    (every step that reads a run's images asks), and the steps that read
    the index check it themselves."""
    import json

    from thumbnet_keras.data.index import SUMMARY_FILE

    try:
        with open(os.path.join(prepared_dir, SUMMARY_FILE)) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def prepared_fingerprint(prepared_dir: str) -> str | None:
    """The fingerprint of the index `prepared_dir` holds now
    (`prepared_summary`), or None when there is none."""
    return (prepared_summary(prepared_dir) or {}).get("fingerprint")


def data_notices(prepared_dir: str, quarantine_only: bool = False) -> list[str]:
    """What a run should be told about its prepared data, from the files
    the index keeps (so a reused or cached preparation says it too): files
    quarantined (how many, why, where the list is), byte-identical images in
    more than one split, ones under more than one class, and classes a split
    has no image of (a cached preparation said that only the first time: a
    Prefect trial)."""
    import json

    from thumbnet_keras.data import PreparedDataset
    from thumbnet_keras.data.prepare import (
        absent_texts,
        conflicts_text,
        duplicates_text,
    )

    prepared = PreparedDataset.load(prepared_dir)
    notices = []
    with open(prepared.quarantine_path) as f:
        quarantined = json.load(f).get("quarantined", [])
    if quarantined:
        reasons = Counter(r["reason"] for r in quarantined)
        why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        notices.append(
            f"data: {len(quarantined)} file(s) quarantined and left out ({why}); "
            f"the list: {prepared.quarantine_path}"
        )
    if quarantine_only:
        return notices
    summary = prepared.summary()
    if summary.get("duplicates_across_splits"):
        notices.append(
            duplicates_text(prepared.name, summary["duplicates_across_splits"])
        )
    if summary.get("label_conflicts"):
        notices.append(conflicts_text(prepared.name, summary["label_conflicts"]))
    if summary.get("classes_absent_from_split"):
        totals = Counter()
        for counts in (summary.get("per_class") or {}).values():
            totals.update(counts)
        notices += absent_texts(
            prepared.name, summary["classes_absent_from_split"], dict(totals)
        )
    return notices


def report_data_notices(prepared_dir: str, quarantine_only: bool = False) -> None:
    """Logs `data_notices` (warnings; the run goes on)."""
    for notice in data_notices(prepared_dir, quarantine_only):
        logger.warning("%s", notice)


def _cache(prepared: dict) -> bool:
    # Decoded images of an indexed set fit in memory; ImageNet-size TFDS does not.
    return prepared["source_type"] != "tfds"


def run_datasets(
    prepared: dict, image_size: int, channels: int, batch_size: int, seed: int
):
    """`(train, test)` tf.data streams: train augmented and shuffled, test not."""
    from thumbnet_keras import data

    common = dict(
        channels=channels,
        normalization=prepared["normalization"],
        cache=_cache(prepared),
        seed=seed,
    )
    train = data.make_dataset(
        prepared["prepared_dir"], "train", image_size, batch_size, True, **common
    )
    test = data.make_dataset(
        prepared["prepared_dir"], "test", image_size, batch_size, False, **common
    )
    return train, test


def has_split(prepared: dict, split: str) -> bool:
    """Whether the prepared dataset has examples in `split`."""
    return int(prepared["splits"].get(split, 0)) > 0


def split_batches(
    prepared: dict,
    split: str,
    image_size: int,
    channels: int,
    batch_size: int,
    shuffle_seed: int | None = None,
):
    """A split as a tf.data stream without augmentation (evaluation, BatchNorm
    re-estimation); None when the split is empty. In the index's order, or,
    with `shuffle_seed`, shuffled with that seed: a prefix of the stream then
    samples every class (an index lists folder sources class by class)."""
    from thumbnet_keras import data

    if not has_split(prepared, split):
        return None
    return data.make_dataset(
        prepared["prepared_dir"],
        split,
        image_size,
        batch_size,
        False,
        channels=channels,
        normalization=prepared["normalization"],
        cache=_cache(prepared),
        shuffle=shuffle_seed is not None,
        seed=shuffle_seed or 0,
    )


def test_batches(prepared: dict, image_size: int, channels: int, batch_size: int):
    """The test split as a tf.data stream (no augmentation, fixed order)."""
    return split_batches(prepared, "test", image_size, channels, batch_size)
