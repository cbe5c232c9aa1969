"""`prepare`: validate every example once, split, and write the index.

One streaming pass over the source: read each candidate's bytes, hash them
(sha256), and decode/validate only when the previous index has no row with the
same key and hash. The input fingerprint (manifest content, options and every
(key, sha256)) decides whether anything changed; when it did not, the previous
index is returned untouched and nothing is decoded or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Literal

import numpy as np

from thumbnet_keras.data import index as idx
from thumbnet_keras.data.manifest import Manifest, TfdsSource, load_manifest
from thumbnet_keras.data.sources import (
    SPLITS,
    Candidate,
    iter_candidates,
    limit,
    parquet_index_classes,
)
from thumbnet_keras.data.splits import stratified_holdout
from thumbnet_keras.data.validate import (
    CONVERTED,
    OK,
    QUARANTINED,
    RULES_VERSION,
    Validation,
    quarantine,
    read_file,
    validate_array,
    validate_bytes,
)

EXECUTORS = ("auto", "processes", "threads")
# A failed prepare's quarantine report, beside the last good index's.
FAILED_REPORT = "quarantine.failed.json"

# Candidates per task sent to a worker process: amortizes pickling and the
# round trip over several images (a 500x375 JPEG takes ~1 ms to examine).
_CHUNK = 32
# With executor="auto", a stream shorter than this is examined in threads:
# starting worker processes (~0.3 s) would cost more than they save.
_PROCESS_MIN = 1024


class PrepareError(RuntimeError):
    """A split ends up empty, a declared class has no usable example, or the
    worker processes could not run."""


def _reusable(old: dict, out_dir: Path) -> bool:
    """Whether a previous row can be copied: its converted file, if any, exists."""
    return (
        old["status"] != CONVERTED
        or old["image_uri"] is None
        or os.path.isfile(idx.resolve_image_uri(out_dir, old["image_uri"]))
    )


def _previous_rows(out_dir: Path) -> dict[tuple[str, str], dict]:
    """(key, sha256) -> row of a trusted previous index; {} if none, or if
    it was validated under other rules (`RULES_VERSION`): its rows would
    carry the old verdicts (a damaged PNG indexed `ok` before CRCs were
    checked stayed `ok` for as long as its bytes did)."""
    try:
        prev = idx.PreparedDataset.load(out_dir)
    except idx.IndexCorruptError:
        return {}
    if prev.summary().get("validation_rules") != RULES_VERSION:
        return {}
    rows = prev.read_index().to_pylist()
    return {(r["key"], r["sha256"]): r for r in rows if r["sha256"]}


def _examine(
    cand: Candidate, prev_sha: str | None
) -> tuple[bytes | None, str, Validation | None, bool]:
    """The costly part of one candidate: read, hash and (unless the previous
    index has this key with these bytes) decode and validate.

    Pure, and safe to run in a worker thread or process. Returns `(data,
    sha256, validation, decoded)`; `validation` is None when the previous row
    can be reused.
    """
    data: bytes | None = cand.data
    if cand.problem is not None:
        return None, "", quarantine(cand.problem), False
    if cand.array is not None:
        arr = np.ascontiguousarray(cand.array)
        sha = hashlib.sha256(repr(arr.shape).encode() + arr.tobytes()).hexdigest()
        if sha == prev_sha:
            return None, sha, None, False
        return None, sha, validate_array(cand.array), True
    early: Validation | None = None
    if data is None and cand.uri is not None:
        data, early = read_file(cand.uri)
    sha = hashlib.sha256(data).hexdigest() if data is not None else ""
    if early is not None:
        return data, sha, early, False
    if sha and sha == prev_sha:
        return data, sha, None, False
    return data, sha, validate_bytes(data), True


def _examine_chunk(items: list[tuple[Candidate, str | None]]) -> list[tuple]:
    """`_examine` of each `(candidate, prev_sha)`, run in a worker process.

    The bytes are not sent back: the parent holds in-memory candidates' bytes
    and needs no file's bytes (see `_process`).
    """
    return [(None, *_examine(cand, prev_sha)[1:]) for cand, prev_sha in items]


def _in_threads(
    candidates: Iterator[Candidate], prev_sha: dict, workers: int
) -> Iterator[tuple[Candidate, tuple]]:
    ahead = 64 * workers
    window: deque = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="thumbnet-prepare") as pool:
        for cand in candidates:
            window.append((cand, pool.submit(_examine, cand, prev_sha.get(cand.key))))
            if len(window) >= ahead:
                done, future = window.popleft()
                yield done, future.result()
        while window:
            done, future = window.popleft()
            yield done, future.result()


def exit_with_parent(parent: int, interval: float = 0.5) -> None:
    """A worker's initializer: the worker exits once `parent` is gone. A
    parent killed with SIGKILL cannot shut its pool down, and its idle
    workers (and the resource tracker they hold open) used to stay."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(0)

    threading.Thread(target=watch, name="thumbnet-parent-watch", daemon=True).start()


