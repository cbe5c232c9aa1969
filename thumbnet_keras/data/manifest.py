"""Dataset manifests: one YAML file per dataset, validated by a pydantic schema.

A manifest says where the images come from (`source`), which classes exist,
how the examples are split, and under which licence the data may be used.
Every model forbids unknown fields, so a typo fails loudly; `load_manifest`
turns a pydantic error into a `ManifestError` that names the file and the
field.

Example:
    >>> from thumbnet_keras import data
    >>> m = data.load_manifest("elpv")          # data_manifests/elpv.yaml
    >>> m.source.type, m.split.test_fraction
    ('elpv', 0.25)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from thumbnet_keras.data.index import INDEX_FILE, SUMMARY_FILE

MANIFEST_DIR_ENV = "THUMBNET_MANIFEST_DIR"


class ManifestError(ValueError):
    """A manifest file is missing, unparsable, or does not match the schema."""


class _Strict(BaseModel):
    # NaN and infinity are refused as numbers ("Input should be a finite
    # number"): `test_fraction: .nan` was told "should be less than 1".
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ElpvSource(_Strict):
    """The PyPI package `elpv-dataset` (300x300 gray solar-cell images)."""

    type: Literal["elpv"]
    labels_csv: str | None = Field(
        None,
        description="labels.csv of the ELPV set; default: the one inside the "
        "installed elpv_dataset package (images are read in place).",
    )


class FashionMnistSource(_Strict):
    """The Debian package `dataset-fashion-mnist` (gzipped IDX files)."""

    type: Literal["fashion_mnist"]
    directory: str = Field(
        "/usr/share/datasets/fashion-mnist",
        description="Folder with {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.",
    )


def _is_output(folder: Path) -> bool:
    """A prepared-data folder (its index and summary) or a run folder (its
    config.json beside its stage records or lock)."""
    if (folder / INDEX_FILE).is_file() and (folder / SUMMARY_FILE).is_file():
        return True
    return (folder / "config.json").is_file() and (
        (folder / "stages").is_dir() or (folder / ".lock").is_file()
    )


def walk_folders(root: Path, hidden: bool = True):
    """`os.walk(root)`'s `(folder, dirs, names)`, following folder links but
    never into a folder twice (a link loop); with `hidden` False, not into
    hidden folders (.git, .thumbnails). `Path.rglob` does not follow linked
    folders (Python 3.11): images in a linked sub-folder of a class folder
    were left out in silence, while a linked class folder was read."""
    seen = set()
    for folder, dirs, names in os.walk(root, followlinks=True):
        try:
            st = os.stat(folder)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield folder, dirs, names


def walk_entries(root: Path):
    """Every file and folder under `root` (not `root` itself), through
    folder links, not into hidden folders (`walk_folders`)."""
    for folder, dirs, names in walk_folders(root, hidden=False):
        for name in dirs + names:
            yield Path(folder, name)


def _subfolders(folder: Path) -> list[Path]:
    """`folder`'s sub-folders (`os.scandir`: no stat per file on most file
    systems), [] when it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def is_thumbnet_output(folder: Path, depth: int = 2) -> bool:
    """Whether `folder` is thumbnet's own output: a run or prepared-data
    folder, or a folder holding them up to `depth` levels down (`runs/`,
    `runs/_data/`, a `--data-dir`). Such a folder inside an image folder's
    root is never a class: a run's report images (or a preparation's
    converted copies) were trained on as a class named 'runs' by the next
    run over `root: .`."""
    if _is_output(folder):
        return True
    return depth > 0 and any(
        is_thumbnet_output(c, depth - 1) for c in _subfolders(folder)
    )


