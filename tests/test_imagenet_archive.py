"""ImageNet for real, offline: TFDS's own `imagenet2012` builder on tiny
archives in the official ILSVRC2012 layout, then the `train-imagenet`
deployment's parameters (prefect.yaml) in smoke size to a `thumbnet.keras`.

The archives: `ILSVRC2012_img_train.tar` holds one `<wnid>.tar` per class, each
holding `<wnid>_<n>.JPEG` files; `ILSVRC2012_img_val.tar` holds
`ILSVRC2012_val_<8 digits>.JPEG` files, whose labels TFDS takes from its
`validation_labels.txt` (line i labels the i-th file name in sorted order).
The train classes are those of the first validation files, so every test
image has a class seen in training. Nothing is mocked: the manifest is
`data_manifests/imagenet2012.yaml`, TFDS builds its records from the
manual dir (1000-class ClassLabel), `prepare` writes the Parquet index.

TensorFlow only: TFDS and the whole flow are the same on every backend.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import BACKEND, tiny_teacher
from PIL import Image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        BACKEND != "tensorflow",
        reason="TFDS and the flow are backend-independent; one backend pays",
    ),
]

REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES = 4  # ILSVRC2012_val_00000001 ... 04
TRAIN_PER_CLASS = 3


def _jpeg(rng, colour) -> bytes:
    image = rng.normal(colour, 30, (40, 48, 3)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_ilsvrc2012(manual_dir: Path, val_start: int = 1) -> dict:
    """Tiny ILSVRC2012 archives in the official layout; returns
    `{"classes": [wnid, ...], "val_labels": [wnid of val file 1, ...]}`.
    `val_start`: the number of the first validation file (1 officially)."""
    import tensorflow_datasets as tfds

    lines = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    val_labels = Path(os.fspath(lines)).read_text().split()[:VAL_IMAGES]
    classes = sorted(set(val_labels))
    rng = np.random.default_rng(0)
    colour = {wnid: rng.uniform(40, 215, 3) for wnid in classes}
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
        for wnid in classes:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as per_class:
                for n in range(TRAIN_PER_CLASS):
                    _add(per_class, f"{wnid}_{n + 1}.JPEG", _jpeg(rng, colour[wnid]))
            _add(train, f"{wnid}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
        for i, wnid in enumerate(val_labels, start=val_start):
            _add(val, f"ILSVRC2012_val_{i:08d}.JPEG", _jpeg(rng, colour[wnid]))
    return {"classes": classes, "val_labels": val_labels}


def deployment_params(name: str) -> dict:
    """The `params` of a deployment in prefect.yaml."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == name]
    return dict(deployment["parameters"]["params"])


def test_train_imagenet_from_ilsvrc2012_archives(tmp_path, monkeypatch):
    import keras

    from thumbnet_keras import pipeline
    from thumbnet_keras.data import PreparedDataset

    tfds_dir = tmp_path / "tensorflow_datasets"
    monkeypatch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    written = write_ilsvrc2012(tfds_dir / "downloads" / "manual")

    # The deployment's parameters, in smoke size. Its teacher, the
    # keras.applications ResNet-50 (ImageNet weights download), is replaced by
    # a small 1000-class .keras teacher: the ResNet-50 flow is
    # tests/test_teachers.py's (it costs minutes); this one keeps the
    # manifest's "imagenet" normalization, which thumbnet.keras must embed.
    params = deployment_params("train-imagenet")
    assert params["dataset"] == "imagenet2012"
    assert params["teacher"] == "applications:ResNet50"
    size = 32
    teacher = str(tmp_path / "teacher.keras")
    tiny_teacher((size, size, 3), num_classes=1000, name="tiny1000").save(teacher)
    params.update(
        teacher=teacher,
        image_size=size,
        smoke=True,
        runs_dir=str(tmp_path / "runs"),
        run_name="imagenet-smoke",
        export_formats=[],
    )
    result = pipeline.run_thumbnet(params, verbose=0)
    run_dir = Path(result["run_dir"])

    # TFDS built the real builder's records; prepare indexed every image.
    data = json.loads((run_dir / "data.json").read_text())
    assert data["num_classes"] == 1000 and data["normalization"] == "imagenet"
    prepared = PreparedDataset.load(data["prepared_dir"])
    table = prepared.read_index(["label", "split", "tfds_split"]).to_pydict()
    names = data["class_names"]
    test_labels = sorted(
        names[label]
        for label, split in zip(table["label"], table["split"], strict=True)
        if split == "test"
    )
    assert test_labels == sorted(written["val_labels"])
    train_labels = [
        names[label]
        for label, split in zip(table["label"], table["split"], strict=True)
        if split == "train"
    ]
    assert sorted(set(train_labels)) == written["classes"]
    # The manifest holds 1% of train out for validation: here one image.
    held = [split for split in table["split"] if split == "validation"]
    assert len(held) == 1
    assert len(train_labels) == TRAIN_PER_CLASS * len(written["classes"]) - 1

    # A thumbnet.keras that takes raw pixels at the run's size.
    model = keras.saving.load_model(run_dir / "thumbnet.keras", safe_mode=True)
    assert model.input_shape == (None, size, size, 3)
    assert model.layers[1].name == "normalize_imagenet"
    assert model.output_shape == (None, 1000)
    pixels = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), np.uint8)
    assert np.isfinite(np.asarray(model.predict(pixels, verbose=0))).all()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics  # the report step ran