def _in_processes(
    candidates: Iterator[Candidate], prev_sha: dict, workers: int
) -> Iterator[tuple[Candidate, tuple]]:
    # "spawn": a fresh interpreter that imports thumbnet_keras.data (and, as
    # multiprocessing does, the caller's __main__), never a fork of a process
    # that may have imported TensorFlow, JAX or torch.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=exit_with_parent,
        initargs=(os.getpid(),),
    )
    window: deque = deque()

    def results(chunk, future):
        for cand, (_, sha, v, decoded) in zip(chunk, future.result(), strict=True):
            yield cand, (cand.data, sha, v, decoded)

    try:
        while chunk := list(itertools.islice(candidates, _CHUNK)):
            items = [(cand, prev_sha.get(cand.key)) for cand in chunk]
            window.append((chunk, pool.submit(_examine_chunk, items)))
            if len(window) >= 4 * workers:
                yield from results(*window.popleft())
        while window:
            yield from results(*window.popleft())
    except BrokenProcessPool as err:
        raise PrepareError(
            f"prepare's worker processes stopped ({err}). A script that calls "
            "prepare must do so under `if __name__ == '__main__':`; or pass "
            "executor='threads'."
        ) from err
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _examined(
    candidates: Iterable[Candidate], prev: dict, workers: int, executor: str
) -> Iterator[tuple[Candidate, tuple]]:
    """`(candidate, _examine(candidate))` in the candidates' order.

    With `workers` > 1 the examinations run in a pool of threads or of
    processes (`executor`; "auto": processes from `_PROCESS_MIN` candidates
    on, unless they carry their bytes), at most a few hundred candidates
    ahead of the consumer (so an ImageNet-size stream is never held in
    memory); the order, and so the index, is the same for any number of
    workers and either pool.
    """
    prev_sha = {key: sha for key, sha in prev}
    candidates = iter(candidates)
    if workers <= 1:
        for cand in candidates:
            yield cand, _examine(cand, prev_sha.get(cand.key))
        return
    if executor == "auto":
        head = list(itertools.islice(candidates, _PROCESS_MIN))
        # Encoded bytes already in memory (a Parquet bytes column) would be
        # pickled out to the processes: threads were 2.5-6x faster there
        # (10,000 8x8 PNGs). Arrays stay with processes: encoding them holds
        # the GIL (Fashion-MNIST: processes 4.3 s, threads 8.4 s).
        in_memory = any(c.data is not None for c in head)
        many = len(head) == _PROCESS_MIN
        executor = "processes" if many and not in_memory else "threads"
        candidates = itertools.chain(head, candidates)
    if executor == "threads":
        yield from _in_threads(candidates, prev_sha, workers)
    else:
        yield from _in_processes(candidates, prev_sha, workers)


