"""`thumbnet predict` and `thumbnet_keras.predict` on a folder mixing good
and broken images, with a hand-made model whose answers are known."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image
from pipeline_fixtures import loud_env

from thumbnet_keras import deploy
from thumbnet_keras.data.index import file_sha256
from thumbnet_keras.predict import predict, write_predictions


def _brightness_model(path: Path) -> str:
    """logits = (+20, -20) * (mean pixel - 0.5): "bright" above mid-gray."""
    image = keras.Input((8, 8, 1), name="image")
    mean = keras.layers.GlobalAveragePooling2D(name="mean")(image)
    dense = keras.layers.Dense(2, name="logits")
    logits = dense(mean)
    dense.set_weights([np.array([[20.0, -20.0]]), np.array([-10.0, 10.0])])
    path.parent.mkdir(parents=True, exist_ok=True)
    keras.Model(image, logits).save(path)
    deploy.write_sidecar(
        path.parent,
        class_names=["bright", "dark"],
        input_size=(8, 8),
        channels=1,
        normalization="unit",
        models={path.name: "keras"},
    )
    return str(path)


LATIN1 = os.fsdecode(b"caf\xe9.png")  # not UTF-8: a surrogate in Python


def _images(folder: Path) -> dict[str, str]:
    """Good and broken files; returns name -> expected class or reason."""
    folder.mkdir()
    # A linked sub-folder (an image folder trial: its images were skipped in
    # silence, while prepare reads such a folder), and a hidden one (skipped).
    (folder.parent / "elsewhere").mkdir()
    Image.fromarray(np.full((16, 16), 10, np.uint8)).save(
        folder.parent / "elsewhere" / "linked_dark.png"
    )
    (folder / "linked").symlink_to(folder.parent / "elsewhere")
    (folder / ".cache").mkdir()
    Image.fromarray(np.full((16, 16), 10, np.uint8)).save(folder / ".cache" / "c.png")
    Image.fromarray(np.full((16, 16), 230, np.uint8)).save(folder / "bright.png")
    # RGB JPEG, not square, not the model's size: converted to gray, cropped.
    Image.fromarray(np.full((12, 20, 3), 20, np.uint8)).save(folder / "dark.jpg")
    Image.fromarray(np.full((9, 9, 3), 250, np.uint8)).save(folder / "white.bmp")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    (folder / "sub").mkdir()
    for name in ("truncated.png", "truncated.jpg"):
        Image.fromarray(noise).save(folder / "sub" / name)
        full = (folder / "sub" / name).read_bytes()
        (folder / "sub" / name).write_bytes(full[: len(full) // 2])
    (folder / "sub" / "text.png").write_text("not an image at all\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    # A link to nothing (was dropped without a word) and a Latin-1 file name
    # (its CSV row lost every result: "surrogates not allowed").
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    Image.fromarray(np.full((16, 16), 240, np.uint8)).save(folder / LATIN1)
    return {
        "linked_dark.png": "dark",
        "gone.png": "missing",
        LATIN1: "bright",
        "bright.png": "bright",
        "dark.jpg": "dark",
        "white.bmp": "bright",
        "truncated.png": "truncated",
        "truncated.jpg": "truncated",
        "text.png": "not_an_image",
        "empty.jpg": "empty_file",
    }


def test_predict_folder_with_broken_files(tmp_path):
    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    expected = _images(tmp_path / "images")
    result = predict(model, [tmp_path / "images"], top_k=5)
    got = {Path(r["file"]).name: r["top"] for r in result["predictions"]}
    assert {name: top[0]["class"] for name, top in got.items()} == {
        k: v for k, v in expected.items() if v in ("bright", "dark")
    }
    for top in got.values():
        assert len(top) == 2  # top_k capped at the number of classes
        assert top[0]["probability"] > 0.99
        assert sum(t["probability"] for t in top) == pytest.approx(1.0)
    # Gray 230 -> 230/255 = 0.902: softmax of (+20, -20) * 0.402 * ... exactly.
    logit = 20 * 230 / 255 - 10
    assert got["bright.png"][0]["probability"] == pytest.approx(
        1 / (1 + np.exp(-2 * logit)), rel=1e-5
    )
    skipped = {Path(r["file"]).name: r["reason"] for r in result["skipped"]}
    assert skipped == {k: v for k, v in expected.items() if v not in ("bright", "dark")}


def test_write_predictions_csv_and_json(tmp_path):
    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    _images(tmp_path / "images")
    result = predict(
        model,
        [tmp_path / "images" / "dark.jpg", tmp_path / "nope.png",
         tmp_path / "images" / LATIN1],
    )  # fmt: skip
    assert [r["reason"] for r in result["skipped"]] == ["not_found"]
    # UTF-8 whatever the locale; the undecodable byte written as JSON does.
    raw = Path(write_predictions(result, tmp_path / "p.csv")).read_bytes()
    assert b"\r" not in raw  # Unix line ends, as the JSON and every tool here
    text = raw.decode("utf-8")
    assert "/caf\\udce9.png,1,bright," in text
    rows = list(csv.DictReader(open(write_predictions(result, tmp_path / "p.csv"))))
    assert [(r["rank"], r["class"]) for r in rows[:2]] == [
        ("1", "dark"),
        ("2", "bright"),
    ]
    assert rows[4]["error"] == "not_found" and rows[4]["class"] == ""
    saved = json.loads(Path(write_predictions(result, tmp_path / "p.json")).read_text())
    assert saved["predictions"][0]["top"][0]["class"] == "dark"
    with pytest.raises(ValueError, match=".csv or .json"):
        write_predictions(result, tmp_path / "p.txt")


def test_predictions_never_overwrite_a_file_they_did_not_write(tmp_path, capsys):
    """A first-contact trial (2026-11-30): `--output R/thumbnet_model.json`
    replaced the sidecar predict had just read (and metrics.json,
    config.json), and the run no longer loaded. Only an earlier predictions
    file is replaced; anything else is refused before a model is loaded,
    and left as it was."""
    from thumbnet_keras.cli import main

    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    _images(tmp_path / "images")
    image = str(tmp_path / "images" / "dark.jpg")
    sidecar = tmp_path / "m" / "thumbnet_model.json"
    notes = tmp_path / "notes.csv"
    notes.write_text("id,comment\n1,mine\n")
    for target in (sidecar, notes):
        before = target.read_bytes()
        capsys.readouterr()
        assert main(["predict", "--model", model, image, "--output", str(target)]) == 2
        assert "exists and is not a predictions file" in capsys.readouterr().err
        assert target.read_bytes() == before
    result = predict(model, [image])
    with pytest.raises(ValueError, match="not a predictions file"):
        write_predictions(result, sidecar)
    for name in ("p.csv", "p.json"):  # an earlier predictions file: replaced
        out = tmp_path / name
        for _ in range(2):
            assert main(["predict", "--model", model, image, "--output", str(out)]) == 0
    # An empty placeholder (touch, NamedTemporaryFile) and a predictions CSV
    # a spreadsheet saved again with a byte-order mark are replaced (review).
    empty, bom = tmp_path / "empty.csv", tmp_path / "bom.csv"
    empty.touch()
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "p.csv").read_bytes())
    for out in (empty, bom):
        assert main(["predict", "--model", model, image, "--output", str(out)]) == 0
        assert out.read_text().startswith("file,rank,class,probability,error")


def test_a_broken_model_file_is_named_in_its_error(tmp_path):
    """A first-contact trial (2026-11-30): a garbage `.tflite` said only "The
    model is not a valid Flatbuffer buffer", and a garbage SavedModel folder
    advised passing `tags=` (no thumbnet command takes it)."""
    from thumbnet_keras.deploy.runtime import load_runner

    lite = tmp_path / "x.tflite"
    lite.write_bytes(b"not a flatbuffer at all" * 10)
    folder = tmp_path / "sm"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"garbage")
    for path, kind in ((lite, "litert"), (folder, "saved_model")):
        with pytest.raises(ValueError, match=f"Cannot load {path} as a {kind} model"):
            load_runner(path)


def test_predict_needs_a_matching_sidecar(tmp_path):
    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(deploy.SidecarError) as info:
        predict(model, [], sidecar=other / "thumbnet_model.json")
    # Where it looked, whole: a moved model's relative folder said nothing.
    assert f"{other / 'thumbnet_model.json'} not found (the sidecar named)" in str(
        info.value
    )
    deploy.write_sidecar(
        other, class_names=["a", "b"], input_size=(16, 16), channels=1,
        normalization="unit",
    )  # fmt: skip
    with pytest.raises(ValueError, match="not this model's sidecar"):
        predict(model, [], sidecar=other / "thumbnet_model.json")


def test_a_model_replaced_after_its_sidecar_is_refused(tmp_path):
    """An edge deployer's trial: another run's model copied over the one a
    sidecar describes (same name, same input, same class count) was labelled
    with the old run's class names. The sidecar records each model's sha256
    now; a changed file is refused, the untouched one still predicts."""
    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    record = deploy.read_sidecar(model)
    assert record["sha256"] == {"thumbnet.keras": file_sha256(model)}
    image = tmp_path / "x.png"
    Image.fromarray(np.full((16, 16), 230, np.uint8)).save(image)
    assert predict(model, [str(image)])["predictions"][0]["top"][0]["class"] == (
        "bright"
    )
    # "Another run's" model: the opposite answer, the same input and classes.
    other = keras.saving.load_model(model)
    other.get_layer("logits").set_weights(
        [np.array([[-20.0, 20.0]]), np.array([10.0, -10.0])]
    )
    other.save(model)
    with pytest.raises(deploy.SidecarError, match=r"is not the thumbnet.keras that"):
        predict(model, [str(image)])
    # The sidecar rewritten for it (as an export does) describes it again.
    deploy.write_sidecar(
        tmp_path / "m", class_names=["bright", "dark"], input_size=(8, 8),
        channels=1, normalization="unit", models={"thumbnet.keras": "keras"},
    )  # fmt: skip
    assert predict(model, [str(image)])["predictions"][0]["top"][0]["class"] == ("dark")


def test_cli_predict_exit_codes(tmp_path, capsys):
    from thumbnet_keras.cli import main

    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    _images(tmp_path / "images")
    out = tmp_path / "preds.json"
    assert main(["predict", "--model", model, str(tmp_path / "images"),
                 "--top-k", "1", "--output", str(out)]) == 0  # fmt: skip
    saved = json.loads(out.read_text())
    assert len(saved["predictions"]) == 5 and len(saved["skipped"]) == 5
    assert all(len(r["top"]) == 1 for r in saved["predictions"])
    err = capsys.readouterr().err
    assert "truncated.png: truncated" in err and "5 of 10 files skipped" in err
    assert "gone.png: missing" in err  # a link to nothing, named
    assert err.count("truncated.png") == 1, err  # Reported once, not twice.
    # Printed, not written: one line per image.
    assert (
        main(["predict", "--model", model, str(tmp_path / "images" / "dark.jpg")]) == 0
    )
    assert "dark.jpg" in capsys.readouterr().out
    # Nothing readable: non-zero.
    broken = tmp_path / "images" / "sub"
    capsys.readouterr()
    assert (
        main(["predict", "--model", model, str(broken), str(tmp_path / "no.jpg")]) == 1
    )
    err = capsys.readouterr().err
    assert err.count("no.jpg: not_found") == 1, err  # Reported once.
    assert main(["predict", "--model", str(tmp_path / "none.keras"), str(broken)]) == 2
    # A renamed model (deployments rename files) with its sidecar given; a
    # sidecar that is not there: one line, exit 2.
    renamed = tmp_path / "lone" / "model_v3.keras"
    renamed.parent.mkdir()
    Path(model).rename(renamed)
    image = str(tmp_path / "images" / "dark.jpg")
    capsys.readouterr()
    assert main(["predict", "--model", str(renamed), image]) == 2
    assert "thumbnet_model.json not found" in capsys.readouterr().err
    sidecar = str(tmp_path / "m" / "thumbnet_model.json")
    assert main(["predict", "--model", str(renamed), "--sidecar", sidecar, image]) == 0
    said = capsys.readouterr()
    assert said.out.startswith(f"{image}\tdark ")
    assert (
        f"{sidecar} describes thumbnet.keras, not model_v3.keras: used as asked"
        in said.err
    )
    assert main(["predict", "--model", str(renamed), "--sidecar", "x.json", image]) == 2
    assert "--sidecar 'x.json': no such file" in capsys.readouterr().err


def test_a_model_the_sidecar_does_not_list_is_refused(tmp_path):
    """A run folder's teacher.keras sits beside the sidecar of thumbnet.keras
    and takes the same image size, but other values: predicting with it
    would print confident nonsense, so a model the sidecar does not list is
    refused, also when that same sidecar is named with --sidecar (a trial
    did, as the refusal suggested); a sidecar from elsewhere is the caller's
    word (a renamed model's, above)."""
    model = _brightness_model(tmp_path / "m" / "model.keras")
    keras.saving.load_model(model).save(tmp_path / "m" / "teacher.keras")
    image = tmp_path / "bright.png"
    Image.fromarray(np.full((16, 16), 230, np.uint8)).save(image)
    with pytest.raises(
        deploy.SidecarError, match=r"describes model.keras, not teacher.keras"
    ):
        predict(str(tmp_path / "m" / "teacher.keras"), [str(image)])
    with pytest.raises(deploy.SidecarError, match=r"write a sidecar for this model"):
        predict(
            str(tmp_path / "m" / "teacher.keras"), [str(image)],
            sidecar=str(tmp_path / "m" / ".." / "m" / "thumbnet_model.json"),
        )  # fmt: skip
    own = deploy.write_sidecar(
        tmp_path / "own", class_names=["bright", "dark"], input_size=(8, 8),
        channels=1, normalization="unit", models={"teacher.keras": "keras"},
    )  # fmt: skip
    explicit = predict(str(tmp_path / "m" / "teacher.keras"), [str(image)], sidecar=own)
    assert explicit["predictions"][0]["top"][0]["class"] == "bright"
    # A renamed export beside its sidecar, named with --sidecar, as
    # docs/deploy.md shows (an edge deployer's trial: it was refused); not
    # named, the refusal says how.
    renamed = tmp_path / "m" / "model_v3.keras"
    keras.saving.load_model(model).save(renamed)
    with pytest.raises(deploy.SidecarError, match=r"--sidecar .*or add 'model_v3"):
        predict(str(renamed), [str(image)])
    beside = str(tmp_path / "m" / "thumbnet_model.json")
    said = predict(str(renamed), [str(image)], sidecar=beside)
    assert said["predictions"][0]["top"][0]["class"] == "bright"


def test_saved_model_folder_finds_the_sidecar_beside_it(tmp_path):
    # The exporter writes thumbnet_model.json beside thumbnet_saved_model/.
    saved = tmp_path / "thumbnet_saved_model"
    saved.mkdir()
    deploy.write_sidecar(
        tmp_path, class_names=["a", "b"], input_size=(16, 16), channels=1,
        normalization="unit",
    )  # fmt: skip
    record = deploy.read_sidecar(saved)
    assert record["path"] == str(tmp_path / "thumbnet_model.json")
    assert record["class_names"] == ["a", "b"]
    # Pinned by its files' digests; a copy of the sidecar inside the folder
    # (which read_sidecar then finds) is not one of the model's files (the
    # review: the folder with its own sidecar was refused as changed).
    (saved / "saved_model.pb").write_bytes(b"graph")
    (saved / "variables").mkdir()
    (saved / "variables" / "variables.index").write_bytes(b"weights")
    deploy.write_sidecar(
        tmp_path, class_names=["a", "b"], input_size=(16, 16), channels=1,
        normalization="unit", models={saved.name: "saved_model"},
    )  # fmt: skip
    deploy.check_model_file(saved, deploy.read_sidecar(saved))
    (saved / deploy.SIDECAR).write_text((tmp_path / deploy.SIDECAR).read_text())
    inside = deploy.read_sidecar(saved)
    assert inside["path"] == str(saved / deploy.SIDECAR)
    deploy.check_model_file(saved, inside)
    (saved / "variables" / "variables.index").write_bytes(b"other weights")
    with pytest.raises(deploy.SidecarError, match="is not the thumbnet_saved_model"):
        deploy.check_model_file(saved, inside)


@pytest.mark.parametrize("fmt", ["keras", "litert"])
def test_cli_predict_prints_no_framework_start_up_lines(tmp_path, fmt):
    """On every backend (TensorFlow is imported for decoding on JAX and torch
    too): only the predictions and the summary, no oneDNN / CUDA / absl
    notices from the frameworks' C++ start-up, and no LiteRT "Created
    TensorFlow Lite XNNPACK delegate" line for a `.tflite` model."""
    import subprocess
    import sys

    model = _brightness_model(tmp_path / "m" / "model.keras")
    if fmt == "litert":
        model = deploy.export_model(model, "litert")
        deploy.write_sidecar(
            tmp_path / "m", class_names=["bright", "dark"], input_size=(8, 8),
            channels=1, normalization="unit", models={"model.tflite": "litert"},
        )  # fmt: skip
    # A Latin-1 file name, printed by a strict UTF-8 stdout (an en_US.UTF-8
    # terminal): it used to lose every result to a UnicodeEncodeError.
    Image.fromarray(np.full((16, 16), 230, np.uint8)).save(tmp_path / LATIN1)
    env = loud_env() | {
        "KERAS_BACKEND": keras.backend.backend(),
        "PYTHONIOENCODING": "utf-8:strict",
    }
    result = subprocess.run(
        [sys.executable, "-m", "thumbnet_keras.cli", "predict", "--model", model,
         str(tmp_path / LATIN1)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "caf\\udce9.png\tbright " in result.stdout
    assert result.stderr.strip().splitlines() == [
        "1 classified, 0 of 1 files skipped"
    ], result.stderr


def test_an_image_far_smaller_than_the_input_is_named(tmp_path, caplog):
    """A 1x1 image is enlarged to the model's 8x8 and classified, with a
    warning; the 9x9 and 12x20 ones of `_images` are not."""
    model = _brightness_model(tmp_path / "m" / "thumbnet.keras")
    _images(tmp_path / "images")
    Image.fromarray(np.full((1, 1), 240, np.uint8)).save(
        tmp_path / "images" / "one.png"
    )
    with caplog.at_level("WARNING", logger="thumbnet_keras.predict"):
        result = predict(model, [str(tmp_path / "images")])
    small = [r.getMessage() for r in caplog.records if "too small" in r.getMessage()]
    assert len(small) == 1 and small[0].endswith(
        "one.png: 1x1 pixels, enlarged to the model's 8x8 input: too small for its "
        "prediction to mean much"
    ), small
    assert any(r["file"].endswith("one.png") for r in result["predictions"])
