"""Sources: turn a manifest's `source` into a stream of candidate examples.

A candidate is one image before validation: a stable key, its class name, the
split the source assigns (or None), and where its bytes are (a file, bytes in
memory, or a uint8 array). `prepare` hashes and validates each candidate.
TFDS lives in `tfds_source.py` so that TensorFlow is imported only when a TFDS
manifest is prepared.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from thumbnet_keras.data.manifest import (
    ElpvSource,
    FashionMnistSource,
    ImageFolderSource,
    Manifest,
    ParquetSource,
    is_thumbnet_output,
    walk_entries,
    walk_folders,
)

SPLITS = ("train", "validation", "test")

ELPV_CLASSES = ["0", "1/3", "2/3", "1"]
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


class DataSourceError(RuntimeError):
    """A source cannot be read (missing package, files or folders)."""


@dataclasses.dataclass
class Candidate:
    """One example before validation.

    Attributes:
        key: stable identifier within the dataset (relative path, IDX position).
        label_name: class name as the source gives it.
        source_split: "train"/"validation"/"test" when the source splits, else None.
        uri: a file to read, or None.
        data: encoded image bytes already in memory, or None.
        array: decoded uint8 pixels (IDX sources), or None.
        tfds_index: position in the TFDS split (TFDS sources), else -1.
        tfds_split: the TFDS split name (TFDS sources), else "".
        problem: a quarantine reason known before the file is read (a path
            that is not UTF-8: the index cannot hold it), else None.
    """

    key: str
    label_name: str
    source_split: str | None
    uri: str | None = None
    data: bytes | None = None
    array: np.ndarray | None = None
    tfds_index: int = -1
    tfds_split: str = ""
    problem: str | None = None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a name's undecodable bytes (surrogateescape)
        return False
    return True


def _printable(text: str) -> str:
    """`text` with undecodable bytes written as \\xNN (what the index stores)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def limit(
    candidates: Iterator[Candidate], per_class: int | None
) -> Iterator[Candidate]:
    """The first `per_class` candidates of each (source split, class)."""
    if per_class is None:
        yield from candidates
        return
    seen: dict[tuple, int] = defaultdict(int)
    for cand in candidates:
        group = (cand.source_split, cand.label_name)
        if seen[group] < per_class:
            seen[group] += 1
            yield cand


