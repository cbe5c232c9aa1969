"""Manifests: the shipped ones validate; bad ones fail naming file and field."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from thumbnet_keras import data

SHIPPED = ["elpv", "fashion_mnist", "imagenet2012", "places365"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_manifests_load_by_bare_name(name):
    manifest = data.load_manifest(name)
    assert manifest.name == name
    assert manifest.path.endswith(f"data_manifests/{name}.yaml")
    assert manifest.license


def test_elpv_manifest_states_licence_and_protocol():
    m = data.load_manifest("elpv")
    assert m.license == "CC BY-NC-SA 4.0"
    assert m.split.test_fraction == 0.25
    assert m.classes == ["0", "1/3", "2/3", "1"]
    assert (m.image.height, m.image.width, m.image.channels) == (300, 300, 1)


def test_tfds_manifests_never_download_by_default():
    for name in ("imagenet2012", "places365"):
        assert data.load_manifest(name).source.download is False
    assert data.load_manifest("imagenet2012").source.manual_files == [
        "ILSVRC2012_img_train.tar",
        "ILSVRC2012_img_val.tar",
    ]


def _write(tmp_path, body: str):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(body))
    return path


GOOD = """
name: toy
description: a toy
license: MIT
source: {type: image_folder, root: /nowhere}
image: {channels: 3}
"""


def test_good_manifest_has_defaults(tmp_path):
    m = data.load_manifest(_write(tmp_path, GOOD))
    assert m.split.validation_fraction == 0.1
    assert m.source.split_dirs is None


def test_unknown_field_names_file_and_field(tmp_path):
    path = _write(tmp_path, GOOD + "colour_space: rgb\n")
    with pytest.raises(data.ManifestError) as err:
        data.load_manifest(path)
    assert str(path) in str(err.value)
    assert "colour_space: unknown field" in str(err.value)


@pytest.mark.parametrize(
    "source, split, message",
    [
        ("{type: image_folder, root: /nowhere, split_dirs: {train: tr, test: te}}",
         "{test_fraction: 0.3}",
         "split.test_fraction 0.3 is unused: the source brings its own test split "
         "(folder 'te')"),
        ("{type: image_folder, root: /nowhere, split_dirs: {train: tr, validation: va}}",
         "{validation_fraction: 0.2}",
         "split.validation_fraction 0.2 is unused: the source brings its own "
         "validation split (folder 'va')"),
        ("{type: tfds, name: imagenet2012}", "{test_fraction: 0.25}",
         "its own test split (TFDS split 'validation')"),
        ("{type: fashion_mnist, directory: /nowhere}", "{test_fraction: 0.1}",
         "its own test split (the t10k files)"),
        # No test folder: every image is train, none would be drawn for test.
        ("{type: image_folder, root: /nowhere, split_dirs: {train: tr}}",
         "{test_fraction: 0.3}",
         "split.test_fraction 0.3 is unused: every image takes its split from the "
         "source (train: folder 'tr'), so none is drawn for test. Give the source a "
         "test split"),
    ],
)  # fmt: skip
def test_a_fraction_the_source_would_ignore_is_refused(
    tmp_path, source, split, message
):
    """split_dirs with a test folder and a test_fraction used to prepare the
    folders' split and drop the fraction without a word."""
    body = GOOD.replace("{type: image_folder, root: /nowhere}", source)
    path = _write(tmp_path, body + f"split: {split}\n")
    with pytest.raises(data.ManifestError) as err:
        data.load_manifest(path)
    assert str(err.value).startswith(f"{path}: split.") and message in str(err.value)
    assert "<root>" not in str(err.value) and "Value error" not in str(err.value)


def test_a_fraction_the_source_leaves_to_the_manifest_is_used(tmp_path):
    """Split folders for train and test, no validation folder: the
    manifest's validation_fraction is carved from the train folder."""
    from data_fixtures import make_image_folder

    root = tmp_path / "images"
    for folder in ("tr", "te"):
        make_image_folder(root / folder, per_class=10, with_bad=False)
    body = GOOD.replace(
        "root: /nowhere", f"root: '{root}', split_dirs: {{train: tr, test: te}}"
    )
    path = _write(tmp_path, body + "split: {validation_fraction: 0.2}\n")
    prepared = data.prepare(data.load_manifest(path), tmp_path / "out")
    assert prepared.splits == {"train": 16, "validation": 4, "test": 20}
    # Zero, as the shipped manifests write it for a source's own test split.
    body = GOOD.replace("root: /nowhere", "root: /nowhere, split_dirs: {test: te}")
    assert data.load_manifest(_write(tmp_path, body + "split: {test_fraction: 0}\n"))


