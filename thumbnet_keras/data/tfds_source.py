"""TensorFlow Datasets sources (imagenet2012 from a manual_dir, places365_small).

Never downloads unless the manifest says `download: true`. When the prepared
TFDS data is missing, the error says where the files have to go. Images are
read as encoded bytes (`tfds.decode.SkipDecoding`) so that `prepare` validates
them with the same code as files, and `make_dataset` decodes them with the
same tf.data map as every other source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from thumbnet_keras.data.manifest import TfdsSource
from thumbnet_keras.data.sources import Candidate, DataSourceError


def data_dir(source: TfdsSource) -> str:
    """The TFDS data_dir the manifest points at (or the TFDS default)."""
    if source.data_dir:
        return os.path.expanduser(source.data_dir)
    return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def manual_dir(source: TfdsSource) -> str:
    """Where manually downloaded archives are expected."""
    if source.manual_dir:
        return os.path.expanduser(source.manual_dir)
    return os.path.join(data_dir(source), "downloads", "manual")


def _missing_message(
    source: TfdsSource, detail: str, missing: list[str] | None = None
) -> str:
    lines = [
        f"TFDS dataset {source.name!r} is not prepared under {data_dir(source)} "
        f"and download is off (manifest source.download: false).",
    ]
    if source.manual_files:
        absent = missing if missing is not None else list(source.manual_files)
        there = [f for f in source.manual_files if f not in absent]
        lines.append(
            f"Missing in {manual_dir(source)}: {', '.join(absent)}"
            + (f" (there: {', '.join(there)})" if there else "")
            + ". Put the files there (or set source.manual_dir) and run the "
            "same command again: it builds the TFDS records locally from them."
        )
    else:
        lines.append(
            f"Build it on a machine with internet (`tfds build {source.name} "
            f"--data_dir <dir>`) and copy <dir>/{source.name} into {data_dir(source)}, "
            "or set source.download: true."
        )
    lines.append(f"(TFDS said: {detail})")
    return " ".join(lines)


# Written beside the TFDS records this package built from manual files: the
# files' sizes and modification times then (`_check_manual_unchanged`).
MANUAL_STAMP = "thumbnet_manual_files.json"


def builder(source: TfdsSource):
    """A TFDS builder whose data is ready; builds from manual_dir if possible.

    TFDS reuses a finished build whatever its manual files have become, so a
    build made here records their sizes and times (`MANUAL_STAMP`) and is
    refused once one of them changed (`_check_manual_unchanged`).

    Raises:
        DataSourceError: data not prepared and neither manual files nor
            download allow building it (the message says which files go
            where); manual files changed since the build; an ImageNet
            validation archive TFDS would mislabel
            (`_check_imagenet_validation`); or TFDS failed to build (a
            damaged archive), naming the folder.
    """
    import tensorflow_datasets as tfds

    try:
        b = tfds.builder(source.name, data_dir=data_dir(source))
    except Exception as err:  # noqa: BLE001 - unknown name, bad data_dir
        raise DataSourceError(f"TFDS builder {source.name!r}: {err}") from err
    manual = Path(manual_dir(source))
    if _is_ready(b):
        _check_manual_unchanged(source, b, manual)
        return b
    missing = [f for f in source.manual_files if not (manual / f).is_file()]
    have_manual = bool(source.manual_files) and not missing
    if not (have_manual or source.download):
        raise DataSourceError(
            _missing_message(source, "no prepared data found", missing)
        )
    if have_manual:
        _check_imagenet_validation(source, manual)
    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    try:
        b.download_and_prepare(download_config=config)
    except OSError:
        raise  # A full disk, a network error: the flow retries these.
    except Exception as err:  # noqa: BLE001 - a damaged or foreign archive
        if not have_manual:
            raise
        detail = str(err).strip().splitlines()[-1:] or [""]
        raise DataSourceError(
            f"TFDS could not build {source.name!r} from the files in {manual}: "
            f"{type(err).__name__}: {detail[0]}. Check the archives (a download "
            "cut short, a file that is not the dataset's own), replace the "
            "damaged one and run the same command again."
        ) from err
    if have_manual:
        stamp = {f: _file_stamp(manual / f, members=True) for f in source.manual_files}
        try:
            Path(b.data_dir, MANUAL_STAMP).write_text(json.dumps(stamp, indent=1))
        except OSError:  # Not recorded: the build is still used, unchecked.
            pass
    return b


def _file_stamp(path: Path, members: bool = False) -> dict:
    """`path`'s size and modification time; with `members`, for a tar, a
    digest of its members' names and sizes too (read from the headers)."""
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if members:
        stamp["members"] = _members_digest(path)
    return stamp