def elpv_candidates(source: ElpvSource) -> Iterator[Candidate]:
    """ELPV cells from labels.csv; images are read in place (300x300 gray PNG)."""
    if source.labels_csv:
        csv = Path(source.labels_csv).expanduser()
    else:
        try:
            import elpv_dataset.utils as elpv_utils
        except ImportError as err:
            raise DataSourceError(
                "the ELPV manifest needs the PyPI package elpv-dataset: "
                "pip install 'thumbnet-keras[datasets]' (or pip install elpv-dataset)"
            ) from err
        csv = Path(elpv_utils.__file__).parent / "data" / "labels.csv"
    if not csv.is_file():
        raise DataSourceError(f"ELPV labels file not found: {csv}")
    # Same parsing as elpv_dataset.utils.load_dataset, without decoding all images.
    table = np.genfromtxt(
        csv, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"]
    )
    for rel, prob in zip(
        np.char.decode(table["path"]), table["probability"], strict=True
    ):
        name = ELPV_CLASSES[int(round(float(prob) * 3))]
        yield Candidate(
            key=rel, label_name=name, source_split=None, uri=str(csv.parent / rel)
        )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype_code != 0x08:
        raise DataSourceError(f"{path}: not a uint8 IDX file")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_files(source: FashionMnistSource) -> dict[str, tuple[Path, Path]]:
    """split -> (images, labels) IDX paths; raises with the apt command if absent."""
    root = Path(source.directory)
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        pair = []
        for kind in ("images-idx3", "labels-idx1"):
            options = [root / f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
            found = next((p for p in options if p.is_file()), None)
            if found is None:
                raise DataSourceError(
                    f"Fashion-MNIST IDX file {options[0]} not found. Install the "
                    "Debian package: apt-get install dataset-fashion-mnist "
                    f"(or point source.directory at a folder holding {options[0].name})"
                )
            pair.append(found)
        files[split] = (pair[0], pair[1])
    return files


def fashion_mnist_candidates(source: FashionMnistSource) -> Iterator[Candidate]:
    """Fashion-MNIST 60k/10k from the Debian package's IDX files."""
    for split, (images_path, labels_path) in fashion_mnist_files(source).items():
        images, labels = _read_idx(images_path), _read_idx(labels_path)
        if len(images) != len(labels):
            raise DataSourceError(
                f"{images_path}: {len(images)} images, {len(labels)} labels"
            )
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield Candidate(
                key=f"{split}/{i:05d}",
                label_name=FASHION_MNIST_CLASSES[int(label)],
                source_split=split,
                array=image,
            )


def image_folder_candidates(
    source: ImageFolderSource, ignored: list[str] | None = None
) -> Iterator[Candidate]:
    """root/[<split_dir>/]<class>/**/<file> with an image extension.

    Files without an image extension, and hidden files (.DS_Store, macOS's
    ._IMG_1.JPG), are skipped and appended to `ignored`; hidden folders, and
    thumbnet's own run and prepared-data folders (`is_thumbnet_output`),
    are skipped whole.
    Anything with an image extension is a candidate, even a directory or a
    text file: validation decides.
    """
    # Absolute (a relative root is read from the working folder), so the
    # index's paths do not depend on where it is read from.
    root = Path(source.root).expanduser().absolute()
    if not root.is_dir():
        found = "is a file, not a folder" if root.is_file() else "not found"
        raise DataSourceError(f"image folder root {found}: {root}")
    extensions = tuple(e.lower() for e in source.extensions)
    groups = (
        [(None, root)]
        if source.split_dirs is None
        else [(split, root / d) for split, d in source.split_dirs.items()]
    )
    for split, folder in groups:
        if not folder.is_dir():
            raise DataSourceError(f"split folder for {split!r} not found: {folder}")
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name.startswith(".") or is_thumbnet_output(class_dir):
                continue  # hidden, or thumbnet's own runs / prepared data
            for path in sorted(walk_entries(class_dir)):
                rel = path.relative_to(root).as_posix()
                parts = path.relative_to(folder).parts
                if any(part.startswith(".") for part in parts[:-1]):
                    continue  # inside a hidden folder (.git, .thumbnails)
                if parts[-1].startswith("."):
                    # .DS_Store, macOS's ._IMG_1.JPG: never images, but named.
                    if path.is_file() and ignored is not None:
                        ignored.append(_printable(rel))
                    continue
                if path.name.lower().endswith(extensions):
                    if not _is_utf8(str(path)):
                        # Arrow's strings are UTF-8: quarantined, shown escaped.
                        yield Candidate(
                            key=_printable(rel),
                            label_name=_printable(class_dir.name),
                            source_split=split,
                            problem="non_utf8_path",
                        )
                        continue
                    yield Candidate(
                        key=rel,
                        label_name=class_dir.name,
                        source_split=split,
                        uri=str(path),
                    )
                elif path.is_file() and ignored is not None:
                    ignored.append(_printable(rel))


def _arrow_kind(arrow_type) -> str | None:
    """ "bytes" for a binary Arrow type, "string" for a string one (plain,
    large, view or dictionary-encoded), "struct", else None."""
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    if t.is_binary(arrow_type) or t.is_large_binary(arrow_type):
        return "bytes"
    if t.is_binary_view(arrow_type):
        return "bytes"
    if t.is_string(arrow_type) or t.is_large_string(arrow_type):
        return "string"
    if t.is_string_view(arrow_type):
        return "string"
    return "struct" if t.is_struct(arrow_type) else None


def _parquet_image_kind(path: Path, source: ParquetSource, arrow_type) -> str:
    """ "bytes", "path" or "struct" (Hugging Face datasets' `{bytes, path}`)
    from the image column's Arrow type; refuses any other type, and an
    `image_kind` the column's type contradicts."""
    found = _arrow_kind(arrow_type)
    names = (
        {arrow_type.field(i).name for i in range(arrow_type.num_fields)}
        if found == "struct"
        else set()
    )
    if found == "struct" and names & {"bytes", "path"}:
        return "struct"  # `image_kind` then picks a field (`parquet_candidates`).
    kind = {"bytes": "bytes", "string": "path"}.get(found)
    if kind is None:
        raise DataSourceError(
            f"{path}: column {source.image_column!r} is {arrow_type}; an image "
            "column holds encoded image bytes (binary), file paths (string), or "
            "Hugging Face datasets' struct<bytes, path>."
        )
    if source.image_kind not in ("auto", kind):
        held = "image bytes (binary)" if kind == "bytes" else "strings (file paths)"
        raise DataSourceError(
            f"{path}: column {source.image_column!r} holds {held}, but the "
            f"manifest says image_kind: {source.image_kind}. Set image_kind: {kind}, "
            "or leave it out (it follows the column's type)."
        )
    return kind


def _parquet_label_names(
    path: Path, source: ParquetSource, column, classes: list[str] | None
) -> list[str]:
    """Each row's class name: a string label as it is, an integer one as
    `classes[i]` (or its digits). Refuses empty (null) labels and labels of
    any other type (a float label is not a class)."""
    import pyarrow as pa

    arrow_type = column.type
    kind_of = (
        arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    )
    integer = pa.types.is_integer(kind_of)
    if not (integer or _arrow_kind(kind_of) == "string"):
        raise DataSourceError(
            f"{path}: column {source.label_column!r} is {arrow_type}; a label is a "
            "class name (string) or a class index (integer)."
        )
    labels = column.to_pylist()
    empty = [i for i, label in enumerate(labels) if label is None]
    if empty:
        rows = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        raise DataSourceError(
            f"{path}: column {source.label_column!r} is empty (null) in "
            f"{len(empty)} row(s) (rows {rows}); give every row a label, or drop "
            "those rows."
        )
    if not integer:
        return labels
    # An integer label is the class index it says: `classes[i]` where the
    # manifest names them, else "i". One outside them (a -1 "unlabelled", say)
    # is quarantined as an undeclared class, as a name not in `classes` is.
    return [
        classes[label] if classes and 0 <= label < len(classes) else str(label)
        for label in labels
    ]


def parquet_index_classes(manifest: Manifest) -> list[str] | None:
    """The classes of a Parquet source with integer labels and no `classes`
    in the manifest: "0" to the largest label, in index order (a negative
    label is no class: its rows are quarantined as undeclared). (Sorted as
    names, label 10 came before 2, and every class from 2 on was silently
    renumbered: a teacher trained on the table's integers disagreed with
    the run.) None for any other source, or when the table cannot be read
    (the candidates' reading then says why)."""
    src = manifest.source
    if manifest.classes or not isinstance(src, ParquetSource):
        return None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(
            Path(src.path).expanduser(), columns=[src.label_column]
        ).column(0)
    except Exception:  # noqa: BLE001 - parquet_candidates names the problem
        return None
    kind = (
        column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    )
    if not pa.types.is_integer(kind):
        return None  # Names (strings): sorted by `prepare`.
    labels = [v for v in column.to_pylist() if v is not None and v >= 0]
    if not labels:
        return None
    return [str(i) for i in range(max(labels) + 1)]


def _struct_image(image: dict | None, image_kind: str) -> tuple[str, object]:
    """A Hugging Face `{bytes, path}` row as ("bytes", data) or ("path",
    path): the bytes where given (`auto`) or only those (`bytes`), the
    path otherwise (or only it, `path`); ("path", None) when it has neither."""
    image = image or {}
    if image_kind != "path" and image.get("bytes") is not None:
        return "bytes", image["bytes"]
    return "path", image.get("path") if image_kind != "bytes" else None


def parquet_candidates(
    source: ParquetSource, classes: list[str] | None
) -> Iterator[Candidate]:
    """Rows of a Parquet table: image bytes, a path or Hugging Face datasets'
    `{bytes, path}` struct (as the column's type says), label, optional split.
    A row without an image (null) is quarantined as `missing`."""
    import pyarrow.parquet as pq

    path = Path(source.path).expanduser()
    if not path.is_file():
        raise DataSourceError(f"Parquet source not found: {path}")
    columns = [source.image_column, source.label_column]
    if source.split_column:
        columns.append(source.split_column)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow's ArrowInvalid, OSError, ...
        raise DataSourceError(f"{path}: not a readable Parquet file ({err})") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataSourceError(
            f"{path}: missing column(s) {missing}; has {table.column_names}"
        )
    kind = _parquet_image_kind(
        path, source, table.schema.field(source.image_column).type
    )
    base = _parquet_base(source, path)
    images = table.column(source.image_column).to_pylist()
    names = _parquet_label_names(
        path, source, table.column(source.label_column), classes
    )
    splits = (
        table.column(source.split_column).to_pylist()
        if source.split_column
        else [None] * len(images)
    )
    for i, (image, name, split) in enumerate(zip(images, names, splits, strict=True)):
        if split == "":  # empty, as null: drawn by `split` (docs/data.md)
            split = None
        if split is not None and split not in SPLITS:
            raise DataSourceError(
                f"{path}: row {i}: split {split!r} not in {SPLITS} (null or empty: "
                "drawn by the manifest's `split` fractions)"
            )
        cand = Candidate(key=f"row/{i:08d}", label_name=name, source_split=split)
        row_kind = kind
        if kind == "struct":
            row_kind, image = _struct_image(image, source.image_kind)
        if image is None:
            cand.uri = ""  # No such file: quarantined as `missing`.
        elif row_kind == "bytes":
            cand.data = bytes(image)
        else:
            p = Path(os.fspath(image)).expanduser()
            cand.uri = str(p if p.is_absolute() else base / p)
            cand.key = f"row/{i:08d}/{Path(image).as_posix()}"
        yield cand


def _parquet_base(source: ParquetSource, table: Path) -> Path:
    """The folder a table's relative image paths start from."""
    return (
        Path(source.base_dir).expanduser() if source.base_dir else table.parent
    ).absolute()


def _parquet_paths(source: ParquetSource, table: Path) -> list[Path]:
    """The files a table's rows name (its paths; of a Hugging Face struct
    column, the `path` field), read without its image bytes."""
    import pyarrow.parquet as pq

    found = _arrow_kind(pq.read_schema(table).field(source.image_column).type)
    if source.image_kind == "bytes" or found not in ("string", "struct"):
        return []
    column = source.image_column + (".path" if found == "struct" else "")
    try:
        values = pq.read_table(table, columns=[column]).column(0).to_pylist()
    except (KeyError, ValueError):  # A struct without a `path` field.
        return []
    base = _parquet_base(source, table)
    return [base / Path(p).expanduser() for p in values if p]


def _source_roots(manifest: Manifest) -> list[Path]:
    """The files and folders a manifest's source reads (for `source_stamp`)."""
    src = manifest.source
    if isinstance(src, ImageFolderSource):
        return [Path(src.root).expanduser()]
    if isinstance(src, FashionMnistSource):
        return [Path(src.directory)]
    if isinstance(src, ElpvSource):
        if src.labels_csv:
            return [Path(src.labels_csv).expanduser().parent]
        import elpv_dataset.utils as elpv_utils

        return [Path(elpv_utils.__file__).parent / "data"]
    if isinstance(src, ParquetSource):
        table = Path(src.path).expanduser()
        return [table, *_parquet_paths(src, table)]
    from thumbnet_keras.data.tfds_source import data_dir

    build = Path(data_dir(src)) / src.name.split(":")[0].split("/")[0]
    if not build.is_dir():
        # Prepare will build it (from the manual files): what the records
        # will hold is not known yet, so nothing may be cached on it (a
        # deleted build and changed archives matched a first run's key).
        # The manual files themselves are not stamped: a build made here
        # records them and is refused once they change
        # (`tfds_source.builder`), and deleting them after the build is no
        # change.
        raise FileNotFoundError(f"TFDS build {build} not there yet")
    return [build]


def _walk_files(root: Path) -> list[Path]:
    """Every file under `root`, sorted, hidden ones included, following
    folder links once each, as the image folder source does
    (`walk_folders`)."""
    return sorted(
        Path(folder, name) for folder, _, names in walk_folders(root) for name in names
    )


def source_stamp(manifest: Manifest) -> str:
    """A digest of the path, size and modification time of every file the
    manifest's source reads (no file is read): it changes when a file is
    replaced, added or removed. The flows' prepare cache keys on it, so a
    source changed under an unchanged manifest is prepared again.

    Raises:
        Exception: whatever reading the source's listing raises (a missing
            package or table): the caller does not cache then.
    """
    digest = hashlib.sha256()
    for root in _source_roots(manifest):
        for path in _walk_files(root) if root.is_dir() else [root]:
            try:
                st = path.stat()
                digest.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{path}|missing\n".encode())
    return digest.hexdigest()


def iter_candidates(
    manifest: Manifest, ignored: list[str] | None = None
) -> Iterator[Candidate]:
    """Candidates of a non-TFDS manifest, in a deterministic order."""
    src = manifest.source
    if isinstance(src, ElpvSource):
        return elpv_candidates(src)
    if isinstance(src, FashionMnistSource):
        return fashion_mnist_candidates(src)
    if isinstance(src, ImageFolderSource):
        return image_folder_candidates(src, ignored)
    if isinstance(src, ParquetSource):
        return parquet_candidates(src, manifest.classes)
    raise TypeError(f"iter_candidates does not handle source type {src.type!r}")