def test_archives_tfds_would_misread_are_refused(tmp_path):
    """An engineer's rehearsal (2026-12-01), each silent or a traceback before:

    * tars changed after TFDS built its records (a class added) were
      ignored: TFDS kept serving the old build, and the flows' prepare cache
      (its key read "missing" for a deleted build) reused an index of other
      records;
    * a validation archive of files 11-14 (a subset) had every test label
      wrong: TFDS labels by sorted position;
    * a truncated train tar failed in three tracebacks, retried twice;
    * a missing val tar was not named.
    """
    from thumbnet_keras.data import DataSourceError, load_manifest
    from thumbnet_keras.data.sources import source_stamp
    from thumbnet_keras.data.tfds_source import MANUAL_STAMP, builder

    def imagenet(name: str):
        manifest = load_manifest("imagenet2012")
        tfds_dir = tmp_path / name
        source = manifest.source.model_copy(update={"data_dir": str(tfds_dir)})
        manifest = manifest.model_copy(update={"source": source})
        return manifest, tfds_dir / "downloads" / "manual"

    manifest, manual = imagenet("changed")
    write_ilsvrc2012(manual)
    with pytest.raises(FileNotFoundError, match="not there yet"):
        source_stamp(manifest)  # not built yet: nothing may be cached on it
    built = builder(manifest.source)
    assert Path(built.data_dir, MANUAL_STAMP).is_file()
    stamp = source_stamp(manifest)
    train_tar = manual / "ILSVRC2012_img_train.tar"
    # The same bytes with new times (a copy that did not keep them): no change.
    os.utime(train_tar, ns=(1, 1))
    assert builder(manifest.source).data_dir == built.data_dir
    with tarfile.open(train_tar, "a") as train:  # a class added
        _add(train, "n01443537.tar", b"")
    with pytest.raises(DataSourceError) as info:
        builder(manifest.source)
    message = str(info.value)
    assert f"ILSVRC2012_img_train.tar in {manual} changed since TFDS built" in message
    assert f"delete the build {built.data_dir}" in message
    assert f"delete {Path(built.data_dir, MANUAL_STAMP)}" in message
    train_tar.unlink()  # removed to free the disk: no change
    assert builder(manifest.source).data_dir == built.data_dir
    assert source_stamp(manifest) == stamp  # nor for the flows' prepare cache

    manifest, manual = imagenet("subset")
    write_ilsvrc2012(manual, val_start=11)
    with pytest.raises(DataSourceError, match=(
        "file number 1 in sorted order is 'ILSVRC2012_val_00000011.JPEG', not "
        "'ILSVRC2012_val_00000001.JPEG'. TFDS labels the validation images by position"
    )):  # fmt: skip
        builder(manifest.source)
    assert not (tmp_path / "subset" / "imagenet2012").exists()  # refused first

    manifest, manual = imagenet("truncated")
    write_ilsvrc2012(manual)
    data = (manual / "ILSVRC2012_img_train.tar").read_bytes()
    (manual / "ILSVRC2012_img_train.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataSourceError, match=(
        f"TFDS could not build 'imagenet2012' from the files in {manual}: "
    )):  # fmt: skip
        builder(manifest.source)

    manifest, manual = imagenet("no-val")
    write_ilsvrc2012(manual)
    (manual / "ILSVRC2012_img_val.tar").unlink()
    with pytest.raises(DataSourceError, match=(
        f"Missing in {manual}: ILSVRC2012_img_val.tar "
        r"\(there: ILSVRC2012_img_train.tar\)"
    )):  # fmt: skip
        builder(manifest.source)


def test_a_full_disk_or_network_error_is_not_called_a_damaged_archive(
    tmp_path, monkeypatch
):
    """Review (2026-12-01): every failed build became "replace the damaged
    archive", which the flow never retries: a dropped download or a full
    disk must stay what it is (retried)."""
    import errno

    import tensorflow_datasets as tfds

    from thumbnet_keras.data import load_manifest
    from thumbnet_keras.data.tfds_source import builder

    def fails(error):
        def download_and_prepare(self, *args, **kwargs):
            raise error

        return download_and_prepare

    imagenet = load_manifest("imagenet2012").source
    imagenet = imagenet.model_copy(update={"data_dir": str(tmp_path / "in")})
    write_ilsvrc2012(tmp_path / "in" / "downloads" / "manual")
    full = OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails(full))
    with pytest.raises(OSError, match="No space left on device"):
        builder(imagenet)
    places = load_manifest("places365").source
    places = places.model_copy(
        update={"data_dir": str(tmp_path / "pl"), "download": True}
    )
    reset = ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fails(reset))
    with pytest.raises(ConnectionResetError):
        builder(places)