def _process(
    cand: Candidate, examined: tuple, prev: dict, out_dir: Path, is_tfds: bool
) -> tuple[dict, bool]:
    """The index row of one examined candidate. Returns (row, decoded)."""
    data, sha, v, decoded = examined
    row = {
        "key": cand.key,
        "image_uri": None,
        "image_bytes": None,
        "source_uri": cand.uri,
        "label_name": cand.label_name,
        "source_split": cand.source_split or "",
        "sha256": sha,
        "tfds_split": cand.tfds_split,
        "tfds_index": cand.tfds_index,
    }
    old = prev.get((cand.key, sha)) if sha else None
    if old is not None:
        for k in (
            "image_uri",
            "image_bytes",
            "width",
            "height",
            "channels",
            "orientation",
            "status",
            "reason",
        ):
            row[k] = old[k]
        if row["status"] == OK and row["image_uri"] and cand.uri is not None:
            row["image_uri"] = cand.uri  # the source file's path as found now
        return row, False
    if is_tfds and v.status == CONVERTED:
        # TFDS images are read from the TFDS records at train time, unconverted.
        v = quarantine(f"needs_conversion:{v.reason}")
    elif is_tfds and v.orientation != 1:
        # ... and as stored: the TFDS stream applies no EXIF orientation.
        turned = v.orientation in (5, 6, 7, 8)
        v = dataclasses.replace(
            v,
            orientation=1,
            width=v.height if turned else v.width,
            height=v.width if turned else v.height,
        )
    row.update(
        status=v.status,
        reason=v.reason,
        width=v.width,
        height=v.height,
        channels=v.channels,
        orientation=v.orientation,
    )
    if v.status == OK and cand.array is None:
        if cand.uri is not None:
            row["image_uri"] = cand.uri
        elif not is_tfds:
            row["image_bytes"] = data
    elif v.converted is not None and cand.uri is not None:
        path = out_dir / idx.CONVERTED_DIR / f"{sha}.png"
        # Named by the source's bytes; what it holds can change with the
        # conversion (an index before schema 2 wrote EXIF-tagged ones sideways).
        if not path.is_file() or path.read_bytes() != v.converted:
            path.parent.mkdir(parents=True, exist_ok=True)
            idx.atomic_write(path, lambda tmp: Path(tmp).write_bytes(v.converted))
        row["image_uri"] = f"{idx.CONVERTED_DIR}/{sha}.png"  # in out_dir
    elif v.converted is not None:
        row["image_bytes"] = v.converted
    return row, decoded


def _carves_validation(manifest: Manifest, rows: list[dict]) -> bool:
    # A source's own validation split is kept; train is carved only without one.
    own = any(r["source_split"] == "validation" for r in rows)
    return manifest.split.validation_fraction > 0 and not own


def _assign_splits(rows: list[dict], manifest: Manifest) -> None:
    usable = [i for i, r in enumerate(rows) if r["status"] != QUARANTINED]
    for r in rows:
        r["split"] = ""
    unsplit = [i for i in usable if not rows[i]["source_split"]]
    if unsplit:
        held = stratified_holdout(
            [rows[i]["key"] for i in unsplit],
            [rows[i]["label"] for i in unsplit],
            manifest.split.test_fraction,
            manifest.split.seed,
        )
        for i, h in zip(unsplit, held, strict=True):
            rows[i]["split"] = "test" if h else "train"
    for i in usable:
        if rows[i]["source_split"]:
            rows[i]["split"] = rows[i]["source_split"]
    train = [i for i in usable if rows[i]["split"] == "train"]
    if _carves_validation(manifest, rows) and train:
        held = stratified_holdout(
            [rows[i]["key"] for i in train],
            [rows[i]["label"] for i in train],
            manifest.split.validation_fraction,
            manifest.split.seed + 1,
        )
        for i, h in zip(train, held, strict=True):
            if h:
                rows[i]["split"] = "validation"