def test_unknown_nested_field_names_its_path(tmp_path):
    path = _write(tmp_path, GOOD.replace("root: /nowhere", "root: /nowhere, rot: 1"))
    with pytest.raises(
        data.ManifestError, match=r"source\.image_folder\.rot: unknown field"
    ):
        data.load_manifest(path)


def test_missing_field_names_file_and_field(tmp_path):
    path = _write(tmp_path, GOOD.replace("license: MIT\n", ""))
    with pytest.raises(data.ManifestError) as err:
        data.load_manifest(path)
    assert str(path) in str(err.value) and "license: missing field" in str(err.value)


def test_out_of_range_fraction_is_rejected(tmp_path):
    path = _write(tmp_path, GOOD + "split: {test_fraction: 1.5}\n")
    with pytest.raises(data.ManifestError, match=r"split\.test_fraction"):
        data.load_manifest(path)
    # NaN was told "should be less than 1" (a first-contact trial).
    path = _write(tmp_path, GOOD + "split: {test_fraction: .nan}\n")
    with pytest.raises(data.ManifestError, match=r"test_fraction.*finite number"):
        data.load_manifest(path)


def test_an_image_folder_root_that_is_a_file_says_so(tmp_path):
    from thumbnet_keras.pipeline import preflight
    from thumbnet_keras.pipeline.config import ConfigError

    (tmp_path / "photos.yaml").write_text("not a folder")
    body = GOOD.replace("/nowhere", str(tmp_path / "photos.yaml"))
    manifest = data.load_manifest(_write(tmp_path, body))
    with pytest.raises(ConfigError, match=r"photos\.yaml' is a file, not a folder"):
        preflight._check_source(manifest)


def test_a_key_given_twice_and_a_class_listed_twice_are_refused(tmp_path):
    """A trial (2026-11-30): `name: my ... name: other` prepared `other`, and
    `classes: [cat, cat]` failed later with "'cat' (no image) has no usable
    example" though cat had 12 images."""
    path = _write(tmp_path, GOOD + "name: other\n")
    with pytest.raises(
        data.ManifestError,
        match=r"line 7, column 1: key 'name' given twice \(first at line 2\)",
    ):
        data.load_manifest(path)
    path = _write(tmp_path, GOOD + "split: {seed: 1, seed: 2}\n")
    with pytest.raises(data.ManifestError, match="key 'seed' given twice"):
        data.load_manifest(path)
    # YAML merge keys still merge, and a merged key may be overridden.
    merged = GOOD.replace(
        "source: {type: image_folder, root: /nowhere}",
        "source: {type: image_folder, <<: {root: /x, extensions: [.png]}, root: /nowhere}",
    )
    m = data.load_manifest(_write(tmp_path, merged))
    assert m.source.root == "/nowhere" and m.source.extensions == [".png"]
    path = _write(tmp_path, GOOD + "? [a, b]\n: 1\n")
    with pytest.raises(
        data.ManifestError, match="a key must be a plain value, not a list"
    ):
        data.load_manifest(path)
    path = _write(tmp_path, GOOD + "classes: [cat, dog, cat]\n")
    with pytest.raises(data.ManifestError) as err:
        data.load_manifest(path)
    assert str(err.value).endswith(
        "classes: 'cat' listed more than once; each class is named once, in label order"
    )


def test_unknown_name_and_bad_yaml(tmp_path):
    with pytest.raises(data.ManifestError, match="no manifest named 'cifar10'"):
        data.load_manifest("cifar10")
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(data.ManifestError, match="not valid YAML"):
        data.load_manifest(path)


def test_manifest_dir_env_var_wins(tmp_path, monkeypatch):
    (tmp_path / "elpv.yaml").write_text(GOOD.replace("name: toy", "name: elpv"))
    monkeypatch.setenv("THUMBNET_MANIFEST_DIR", str(tmp_path))
    assert data.load_manifest("elpv").license == "MIT"