class ImageFolderSource(_Strict):
    """`root/<class_name>/*.{jpg,png,...}`, optionally under split folders."""

    type: Literal["image_folder"]
    root: str = Field(..., description="Folder holding the class folders.")
    split_dirs: dict[Literal["train", "validation", "test"], str] | None = Field(
        None,
        description="Optional split folders, e.g. {train: train, test: val}: "
        "root/<split_dir>/<class_name>/<file>. None: one pool, split by `split`.",
    )
    extensions: list[str] = Field(
        [".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"],
        description="File names ending in these (case-insensitive) are candidates; "
        "every candidate is decoded and validated.",
    )

    def class_folders(self) -> list[str] | None:
        """The class names the folders declare: each (non-hidden) class
        folder holding at least one candidate file, the union over
        `split_dirs`, sorted; found without reading an image (the listing
        stops at a folder's first candidate). None when a folder is missing
        (`prepare` reports it). Preparation takes these same classes, and
        refuses a class folder whose files are all broken (naming it)."""
        found = self._folders()
        if found is None:
            return None
        return sorted({p.name for p, has_image in found if has_image})

    def folders_without_images(self) -> list[str]:
        """Sub-folders (of the root or a split folder) holding no candidate
        file: not classes, so a user who meant one as a class is told."""
        found = self._folders() or []
        root = Path(self.root).expanduser()
        return sorted(
            str(p.relative_to(root)) for p, has_image in found if not has_image
        )

    def _candidate_folders(self) -> list[Path] | None:
        """The non-hidden sub-folders of the root or of each split folder,
        sorted; None when a folder is missing."""
        root = Path(self.root).expanduser()
        splits = [""] if self.split_dirs is None else self.split_dirs.values()
        folders = [root / d for d in splits]
        if not all(f.is_dir() for f in folders):
            return None
        return [
            p
            for f in folders
            for p in sorted(f.iterdir())
            if p.is_dir() and not p.name.startswith(".")
        ]

    def _folders(self) -> list[tuple[Path, bool]] | None:
        found = self._candidate_folders()
        if found is None:
            return None
        extensions = tuple(e.lower() for e in self.extensions)
        return [
            (p, any(c.name.lower().endswith(extensions) for c in walk_entries(p)))
            for p in found
            if not is_thumbnet_output(p)
        ]

    def output_folders(self) -> list[str]:
        """Sub-folders (of the root or a split folder) that are thumbnet's
        own runs or prepared data (`is_thumbnet_output`): skipped, never
        classes."""
        root = Path(self.root).expanduser()
        return sorted(
            str(p.relative_to(root))
            for p in self._candidate_folders() or []
            if is_thumbnet_output(p)
        )


class ParquetSource(_Strict):
    """A Parquet table with an image (path or bytes) column and a label column."""

    type: Literal["parquet"]
    path: str = Field(..., description="The Parquet file.")
    image_column: str = Field(
        "image",
        description="Column with encoded image bytes (binary), file paths "
        "(string), or Hugging Face datasets' struct<bytes, path>.",
    )
    image_kind: Literal["auto", "path", "bytes"] = Field(
        "auto",
        description="What image_column holds; auto: what its type says (binary: "
        "bytes, string: paths; of a struct<bytes, path>, the bytes where given).",
    )
    label_column: str = Field("label", description="Class name (string) or index.")
    split_column: str | None = Field(
        None, description="Optional column with train/validation/test values."
    )
    base_dir: str | None = Field(
        None, description="Relative paths are relative to this (default: the table)."
    )


class TfdsSource(_Strict):
    """A TensorFlow Datasets builder, read from a local data_dir only."""

    type: Literal["tfds"]
    name: str = Field(..., description="TFDS builder name, e.g. imagenet2012.")
    data_dir: str | None = Field(
        None,
        description="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
    )
    manual_dir: str | None = Field(
        None,
        description="Folder with manually downloaded archives (imagenet2012: "
        "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar).",
    )
    manual_files: list[str] = Field(
        [], description="Files that must be in manual_dir before a local build."
    )
    download: bool = Field(
        False, description="Allow TFDS to download. Off: nothing leaves the machine."
    )
    splits: dict[Literal["train", "validation", "test"], str] = Field(
        {"train": "train", "test": "validation"},
        description="Prepared split name -> TFDS split name.",
    )
    image_key: str = "image"
    label_key: str = "label"


Source = Annotated[
    ElpvSource | FashionMnistSource | ImageFolderSource | ParquetSource | TfdsSource,
    Field(discriminator="type"),
]