def _members_digest(path: Path) -> str | None:
    import hashlib
    import tarfile

    try:
        with tarfile.open(path, mode="r:") as tar:
            listing = "\n".join(f"{m.name}|{m.size}" for m in tar.getmembers())
    except (tarfile.TarError, OSError):
        return None
    return hashlib.sha256(listing.encode()).hexdigest()


def _check_manual_unchanged(source: TfdsSource, b, manual: Path) -> None:
    """A build made here from manual files is refused when one of them
    changed: TFDS would go on serving the old records (a class added to the
    train archive was silently left out). Changed: another size, or another
    modification time and other members (names and sizes) in the tar: a
    copy that did not keep the files' times is no change, nor is a file
    removed since (to free the disk)."""
    stamp_file = Path(b.data_dir, MANUAL_STAMP)
    try:
        recorded = json.loads(stamp_file.read_text())
    except (OSError, ValueError):
        return  # Built elsewhere (`tfds build`), or under tfds.testing.mock_data.

    def changed(name: str, stamp: dict) -> bool:
        path = manual / name
        if not path.is_file():
            return False
        now = _file_stamp(path)
        if now["size"] != stamp.get("size"):
            return True
        if now["mtime_ns"] == stamp.get("mtime_ns"):
            return False
        digest = stamp.get("members")
        return digest is None or _members_digest(path) != digest

    names = [name for name, stamp in recorded.items() if changed(name, stamp)]
    if names:
        raise DataSourceError(
            f"{', '.join(names)} in {manual} changed since TFDS built "
            f"{source.name!r} from {'it' if len(names) == 1 else 'them'}, and "
            f"TFDS would keep serving the old records. To use the new files, "
            f"delete the build {b.data_dir} and run the same command again (it "
            "builds anew); or put back the files it was built from. If they are "
            f"the same files, delete {stamp_file} (what the build recorded of "
            "them) to use the build as it is."
        )


_VAL_NAME = "ILSVRC2012_val_{:08d}.JPEG"


def _check_imagenet_validation(source: TfdsSource, manual: Path) -> None:
    """TFDS labels ImageNet's validation images by position: the n-th name
    in sorted order takes line n of its `validation_labels.txt`. A val
    archive whose names do not run `ILSVRC2012_val_00000001.JPEG`, ...
    without a gap (a subset of the validation set) would have every test
    label after the gap wrong, without a word; refused before building."""
    if source.name.split(":")[0] != "imagenet2012":
        return
    val = manual / "ILSVRC2012_img_val.tar"
    if "ILSVRC2012_img_val.tar" not in source.manual_files or not val.is_file():
        return
    import tarfile

    try:
        with tarfile.open(val, mode="r:") as tar:
            names = sorted(tar.getnames())
    except (tarfile.TarError, OSError) as err:
        raise DataSourceError(
            f"{val} is not a readable tar archive ({err}): replace it with the "
            "ILSVRC2012 validation archive and run the same command again."
        ) from err
    for n, name in enumerate(names, start=1):
        if name != _VAL_NAME.format(n):
            raise DataSourceError(
                f"{val}: file number {n} in sorted order is {name!r}, not "
                f"{_VAL_NAME.format(n)!r}. TFDS labels the validation images by "
                "position (the n-th sorted name takes line n of its "
                "validation_labels.txt), so the names must run "
                f"{_VAL_NAME.format(1)}, {_VAL_NAME.format(2)}, ... without a "
                "gap: a subset of the validation set would be mislabelled. Keep "
                "the first N images of the official archive."
            )