def _expected_splits(manifest: Manifest, rows: list[dict]) -> list[str]:
    given = {r["source_split"] for r in rows if r["source_split"]}
    expected = {"train"} | given
    if manifest.split.test_fraction > 0 and any(not r["source_split"] for r in rows):
        expected.add("test")
    if _carves_validation(manifest, rows):
        expected.add("validation")
    return [s for s in SPLITS if s in expected]


def _unused_test_fraction(manifest: Manifest, usable: list[dict]) -> str | None:
    """The warning for a `split.test_fraction` given in the manifest that no
    row used: every usable row took its split from the Parquet
    `split_column` (known only once read; the manifest refuses the same
    case for split folders and TFDS splits before reading)."""
    split = manifest.split
    column = getattr(manifest.source, "split_column", None)
    if not (
        column and split.test_fraction and "test_fraction" in split.model_fields_set
    ):
        return None
    if not usable or not all(r["source_split"] for r in usable):
        return None
    return (
        f"{manifest.name}: split.test_fraction {split.test_fraction:g} is unused: "
        f"every row takes its split from column {column!r}, so none is drawn for "
        "test. Remove split.test_fraction, or leave the column empty for the rows "
        "to split here."
    )


def _classes_absent(class_names, per_class, by_split_class, counts) -> dict:
    """`{split: [class name, ...]}`: classes with images that a split has
    none of: train (a class whose images are all in a source's test folder,
    say: nothing learns it), or validation or test (a class of 1-3 images: a
    stratified split keeps its images in train; nothing measures it there)."""
    absent = {}
    for split in SPLITS:
        if not counts[split]:
            continue
        names = [
            name
            for i, name in enumerate(class_names)
            if per_class[i] and not by_split_class[split, i]
        ]
        if names:
            absent[split] = names
    return absent


def absent_texts(dataset: str, absent: dict, totals: dict[str, int]) -> list[str]:
    """The warnings for `_classes_absent`'s result (`totals`: each class's
    images in all): one for train, one for the splits that measure."""

    def shown(names):
        listed = ", ".join(f"{n!r} ({totals.get(n, 0)} in all)" for n in names[:5])
        return listed + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    texts = []
    if absent.get("train"):
        texts.append(
            f"{dataset}: some classes have no image in train, so no model "
            f"learns them ({shown(absent['train'])}). Add training images to "
            "those classes, or drop them."
        )
    parts = [f"{k}: {shown(v)}" for k, v in absent.items() if k != "train"]
    if parts:
        texts.append(
            f"{dataset}: some classes have no image in a split, so that split "
            f"measures nothing of them ({'; '.join(parts)}). Add images to those "
            "classes, or merge or drop them."
        )
    return texts


def duplicates_text(dataset: str, across: list[dict]) -> str:
    """The warning for identical images in more than one split."""
    first = across[0]
    return (
        f"{dataset}: {len(across)} image(s) have byte-identical copies in more "
        f"than one split ({sum(len(d['keys']) for d in across)} files; e.g. "
        f"{_one_each(first, 'splits')}), so validation and test top-1 count "
        "images the model trained on. Remove the copies (every one is listed "
        "in summary.json's duplicates_across_splits)."
    )


def conflicts_text(dataset: str, conflicts: list[dict]) -> str:
    """The warning for identical images filed under more than one class."""
    first = conflicts[0]
    return (
        f"{dataset}: {len(conflicts)} image(s) appear under more than one class "
        f"(byte-identical files; e.g. {_one_each(first, 'classes')}), so training "
        "is taught two answers for one image. Keep each image under one class (every one "
        "is listed in summary.json's label_conflicts)."
    )