class SplitSpec(_Strict):
    """How examples are assigned to train / validation / test.

    Sources with their own split (Fashion-MNIST, TFDS, split folders, a split
    column) keep it; the others are split here, stratified by class.
    `validation_fraction` carves a stratified validation subset out of train
    (fixed seed), for choosing epochs and hyper-parameters without touching
    test; sources that bring their own validation split keep it instead.
    Defaults to 10%; 0 for none (runs then keep their last epoch).
    """

    test_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="Used only when the source has no test split."
    )
    validation_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of train moved to validation (unless the source "
        "has a validation split).",
    )
    seed: int = Field(0, description="Seed of the stratified permutation.")


class ImageSpec(_Strict):
    """Shape of the source images as published (informative; checked in tests)."""

    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    channels: Literal[1, 3]


class Manifest(_Strict):
    """A dataset manifest (see `data_manifests/*.yaml`)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    description: str
    license: str = Field(..., description="Data licence, e.g. CC BY-NC-SA 4.0.")
    citation: str | None = None
    homepage: str | None = None
    source: Source
    classes: list[str] | None = Field(
        None,
        description="Class names in label order. Every declared class must have "
        "examples. None: sorted names found in the source (TFDS: its ClassLabel).",
    )
    image: ImageSpec
    split: SplitSpec = SplitSpec()
    normalization: Literal["unit", "symmetric", "imagenet", "raw"] = Field(
        "unit",
        description="The values a `.keras` teacher is fed: unit [0, 1], symmetric "
        "[-1, 1], imagenet (mean/std), raw [0, 255] (a model that normalizes "
        "inside). applications: and keras_hub: teachers always get raw.",
    )
    path: str | None = Field(None, exclude=True, description="Set by load_manifest.")

    @field_validator("classes")
    @classmethod
    def _classes_are_unique(cls, classes: list[str] | None) -> list[str] | None:
        repeated = sorted({c for c in classes or [] if classes.count(c) > 1})
        if repeated:
            raise ValueError(
                f"{', '.join(map(repr, repeated))} listed more than once; each "
                "class is named once, in label order"
            )
        return classes

    @model_validator(mode="after")
    def _fractions_are_used(self) -> Manifest:
        """A fraction above 0 that preparation would not use is refused,
        naming why: a split the source brings itself is kept, and where every
        image takes its split from the source, no test split is drawn."""
        own = self.source_splits()
        if own is None:
            return self
        given = self.split.model_fields_set
        test, validation = self.split.test_fraction, self.split.validation_fraction
        if "test_fraction" in given and test:
            if "test" in own:
                why = f"the source brings its own test split ({own['test']}), which is kept"
                fix = "Remove split.test_fraction (or set it to 0)"
            else:
                splits = ", ".join(f"{k}: {v}" for k, v in own.items())
                why = (
                    f"every image takes its split from the source ({splits}), "
                    "so none is drawn for test"
                )
                fix = (
                    "Give the source a test split (e.g. a test folder in "
                    "split_dirs), or remove split.test_fraction"
                )
            raise ValueError(f"split.test_fraction {test:g} is unused: {why}. {fix}.")
        if "validation_fraction" in given and validation and "validation" in own:
            raise ValueError(
                f"split.validation_fraction {validation:g} is unused: the source "
                f"brings its own validation split ({own['validation']}), which is "
                "kept. Remove split.validation_fraction (or set it to 0), or drop "
                "the source's validation split to carve one from train."
            )
        return self

    def source_splits(self) -> dict[str, str] | None:
        """The splits the source assigns every image to, known from the
        manifest alone, each with where it comes from (split folders, TFDS
        splits, Fashion-MNIST's files); None when the images are split here
        from one pool, or when that is known only once read (a Parquet
        `split_column`)."""
        source = self.source
        if isinstance(source, ImageFolderSource) and source.split_dirs:
            return {k: f"folder {v!r}" for k, v in source.split_dirs.items()}
        if isinstance(source, TfdsSource):
            return {k: f"TFDS split {v!r}" for k, v in source.splits.items()}
        if isinstance(source, FashionMnistSource):
            return {"train": "the train files", "test": "the t10k files"}
        return None

    def class_count(self) -> int | None:
        """The number of classes known without preparing: the declared
        `classes`, or an image folder's class folders; None otherwise (TFDS
        metadata, Parquet labels: known once prepared)."""
        if self.classes:
            return len(self.classes)
        if isinstance(self.source, ImageFolderSource):
            folders = self.source.class_folders()
            return len(folders) if folders else None
        return None

    def content_hash(self) -> str:
        """sha256 of the manifest's fields (not its file path)."""
        fields = self.model_dump(mode="json")
        if fields["source"].get("image_kind") == "auto":
            # As before `auto` (2026-11-29) was the default: a Parquet
            # manifest that leaves image_kind out keeps its hash, so its
            # prepared data and unfinished runs are still its own.
            fields["source"]["image_kind"] = "path"
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def manifest_dirs() -> list[Path]:
    """Folders searched for a bare manifest name, in order.

    `$THUMBNET_MANIFEST_DIR`, then `data_manifests/` of the repository this
    package lives in (an editable install or a checkout), then
    `./data_manifests`.
    """
    dirs = []
    if os.environ.get(MANIFEST_DIR_ENV):
        dirs.append(Path(os.environ[MANIFEST_DIR_ENV]))
    dirs.append(Path(__file__).resolve().parents[2] / "data_manifests")
    dirs.append(Path.cwd() / "data_manifests")
    return dirs