def _is_ready(b) -> bool:
    # Under tfds.testing.mock_data, as_dataset works although nothing is on disk.
    try:
        b.as_dataset(split=next(iter(b.info.splits.keys()), "train"))
    except Exception:  # noqa: BLE001 - AssertionError / NotFound: not prepared
        return False
    return True


def check_source(source: TfdsSource, b, names_from_labels: bool = False) -> None:
    """The manifest's `label_key`, `image_key` and `splits` name what the
    prepared builder `b` has: a label feature (a ClassLabel, or an integer
    one where the manifest gives `classes`; a ClassLabel when the class
    names are read from it, `names_from_labels`), an Image feature, its
    splits (a split may be sliced or summed: `train[:90%]`, `train+test`;
    `all` is TFDS' every split).
    `DataSourceError` naming the key and what there is (a wrong label_key
    was a KeyError traceback; a wrong image_key or split said "not prepared
    ... build it on a machine with internet").
    """
    import tensorflow_datasets as tfds

    features = b.info.features
    described = ", ".join(
        f"{k} ({type(features[k]).__name__})" for k in features.keys()
    )

    def integer(feature) -> bool:
        import numpy as np

        dtype = getattr(feature, "np_dtype", None)
        return dtype is not None and np.issubdtype(np.dtype(dtype), np.integer)

    for field, key, kind, fits in (
        ("label_key", source.label_key, "ClassLabel",
         lambda f: isinstance(f, tfds.features.ClassLabel)
         or (not names_from_labels and integer(f))),
        ("image_key", source.image_key, "Image",
         lambda f: isinstance(f, tfds.features.Image)),
    ):  # fmt: skip
        if key not in features.keys():
            raise DataSourceError(
                f"TFDS dataset {source.name!r} has no feature {key!r} (source."
                f"{field}); its features: {described}."
            )
        if not fits(features[key]):
            raise DataSourceError(
                f"TFDS dataset {source.name!r}: feature {key!r} (source.{field}) is "
                f"a {type(features[key]).__name__}, not a {kind}; its "
                f"features: {described}."
            )
    available = list(b.info.splits.keys())
    # (Empty under tfds.testing.mock_data, which serves any split.)
    for split, tfds_split in source.splits.items() if available else ():
        for part in tfds_split.split("+"):
            name = part.split("[")[0].strip()
            if name not in available and name != "all":
                raise DataSourceError(
                    f"TFDS dataset {source.name!r} has no split {name!r} (source."
                    f"splits.{split}: {tfds_split!r}); its splits: "
                    f"{', '.join(available)}."
                )


def class_names(source: TfdsSource) -> list[str]:
    """Names of the ClassLabel feature `source.label_key`."""
    b = builder(source)
    check_source(source, b, names_from_labels=True)
    return list(b.info.features[source.label_key].names)


def split_dataset(source: TfdsSource, tfds_split: str):
    """tf.data.Dataset of (encoded image bytes, label) in the TFDS order."""
    import tensorflow_datasets as tfds

    b = builder(source)
    check_source(source, b)
    try:
        ds = b.as_dataset(
            split=tfds_split,
            shuffle_files=False,
            decoders={source.image_key: tfds.decode.SkipDecoding()},
        )
    except Exception as err:  # noqa: BLE001
        raise DataSourceError(_missing_message(source, str(err))) from err
    return ds.map(lambda ex: (ex[source.image_key], ex[source.label_key]))


def tfds_candidates(source: TfdsSource, names: list[str]) -> Iterator[Candidate]:
    """Every example of every mapped split, as encoded bytes."""
    for split, tfds_split in source.splits.items():
        ds = split_dataset(source, tfds_split)
        for i, (image, label) in enumerate(ds.as_numpy_iterator()):
            yield Candidate(
                key=f"{tfds_split}/{i:08d}",
                label_name=names[int(label)],
                source_split=split,
                data=bytes(image),
                tfds_index=i,
                tfds_split=tfds_split,
            )