def _one_each(record: dict, kind: str) -> str:
    """ "'a/1.png' as 'a', 'b/1.png' as 'b'": one file of each class (or
    split) a duplicate record names. The first two keys were quoted, which
    could both be of one class, the conflicting file never named (a trial);
    records saved before `examples` still are."""
    examples = record.get("examples")
    word, show = ("as", repr) if kind == "classes" else ("in", str)
    names = record[kind]
    if not examples:
        keys = ", ".join(map(repr, record["keys"][:2]))
        return f"{keys} {word} {' and '.join(map(show, names))}"
    return ", ".join(f"{examples[n]!r} {word} {show(n)}" for n in names)


def _examples(group: list[dict], field: str) -> dict[str, str]:
    """The first key of each value of `field` in `group`."""
    first: dict[str, str] = {}
    for r in group:
        first.setdefault(r[field], r["key"])
    return dict(sorted(first.items()))


def _by_sha(rows: list[dict]) -> dict[str, list[dict]]:
    """Usable rows grouped by their bytes' sha256."""
    by_sha: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["status"] != QUARANTINED and r["sha256"]:
            by_sha[r["sha256"]].append(r)
    return by_sha


def _label_conflicts(rows: list[dict]) -> list[dict]:
    """Byte-identical usable images whose rows name different classes."""
    by_sha = _by_sha(rows)
    return [
        {
            "sha256": sha,
            "classes": sorted({r["label_name"] for r in group}),
            "keys": [r["key"] for r in group],
            "examples": _examples(group, "label_name"),
        }  # fmt: skip
        for sha, group in sorted(by_sha.items())
        if len({r["label_name"] for r in group}) > 1
    ]


def _duplicates(rows: list[dict]) -> tuple[list[dict], int]:
    by_sha = _by_sha(rows)
    across, within = [], 0
    for sha, group in sorted(by_sha.items()):
        if len(group) < 2:
            continue
        splits = sorted({r["split"] for r in group})
        if len(splits) > 1:
            across.append(
                {
                    "sha256": sha,
                    "splits": splits,
                    "keys": [r["key"] for r in group],
                    "examples": _examples(group, "split"),
                }  # fmt: skip
            )
        else:
            within += len(group) - 1
    return across, within