def _resolve(path_or_name: str | os.PathLike) -> Path:
    text = os.fspath(path_or_name)
    candidate = Path(text).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in text or candidate.exists():
        if candidate.is_dir():
            raise ManifestError(
                f"{candidate} is a folder; a dataset is a manifest file. For a "
                "folder of class sub-folders, write e.g. my_images.yaml with: "
                f"name: my_images, description: ..., license: ..., source: "
                f"{{type: image_folder, root: '{candidate}'}}, image: {{channels: 3}} "
                "(docs/data.md), and pass --dataset my_images.yaml"
            )
        if not candidate.is_file():
            raise ManifestError(f"manifest file not found: {candidate}")
        return candidate
    for directory in manifest_dirs():
        for suffix in (".yaml", ".yml"):
            if (directory / f"{text}{suffix}").is_file():
                return directory / f"{text}{suffix}"
    searched = ", ".join(dict.fromkeys(str(d) for d in manifest_dirs()))
    raise ManifestError(f"no manifest named {text!r} (searched {searched})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping (plain
    YAML keeps the last silently: `name: a` ... `name: b` prepared `b`)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: its keys may be overridden here
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"a key must be a plain value, not a {type(key).__name__}",
                    key_node.start_mark,
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"key {key!r} given twice (first at line "
                    f"{seen[key].line + 1}); keep one",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: where, and what (PyYAML's own text spans
    several lines, with the offending line quoted)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(err).split())

    def at(m) -> str:
        return f"line {m.line + 1}, column {m.column + 1}"

    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        context += f" started at {at(start)}"
    return f"{at(mark)}: {problem}" + (f" ({context})" if context else "")


def load_manifest(path_or_name: str | os.PathLike | Manifest) -> Manifest:
    """Read and validate a manifest.

    Args:
        path_or_name: a YAML path, or a bare name such as "elpv" resolved in
            `manifest_dirs()`. A `Manifest` is returned unchanged.

    Returns:
        The validated `Manifest` (with `path` set to the file read).

    Raises:
        ManifestError: the file is missing or not YAML, or a field is unknown,
            missing or invalid; the message names the file and the field.
    """
    if isinstance(path_or_name, Manifest):
        return path_or_name
    path = _resolve(path_or_name)
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {_yaml_problem(err)}") from err
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: expected a mapping at top level, got {raw!r}")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            kind = {"extra_forbidden": "unknown field", "missing": "missing field"}.get(
                e["type"], e["msg"]
            ).removeprefix("Value error, ")
            if not e["loc"]:  # A check across fields names them itself.
                problems.append(kind)
                continue
            problems.append(".".join(str(p) for p in e["loc"]) + f": {kind}")
        raise ManifestError(f"{path}: " + "; ".join(problems)) from err
    return manifest.model_copy(update={"path": str(path)})