def test_importing_data_does_not_import_tensorflow():
    code = (
        "import sys; from thumbnet_keras import data; "
        "data.load_manifest('elpv'); "
        "print('tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"KERAS_BACKEND": "jax", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_image_folder_class_folders_before_any_image_is_read(tmp_path):
    """The class count a run checks its teacher against before preparing
    (a manifest without `classes`): folders with a candidate file, hidden
    and empty ones (or ones with no image name) left out, the union over
    split folders; None when a folder is missing."""
    from thumbnet_keras.data.manifest import ImageFolderSource

    for rel in ("a/1.png", "c/deep/2.JPG", ".hidden/3.png", "d/notes.txt"):
        (tmp_path / "pool" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pool" / rel).write_bytes(b"x")
    (tmp_path / "pool" / "b").mkdir()
    source = ImageFolderSource(type="image_folder", root=str(tmp_path / "pool"))
    assert source.class_folders() == ["a", "c"]
    for rel in ("train/x/1.png", "val/y/1.png", "val/x/2.png"):
        (tmp_path / "splits" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "splits" / rel).write_bytes(b"x")
    splits = {"train": "train", "test": "val"}
    source = ImageFolderSource(
        type="image_folder", root=str(tmp_path / "splits"), split_dirs=splits
    )
    assert source.class_folders() == ["x", "y"]
    missing = ImageFolderSource(type="image_folder", root=str(tmp_path / "none"))
    assert missing.class_folders() is None


def test_a_parquet_base_dir_that_is_not_there_is_named(tmp_path):
    """A trial (2026-12-01): a wrong `base_dir` quarantined every row as
    `missing` and prepare stopped at "split 'train' has no usable example
    (231 quarantined ...)", naming neither the folder nor the reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thumbnet_keras.pipeline import preflight
    from thumbnet_keras.pipeline.config import ConfigError

    pq.write_table(
        pa.table({"image": ["a/1.png"], "label": ["a"]}), tmp_path / "t.parquet"
    )  # fmt: skip  (a column of paths)
    source = f"source: {{type: parquet, path: {tmp_path / 't.parquet'}, base_dir: "
    for base, said in ((tmp_path / "nowhere", "not found"), (tmp_path / "t.parquet",
                       "is a file, not a folder")):  # fmt: skip
        body = GOOD.replace("source: {type: image_folder, root: /nowhere}",
                            source + f"{base}}}")  # fmt: skip
        manifest = data.load_manifest(_write(tmp_path, body))
        with pytest.raises(ConfigError, match=f"base_dir '{base}' {said}"):
            preflight._check_source(manifest)
    body = GOOD.replace("source: {type: image_folder, root: /nowhere}",
                        source + f"{tmp_path}}}")  # fmt: skip
    preflight._check_source(data.load_manifest(_write(tmp_path, body)))  # there
    # A table of image bytes never reads base_dir: a stale one is no error
    # (a review: such a table prepared, and preflight refused it).
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"\x89PNG"], "label": ["a"]}),
                   tmp_path / "bytes.parquet")  # fmt: skip
    body = GOOD.replace("source: {type: image_folder, root: /nowhere}",
                        f"source: {{type: parquet, path: {tmp_path / 'bytes.parquet'}, "
                        f"base_dir: {tmp_path / 'gone'}}}")  # fmt: skip
    preflight._check_source(data.load_manifest(_write(tmp_path, body)))
    # A Hugging Face struct<bytes, path> reads `path` where a row has no bytes.
    pq.write_table(pa.table({"image": [{"bytes": None, "path": "a/1.png"}],
                             "label": ["a"]}), tmp_path / "hf.parquet")  # fmt: skip
    body = GOOD.replace("source: {type: image_folder, root: /nowhere}",
                        f"source: {{type: parquet, path: {tmp_path / 'hf.parquet'}, "
                        f"base_dir: {tmp_path / 'gone'}}}")  # fmt: skip
    with pytest.raises(ConfigError, match="base_dir .* not found"):
        preflight._check_source(data.load_manifest(_write(tmp_path, body)))


def test_a_class_folder_spelled_in_other_unicode_code_points_is_explained(tmp_path):
    """A trial (2026-12-01): a class folder written decomposed (NFD, as macOS
    writes names) and `classes: [dreieck_ü]` typed composed got "no image for
    class 'dreieck_ü'" beside a folder that looks the same."""
    import unicodedata

    from PIL import Image

    from thumbnet_keras.pipeline import preflight
    from thumbnet_keras.pipeline.config import ConfigError

    composed = "dreieck_\u00fc"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    for name in (decomposed, "kreis"):
        (tmp_path / "img" / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "img" / name / "a.png")
    body = GOOD.replace("/nowhere", str(tmp_path / "img")) + (
        f"classes: [{composed}, kreis]\n"
    )
    manifest = data.load_manifest(_write(tmp_path, body))
    with pytest.raises(ConfigError) as err:
        preflight._check_source(manifest)
    assert "no image for class 'dreieck_ü'" in str(err.value)
    assert str(err.value).endswith(
        "A folder looks the same but is spelled with other Unicode code points "
        "('dreieck_ü' is 'dreieck_\\xfc', the folder 'dreieck_u\\u0308'): write "
        "the class as the folder spells it, or rename the folder."
    )