def prepare(
    manifest: Manifest | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    limit_per_class: int | None = None,
    workers: int | None = None,
    executor: Literal["auto", "processes", "threads"] = "auto",
) -> idx.PreparedDataset:
    """Validate, split and index a dataset; reuse the previous index if unchanged.

    Args:
        manifest: a `Manifest`, a YAML path, or a bare name ("elpv").
        out_dir: folder for index.parquet, summary.json, quarantine.json and
            converted/ (created if needed).
        limit_per_class: keep only the first N examples of each class in each
            source split (in the source's deterministic order); for tests and
            smoke runs. Splits made here (ELPV) are then made from those N.
        workers: how many images are read, hashed and decoded at once; None:
            one per CPU core (at most 16). The index is byte-identical for any
            number of workers and either executor.
        executor: what runs the workers when there are several: "processes"
            (started with "spawn", so a script that calls `prepare` must do so
            under `if __name__ == "__main__":`), "threads" (Pillow's decoders
            and sha256 release the GIL, its header parsing does not: 2 threads
            gave 1.54-1.84x, 2 processes 1.63-2.02x, docs/benchmarks.md), or
            "auto": processes from 1,024 candidates on, else threads
            (starting the processes takes ~0.3 s); threads for encoded
            images already in memory (a Parquet bytes column), which
            processes would be sent pickled.

    Returns:
        A `PreparedDataset`; `reused` is True when nothing changed.

    Raises:
        ManifestError: invalid manifest.
        DataSourceError: the source is missing (message says how to get it).
        PrepareError: a split is empty, a declared class has no example, or
            the worker processes stopped.
    """
    if workers is None:
        workers = min(os.cpu_count() or 1, 16)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"`workers` must be an integer >= 1, received {workers!r}.")
    if executor not in EXECUTORS:
        raise ValueError(
            f"`executor` must be one of {EXECUTORS}, received {executor!r}."
        )
    started = time.time()
    manifest = load_manifest(manifest)
    # Absolute, so the index's converted/ paths and the `out_dir` a run
    # records do not depend on the working folder they are read from.
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)
    is_tfds = isinstance(manifest.source, TfdsSource)

    ignored: list[str] = []
    if is_tfds:
        from thumbnet_keras.data import tfds_source

        class_names = manifest.classes or tfds_source.class_names(manifest.source)
        stream = tfds_source.tfds_candidates(manifest.source, class_names)
    else:
        stream = iter_candidates(manifest, ignored)
    prev = {k: r for k, r in _previous_rows(out).items() if _reusable(r, out)}
    rows, decoded = [], 0
    examined = _examined(limit(stream, limit_per_class), prev, workers, executor)
    for cand, result in examined:
        row, did_decode = _process(cand, result, prev, out, is_tfds)
        rows.append(row)
        decoded += did_decode

    if not is_tfds:
        # Every class folder is a class, also one whose files all fail to
        # decode: it is reported below instead of silently dropped.
        indexed = None if manifest.classes else parquet_index_classes(manifest)
        class_names = (
            manifest.classes
            or indexed
            or sorted({r["label_name"] for r in rows if r["label_name"]})
        )
    if len(class_names) < 2:
        where = {
            "image_folder": "An image folder needs one sub-folder per class: "
            "<root>/<class>/<image>.",
            "parquet": f"A Parquet table's classes are the values of its "
            f"{getattr(manifest.source, 'label_column', '')!r} column"
            + ("; this one has no rows." if not rows else "."),
        }.get(manifest.source.type, "")
        raise PrepareError(
            f"{manifest.name}: a classifier needs at least 2 classes, the data has "
            f"{len(class_names)} ({', '.join(map(repr, class_names)) or 'none'})."
            + (f" {where}" if where else "")
        )
    label_of = {name: i for i, name in enumerate(class_names)}
    for r in rows:
        r["label"] = label_of.get(r["label_name"], -1)
        if r["label"] < 0 and r["status"] != QUARANTINED:
            r.update(
                status=QUARANTINED,
                reason="undeclared_class",
                image_uri=None,
                image_bytes=None,
            )

    payload = [idx.SCHEMA_VERSION, manifest.content_hash(), limit_per_class] + sorted(
        [r["key"], r["sha256"], r["status"]] for r in rows
    )
    with_images = {r["label"] for r in rows if r["status"] != QUARANTINED}
    if (manifest.classes or not is_tfds) and len(with_images) < len(class_names):
        # A class without a usable image is refused below; an index made
        # before that was (the class silently dropped) must not be reused.
        payload.append(["classes", list(class_names)])
    elif not is_tfds and indexed:
        # Integer labels in index order: an index made when they were sorted
        # as names ('10' before '2') must not be reused.
        payload.append(["integer classes", list(class_names)])
    fingerprint = hashlib.sha256(json.dumps(payload).encode()).hexdigest()
    failed_report = out / FAILED_REPORT
    try:
        previous = idx.PreparedDataset.load(out)
        summary = previous.summary()
        if summary.get("fingerprint") == fingerprint:
            if summary.get("validation_rules") != RULES_VERSION:
                # Re-validated under today's rules with the same verdicts:
                # say so, so the next prepare reuses its rows again (not on a
                # read-only folder: then it is re-validated next time too).
                summary["validation_rules"] = RULES_VERSION
                with contextlib.suppress(OSError):
                    idx.write_json(out / idx.SUMMARY_FILE, summary)
                    previous = idx.PreparedDataset.load(out)
            _remove_failed_report(failed_report)
            return previous
    except idx.IndexCorruptError:
        pass

    _assign_splits(rows, manifest)
    quarantined = [r for r in rows if r["status"] == QUARANTINED]
    converted = [r for r in rows if r["status"] == CONVERTED]
    report = {
        "name": manifest.name,
        "quarantined": [
            {"key": r["key"], "source_uri": r["source_uri"], "reason": r["reason"]}
            for r in quarantined
        ],
        "converted": [
            {
                "key": r["key"],
                "source_uri": r["source_uri"],
                "reason": r["reason"],
                "to": idx.resolve_image_uri(out, r["image_uri"]),
            }
            for r in converted
        ],
        "ignored_files": ignored,
    }
    usable = [r for r in rows if r["status"] != QUARANTINED]
    counts = Counter(r["split"] for r in usable)
    # A failed prepare reports beside, never over, the last good index's
    # quarantine report, so that index, its report and summary stay a set.
    for split in _expected_splits(manifest, rows):
        if counts[split] == 0:
            idx.write_json(failed_report, report)
            reasons = Counter(r["reason"] for r in quarantined)
            why = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
            raise PrepareError(
                f"{manifest.name}: split {split!r} has no usable example "
                f"({len(quarantined)} quarantined"
                + (f": {why}" if why else "")
                + f"; see {failed_report})"
            )
    per_class = Counter(r["label"] for r in usable)
    # One pass over the rows: a pass per (split, class) would take ~1.5 min
    # (extrapolated) for ImageNet's 1.28 M rows and 1,000 classes.
    by_split_class = Counter((r["split"], r["label"]) for r in usable)
    empty = [name for i, name in enumerate(class_names) if per_class[i] == 0]
    if empty and (manifest.classes or not is_tfds):
        # Classes declared in the manifest, or found as folders, must have
        # images. Classes taken from a TFDS ClassLabel may legitimately be
        # absent from a limited run; they are listed in the summary's
        # `empty_classes` instead.
        idx.write_json(failed_report, report)
        reasons = Counter(
            (r["label_name"], r["reason"])
            for r in quarantined
            if r["label_name"] in empty
        )

        def why(name):
            found = [f"{n} {reason}" for (c, reason), n in reasons.items() if c == name]
            return f"{name!r} ({', '.join(found) or 'no image'})"

        shown = [why(name) for name in empty[:10]]
        if len(empty) > 10:
            shown.append(f"and {len(empty) - 10} more")
        kind = (
            "declared class(es)"
            if manifest.classes
            else (
                "class folder(s)"
                if manifest.source.type == "image_folder"
                else "class(es)"
            )
        )
        fix = (
            "fix or remove those files, or the class"
            if reasons
            else "add images of them, or remove them from `classes`"
            if manifest.classes
            else "integer labels are class indices counted from 0, so every "
            f"index up to the largest label ({len(class_names) - 1}) is a class: "
            "renumber the labels 0 to K-1, or give `classes:` (one name per "
            "index, in order)"
            if indexed
            else "add images of them"
        )
        undeclared = Counter(
            r["label_name"] for r in quarantined if r["reason"] == "undeclared_class"
        )
        stray = ""
        if undeclared and manifest.classes:
            names = ", ".join(
                f"{name!r} ({n})" for name, n in undeclared.most_common(5)
            )
            stray = (
                f". {sum(undeclared.values())} example(s) carry a label that is not "
                f"in `classes`: {names}{' ...' if len(undeclared) > 5 else ''}; a "
                f"label is one of the names or its index 0..{len(class_names) - 1}"
            )
        raise PrepareError(
            f"{manifest.name}: {kind} {', '.join(shown)} have no usable example; "
            f"{fix} (see {failed_report}){stray}"
        )

    no_images = (
        manifest.source.folders_without_images()
        if manifest.source.type == "image_folder" and not manifest.classes
        else []
    )
    if no_images:
        warnings.warn(
            f"{manifest.name}: folder(s) {', '.join(map(repr, no_images[:10]))} "
            f"under {manifest.source.root!r} hold no image file (names ending in "
            f"{', '.join(manifest.source.extensions)}), so they are not classes.",
            stacklevel=2,
        )
    outputs = (
        manifest.source.output_folders()
        if manifest.source.type == "image_folder"
        else []
    )
    if outputs:
        warnings.warn(
            f"{manifest.name}: skipped {', '.join(map(repr, outputs[:10]))} under "
            f"{manifest.source.root!r}: thumbnet's own runs or prepared data, "
            "never a class.",
            stacklevel=2,
        )
    unused = _unused_test_fraction(manifest, usable)
    if unused:
        warnings.warn(unused, stacklevel=2)
    absent = _classes_absent(class_names, per_class, by_split_class, counts)
    totals = {name: per_class[i] for i, name in enumerate(class_names)}
    for text in absent_texts(manifest.name, absent, totals):
        warnings.warn(text, stacklevel=2)
    across, within = _duplicates(rows)
    if across:
        warnings.warn(duplicates_text(manifest.name, across), stacklevel=2)
    conflicts = _label_conflicts(rows)
    if conflicts:
        warnings.warn(conflicts_text(manifest.name, conflicts), stacklevel=2)
    columns = {name: [r.get(name) for r in rows] for name in idx.INDEX_SCHEMA.names}
    # Order matters: index, then report, then the summary that vouches for both.
    idx.write_index(out / idx.INDEX_FILE, columns)
    idx.write_json(out / idx.QUARANTINE_FILE, report)
    dims = {(r["height"], r["width"]) for r in usable}
    height, width = next(iter(dims)) if len(dims) == 1 else (None, None)
    summary = {
        "schema_version": idx.SCHEMA_VERSION,
        "validation_rules": RULES_VERSION,
        "name": manifest.name,
        "license": manifest.license,
        "source_type": manifest.source.type,
        "manifest_path": manifest.path,
        "manifest": manifest.model_dump(mode="json"),
        "fingerprint": fingerprint,
        "index_sha256": idx.file_sha256(out / idx.INDEX_FILE),
        "limit_per_class": limit_per_class,
        "class_names": class_names,
        "image_shape": [height, width, manifest.image.channels],
        "splits": {s: counts[s] for s in SPLITS if counts[s]},
        "per_class": {
            s: {name: by_split_class[s, i] for i, name in enumerate(class_names)}
            for s in SPLITS
            if counts[s]
        },
        "status": dict(Counter(r["status"] for r in rows)),
        "reasons": dict(Counter(r["reason"] for r in rows if r["reason"])),
        "decoded_this_run": decoded,
        "duplicates_across_splits": across,
        "duplicates_within_split": within,
        "label_conflicts": conflicts,
        "ignored_files": len(ignored),
        "empty_classes": empty,
        "classes_absent_from_split": absent,
        "folders_without_images": no_images,
    }
    idx.write_json(out / idx.SUMMARY_FILE, summary)
    _remove_failed_report(failed_report)  # an earlier failure's, fixed now
    _remove_stale_converted(out, rows, started)
    return idx.PreparedDataset.from_summary(
        str(out), summary, reused=False, decoded=decoded
    )


def _remove_failed_report(path: Path) -> None:
    """Deletes an earlier failed prepare's report, if there is one (only
    then: `unlink` on a read-only mount fails even for a missing file, and
    a prepared folder there is still reused)."""
    if path.exists():
        path.unlink()


def _remove_stale_converted(out: Path, rows: list[dict], started: float) -> None:
    """Deletes the converted copies the new index no longer names (an image
    removed or replaced in the source): they stayed in `converted/` for
    good, a deleted image's pixels included. Files written since this
    preparation `started` are kept: another process preparing the same
    folder may have just written them for its own index."""
    kept = {r["image_uri"] for r in rows if r.get("image_uri")}
    folder = out / idx.CONVERTED_DIR
    if not folder.is_dir():
        return
    for path in folder.glob("*.png"):
        try:
            stale = f"{idx.CONVERTED_DIR}/{path.name}" not in kept
            if stale and path.stat().st_mtime < started:
                path.unlink()
        except OSError:  # gone already, or not ours to delete
            pass
