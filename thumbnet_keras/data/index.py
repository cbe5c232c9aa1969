"""The prepared index: a Parquet table, a JSON summary, a quarantine report.

Layout of `out_dir` after `prepare`:

    index.parquet      one row per candidate example (schema `INDEX_SCHEMA`)
    summary.json       counts per split and class, the input fingerprint,
                       and the sha256 of index.parquet (written last)
    quarantine.json    every quarantined and converted example with its reason
    converted/<sha256>.png   8-bit PNGs made from files that needed converting

Every file is written to a temporary name in `out_dir` and moved into place
with `os.replace` (atomic on POSIX). The summary is written last and records
the index's sha256, so a run killed at any point leaves either the previous
consistent state or a state that `PreparedDataset.load` rejects: an index
without a matching summary is never trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 2  # 2: the orientation column
INDEX_FILE = "index.parquet"
SUMMARY_FILE = "summary.json"
QUARANTINE_FILE = "quarantine.json"
CONVERTED_DIR = "converted"

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # stable id within the dataset
        # file the pipeline reads (null: bytes/TFDS); see `resolve_image_uri`
        ("image_uri", pa.string()),
        ("image_bytes", pa.binary()),  # encoded image when not a file
        ("source_uri", pa.string()),  # the original file, if any
        ("label", pa.int32()),  # class index (-1 when quarantined as undeclared)
        ("label_name", pa.string()),
        ("split", pa.string()),  # train / validation / test ("" when quarantined)
        ("source_split", pa.string()),  # split given by the source ("" if none)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("channels", pa.int8()),
        # EXIF orientation applied after decoding (1: upright); see validate.py
        ("orientation", pa.int8()),
        ("sha256", pa.string()),  # of the original bytes ("" if unreadable)
        ("status", pa.string()),  # ok / converted / quarantined
        ("reason", pa.string()),
        ("tfds_split", pa.string()),
        ("tfds_index", pa.int64()),
    ]
)


class IndexCorruptError(RuntimeError):
    """A prepared index is missing, half-written or does not match its summary."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_sha256(path: str | os.PathLike, ignore: tuple[str, ...] = ()) -> str:
    """sha256 hex digest of a folder's files: each file's relative path and
    `file_sha256`, in sorted order (so renaming, adding, removing or editing
    any file changes it; timestamps do not). Files named in `ignore` are
    left out."""
    root = Path(path)
    h = hashlib.sha256()
    files = (p for p in root.rglob("*") if p.is_file() and p.name not in ignore)
    for file in sorted(files):
        h.update(file.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_sha256(file).encode() + b"\n")
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, fsync, then rename tmp_path onto `path`.

    If `write` raises, the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    atomic_write(path, _write)


def write_index(path: str | os.PathLike, rows: dict[str, list]) -> None:
    """Atomically write the index table (columns of `INDEX_SCHEMA`)."""
    table = pa.table(rows, schema=INDEX_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def resolve_image_uri(out_dir: str | os.PathLike, uri: str | None) -> str | None:
    """The file an index row's `image_uri` names.

    Source files are recorded as absolute paths. Converted files are
    recorded relative to the prepared folder (`converted/<sha256>.png`), so
    the folder can be moved or read from any working folder. Indexes written
    before either rule hold paths relative to the working folder `prepare`
    ran in: a converted file is still found in `out_dir`; a source file is
    read from the current working folder, as before.
    """
    if not uri or os.path.isabs(uri):
        return uri
    parts = Path(uri).parts
    if len(parts) >= 2 and parts[-2] == CONVERTED_DIR:
        return os.path.join(os.path.abspath(out_dir), CONVERTED_DIR, parts[-1])
    return os.path.abspath(uri)


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A dataset that `prepare` validated and indexed.

    Attributes:
        out_dir: the folder holding index, summary and quarantine report.
        name: manifest name.
        class_names: class names in label order.
        num_classes: len(class_names).
        splits: usable examples per split, e.g. {"train": 1968, "test": 656}.
        image_shape: (H, W, C) of the source images; H or W None if they vary.
        source_type: the manifest's source type (elpv, tfds, ...).
        manifest: the manifest fields (JSON form), used by TFDS pipelines.
        normalization: the manifest's default pipeline normalization.
        reused: True when the previous index was reused unchanged.
        decoded: images decoded by the run that produced this object.
    """

    out_dir: str
    name: str
    class_names: list[str]
    num_classes: int
    splits: dict[str, int]
    image_shape: tuple[int | None, int | None, int]
    source_type: str
    manifest: dict
    normalization: str = "unit"
    reused: bool = False
    decoded: int = 0

    @property
    def index_path(self) -> str:
        """Path of index.parquet."""
        return os.path.join(self.out_dir, INDEX_FILE)

    @property
    def summary_path(self) -> str:
        """Path of summary.json."""
        return os.path.join(self.out_dir, SUMMARY_FILE)

    @property
    def quarantine_path(self) -> str:
        """Path of quarantine.json (the quarantine report)."""
        return os.path.join(self.out_dir, QUARANTINE_FILE)

    def summary(self) -> dict:
        """The parsed summary.json."""
        with open(self.summary_path) as f:
            return json.load(f)

    def read_index(self, columns: list[str] | None = None) -> pa.Table:
        """The index table (optionally only some columns)."""
        return pq.read_table(self.index_path, columns=columns)

    def image_path(self, uri: str | None) -> str | None:
        """The file an index row's `image_uri` names (`resolve_image_uri`)."""
        return resolve_image_uri(self.out_dir, uri)

    def changed_files(self, splits: tuple[str, ...]) -> list[tuple[str, str]]:
        """The files the pipeline reads for `splits` that are no longer the
        ones prepared, as `(path, reason)`: "missing", "unreadable: ...", or
        "content changed" (a source file whose sha256 differs from the
        index's). This folder's own converted copies are only checked for
        being there; images held in the index (bytes, TFDS) cannot change.
        Reads every source file of the splits (hashed on a few threads)."""
        from concurrent.futures import ThreadPoolExecutor

        from thumbnet_keras.data.validate import OK, QUARANTINED

        table = self.read_index(
            ["image_uri", "image_bytes", "split", "status", "sha256"]
        ).to_pydict()
        rows = [
            (self.image_path(uri), status, sha)
            for uri, blob, split, status, sha in zip(
                table["image_uri"],
                table["image_bytes"],
                table["split"],
                table["status"],
                table["sha256"],
                strict=True,
            )  # fmt: skip
            if split in splits and uri and not blob and status != QUARANTINED
        ]

        def check(row: tuple[str, str, str]) -> tuple[str, str] | None:
            path, status, sha = row
            if not os.path.exists(path):
                return path, "missing"
            if status != OK:  # a converted copy: ours, named by its source
                return None
            try:
                now = file_sha256(path)
            except OSError as err:
                return path, f"unreadable: {err.strerror or err}"
            return None if now == sha else (path, "content changed")

        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            return [found for found in pool.map(check, rows) if found]

    @classmethod
    def from_summary(cls, out_dir: str, summary: dict, **extra: Any) -> PreparedDataset:
        """Build from a summary dict (as written by `prepare`)."""
        return cls(
            out_dir=str(out_dir),
            name=summary["name"],
            class_names=list(summary["class_names"]),
            num_classes=len(summary["class_names"]),
            splits=dict(summary["splits"]),
            image_shape=tuple(summary["image_shape"]),
            source_type=summary["source_type"],
            manifest=summary["manifest"],
            normalization=summary["manifest"].get("normalization", "unit"),
            **extra,
        )

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> PreparedDataset:
        """Open a prepared dataset, checking that index and summary agree.

        Raises:
            IndexCorruptError: no summary, unreadable summary, or an index whose
                sha256 differs from the one the summary recorded.
        """
        out_dir = str(out_dir)
        summary_path = os.path.join(out_dir, SUMMARY_FILE)
        index_path = os.path.join(out_dir, INDEX_FILE)
        try:
            with open(summary_path) as f:
                summary = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise IndexCorruptError(
                f"{out_dir}: no readable {SUMMARY_FILE}: {err}"
            ) from err
        if summary.get("schema_version") != SCHEMA_VERSION:
            raise IndexCorruptError(
                f"{summary_path}: schema_version is not {SCHEMA_VERSION}"
            )
        if not os.path.isfile(index_path):
            raise IndexCorruptError(f"{index_path} is missing")
        if file_sha256(index_path) != summary.get("index_sha256"):
            raise IndexCorruptError(
                f"{index_path} does not match {SUMMARY_FILE} (half-written or edited); "
                "run prepare again"
            )
        return cls.from_summary(out_dir, summary, reused=True)
