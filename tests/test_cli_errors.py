"""Every user error of the `thumbnet` command, run as a user runs it.

Each case is a real `python -m thumbnet_keras.cli` process: exit status 2, one
line `thumbnet: error: ...` that names the problem, no traceback, and nothing
written under the runs folder. They all answer before Keras, TensorFlow or
Prefect is imported, so the whole module takes a few seconds; the elapsed time
of each is printed (`pytest -s`), not asserted. They run under one backend
(tensorflow): no backend is imported before the message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import keras
import pytest
from pipeline_fixtures import snapshot, subprocess_env, tiny_dataset

# The errors are found before any backend is imported: the same on all three.
pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="backend-independent subprocess checks: run under one backend only",
)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with a good manifest, broken ones, a fake teacher and run
    folders in every state a command can refuse."""
    root = tmp_path_factory.mktemp("cli_errors")
    tiny_dataset(root, per_class=2)
    (root / "empty").mkdir()
    for name, folder in (("empty", root / "empty"), ("gone", root / "gone")):
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ndescription: test\nlicense: CC0\n"
            f"source: {{type: image_folder, root: '{folder}'}}\n"
            "classes: [a, b]\nimage: {height: 40, width: 40, channels: 1}\n"
        )
    # Class 'b' has no folder; split folders, one of them missing.
    for name, source in (
        ("one_class", f"root: '{root}/one_class'"),
        ("splits", f"root: '{root}/splits', split_dirs: {{train: train, test: val}}"),
    ):
        (root / f"{name}.yaml").write_text(
            f"name: {name}\ndescription: test\nlicense: CC0\n"
            f"source: {{type: image_folder, {source}}}\n"
            "classes: [a, b]\nimage: {height: 40, width: 40, channels: 1}\n"
        )
    for folder in ("one_class/a", "splits/train/a", "splits/train/b"):
        (root / folder).mkdir(parents=True)
        shutil.copy(next((root / "brightness" / "bright").iterdir()), root / folder)
    # One class folder and no `classes` list: one class, refused up front.
    (root / "single.yaml").write_text(
        f"name: single\ndescription: test\nlicense: CC0\n"
        f"source: {{type: image_folder, root: '{root}/one_class'}}\n"
        "image: {height: 40, width: 40, channels: 1}\n"
    )
    (root / "fake.keras").write_text("this is a text file, not a model\n")
    (root / "bad_yaml.yaml").write_text(
        "name: x\nsource: {type: image_folder, root: [a\n"
    )
    # An ImageNet in TFDS that was never prepared, and no manual archives.
    (root / "tfds_absent.yaml").write_text(
        "name: absent\ndescription: test\nlicense: CC0\n"
        f"source: {{type: tfds, name: imagenet2012, data_dir: '{root}/tfds',"
        " manual_files: [train.tar]}\n"
        "image: {height: 40, width: 40, channels: 3}\n"
    )
    (root / "a_file").write_text("x")
    (root / "m.onnx").write_text("x")  # a model path predict's checks accept
    (root / "dir.csv").mkdir()
    # The same image folder without a `classes` list (the documented
    # default): the class folders give the count before anything is read.
    (root / "folders.yaml").write_text(
        (root / "brightness.yaml")
        .read_text()
        .replace("classes: ['bright', 'dark']\n", "")
    )
    assert "classes" not in (root / "folders.yaml").read_text()
    for name, shape, classes, activation in (
        ("five.keras", (64, 64, 1), 5, None),  # 2 classes in the data.
        ("softmax.keras", (64, 64, 1), 2, "softmax"),
        ("rgb.keras", (64, 64, 3), 2, None),  # The run's images are gray.
        ("no_feature_map.keras", (64, 64, 1), 2, None),  # No CNN at all.
        ("not_square.keras", (64, 48, 1), 2, None),
    ):
        image = keras.Input(shape)
        pooled = keras.layers.GlobalAveragePooling2D()(image)
        logits = keras.layers.Dense(classes, activation=activation)(pooled)
        keras.Model(image, logits).save(root / name)
    from thumbnet_keras.models import backbones

    backbones.build("tiny_cnn", (64, 64, 1), 2).save_weights(root / "tiny.weights.h5")
    # MobileNetV3's head: logits from a 1x1 Conv2D, then Flatten and a linear
    # Activation (no Dense layer at the end); 5 classes, the data has 2.
    image = keras.Input((64, 64, 1))
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(image)
    x = keras.layers.Conv2D(5, 1, name="logits")(keras.layers.Dropout(0.2)(x))
    x = keras.layers.Activation(None, name="predictions")(keras.layers.Flatten()(x))
    keras.Model(image, x).save(root / "five_conv_head.keras")
    with zipfile.ZipFile(root / "five_conv_head.keras") as whole:
        with zipfile.ZipFile(root / "config_only.keras", "w") as part:
            part.writestr("config.json", whole.read("config.json"))
    runs = root / "runs"
    # A finished-looking run with factors 2 and 4 (export), one stage done.
    run = runs / "r24"
    for factor in (2, 4):
        (run / f"f{factor}").mkdir(parents=True)
        (run / f"f{factor}" / "thumbnet.keras").write_bytes(b"PK")
    (run / "f4" / "downscaler.keras").write_bytes(b"PK")  # generalize's check
    (run / "stages").mkdir()
    (run / "stages" / "teacher.json").write_text("{}")
    (run / "config.json").write_text(
        json.dumps({"kind": "thumbnet", "config": {"factors": [2, 4]}})
    )
    # A started run with other settings (its name is taken).
    taken = runs / "taken"
    (taken / "stages").mkdir(parents=True)
    (taken / "stages" / "teacher.json").write_text("{}")
    (taken / "config.json").write_text(
        json.dumps({"kind": "thumbnet", "config": {"dataset": "other"}})
    )
    # export --format onnx with tf2onnx and onnx hidden from the interpreter.
    (root / "no_onnx").mkdir()
    (root / "no_onnx" / "sitecustomize.py").write_text(
        "import sys\nsys.modules['tf2onnx'] = None\nsys.modules['onnx'] = None\n"
    )
    return root


TRAIN = ["train", "--dataset", "{root}/brightness.yaml", "--runs-dir", "{root}/runs"]

# (id, arguments, what the message must say)
CASES = [
    ("batch-size", [*TRAIN, "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ("image-size", [*TRAIN, "--image-size", "0"], "--image-size 0: must be >= 8"),
    ("epochs", [*TRAIN, "--epochs", "-1"], "--epochs -1: must be >= 1"),
    ("lr-nan", [*TRAIN, "--learning-rate", "nan"], "--learning-rate nan: must be a finite"),
    ("run-name", [*TRAIN, "--run-name", "../../x"], "--run-name '../../x': a run name"),
    ("json", [*TRAIN, "--backbone-options", "{bad json"], "--backbone-options is not valid JSON"),
    ("json-list", [*TRAIN, "--backbone-options", "[1]"], "--backbone-options must be a JSON object"),
    ("dataset", [*TRAIN[:1], "--dataset", "no_such_set", "--runs-dir", "{root}/runs"],
     "Unknown or invalid dataset 'no_such_set'"),
    ("dataset-what", [*TRAIN[:1], "--dataset", "no_such_set", "--runs-dir", "{root}/runs"],
     ". --dataset takes the name of a YAML file in data_manifests/ (e.g. elpv, "
     "fashion_mnist) or a manifest's path."),
    ("empty-folder", [*TRAIN[:1], "--dataset", "{root}/empty.yaml", "--runs-dir", "{root}/runs"],
     "holds no image"),
    ("dataset-is-a-folder", [*TRAIN[:1], "--dataset", "{root}/brightness", "--runs-dir", "{root}/runs"],
     "{root}/brightness is a folder; a dataset is a manifest file. For a folder of class "
     "sub-folders, write e.g. my_images.yaml with: name: my_images"),
    ("missing-folder", [*TRAIN[:1], "--dataset", "{root}/gone.yaml", "--runs-dir", "{root}/runs"],
     "image folder '{root}/gone' not found"),
    ("class-folder", [*TRAIN[:1], "--dataset", "{root}/one_class.yaml", "--runs-dir", "{root}/runs"],
     "no image for class 'b'"),
    ("single-class", [*TRAIN[:1], "--dataset", "{root}/single.yaml", "--runs-dir", "{root}/runs"],
     "a classifier needs at least 2 classes; image folder '{root}/one_class' has 1 "
     "class folder(s) with images ('a')"),
    ("split-folder", [*TRAIN[:1], "--dataset", "{root}/splits.yaml", "--runs-dir", "{root}/runs"],
     "split folder '{root}/splits/val' (test) not found"),
    ("weight", [*TRAIN, "--kd-weight", "-1"], "--kd-weight -1.0: must be >= 0.0"),
    # FM pre-training with both of its losses off (the defaults) learns nothing.
    ("fm-epochs", [*TRAIN, "--fm-epochs", "2"], "--fm-epochs 2: the FM pre-training stage"),
    ("backbone", [*TRAIN, "--backbone", "resnet19"], "--backbone 'resnet19': unknown backbone"),
    ("factor", [*TRAIN, "--factor", "3"], "--factor 3 does not fit --image-size 64"),
    ("factor-twice", [*TRAIN, "--factor", "2", "--factor", "2"], "--factor given twice"),
    ("teacher-text", [*TRAIN, "--teacher", "{root}/fake.keras"], "is not a Keras archive"),
    ("teacher-missing", [*TRAIN, "--teacher", "{root}/nope.keras"], "file not found"),
    ("teacher-folder", [*TRAIN, "--teacher", "{root}"], "is a folder; give a .keras file"),
    ("teacher-no-weights", [*TRAIN, "--teacher", "{root}/config_only.keras"],
     "--teacher '{root}/config_only.keras' holds a model's config.json but no weights"),
    ("teacher-shipped", [*TRAIN, "--teacher", "pretrained:cifar"], "'pretrained:elpv'"),
    # Found by a practitioner's trial (2026-11-29): each was found only once
    # the run had started (after data preparation or the first stages).
    ("teacher-classes-folders", [*TRAIN[:1], "--dataset", "{root}/folders.yaml", "--runs-dir",
                                 "{root}/runs", "--teacher", "{root}/five.keras"],
     "outputs 5 classes but the dataset has 2 (bright, dark: class folders holding an "
     "image file, not yet decoded)"),
    # Its fix is not --image-size: the run's images are square.
    ("teacher-not-square", [*TRAIN, "--teacher", "{root}/not_square.keras"],
     "takes 64x48 images, which are not square"),
    ("teacher-classes-conv-head", [*TRAIN, "--teacher", "{root}/five_conv_head.keras"],
     "outputs 5 classes but the dataset has 2"),
    ("smoke-clash", [*TRAIN, "--smoke", "--image-size", "48", "--epochs", "2"],
     "--smoke sets --image-size, --epochs (a run shrunk to a plumbing check): leave them out, "
     "or drop --smoke."),
    ("smoke-clash-demo", ["demo", "--smoke", "--batch-size", "4", "--runs-dir", "{root}/runs"],
     "--smoke sets --batch-size (a run shrunk to a plumbing check): leave it out"),
    ("teacher-softmax", [*TRAIN, "--teacher", "{root}/softmax.keras"],
     "ends in a softmax activation, so it outputs probabilities, not logits"),
    ("teacher-channels", [*TRAIN, "--teacher", "{root}/rgb.keras"],
     "takes (64, 64, 3) images but the run uses (64, 64, 1) (--image-size x --image-size x "
     "channels); set --channels 3."),
    ("data-dir", [*TRAIN, "--data-dir", "{root}/a_file/data"], "--data-dir '{root}/a_file/data' cannot be created"),
    ("runs-dir", [*TRAIN[:3], "--runs-dir", "{root}/a_file/runs"], "--runs-dir '{root}/a_file/runs' cannot be created"),
    ("name-taken", [*TRAIN, "--run-name", "taken"], "already holds a 'thumbnet' run"),
    ("demo", ["demo", "--runs-dir", "{root}/runs", "--batch-size", "0"], "--batch-size 0"),
    ("evaluate-missing", ["evaluate", "--run", "{root}/runs/nope"], "no such folder"),
    ("evaluate-unfinished", ["evaluate", "--run", "{root}/runs/r24"], "is unfinished (1 of "),
    ("report-not-a-run", ["report", "--run", "{root}/empty"], "is not a thumbnet run folder"),
    ("report-unfinished", ["report", "--run", "{root}/runs/r24"], "is unfinished"),
    ("export-factor", ["export", "--run", "{root}/runs/r24", "--factor", "3", "--format", "onnx"],
     "--factor 3: run '{root}/runs/r24' has factors 2, 4"),
    ("export-missing", ["export", "--run", "{root}/runs/nope", "--format", "onnx"], "no such folder"),
    ("export-packages", ["export", "--run", "{root}/runs/r24", "--factor", "4", "--format", "onnx"],
     'pip install -e ".[export]"'),
    ("generalize-source", ["generalize", "--source-run", "{root}/runs/nope", "--runs-dir", "{root}/runs"],
     "--source-run '{root}/runs/nope': no such folder"),
    ("generalize-factor", ["generalize", "--source-run", "{root}/runs/r24", "--factor", "8",
                           "--runs-dir", "{root}/runs"], "has factors 2, 4"),
    # Found by a new user's audit (issue 9): each was a traceback, a
    # framework start, a misleading message or several lines before.
    ("factor-0", [*TRAIN, "--factor", "0"], "--factor 0: a factor is an integer >= 2"),
    ("run-name-long", [*TRAIN, "--run-name", "r" * 300], "(str, 300 characters): at most 128"),
    ("json-unknown-key", [*TRAIN, "--backbone-options", '{"nonsense": 1}'],
     "tiny_cnn has no option 'nonsense'; its options: widths, head"),
    ("json-bad-value", [*TRAIN, "--backbone-options", '{"widths": "x"}'],
     "tiny_cnn's 'widths' takes a list of integers"),
    ("json-bad-choice", [*TRAIN, "--backbone-options", '{"head": "max"}'],
     """tiny_cnn's 'head' is one of "gap", "flatten"; received "max"."""),
    ("json-no-options", [*TRAIN, "--backbone", "resnet18", "--backbone-options", '{"widths": [8]}'],
     "resnet18 has no option 'widths'; it takes none"),
    ("weights-imagenet", [*TRAIN, "--backbone-weights", "imagenet"],
     "Keras has no ImageNet weights for --backbone tiny_cnn"),
    # With a teacher, the backbone fields only name its architecture.
    ("teacher-backbone-weights", [*TRAIN, "--teacher", "{root}/five.keras", "--backbone-weights",
                                  "imagenet"], "the teacher is already trained, so the weights"),
    ("teacher-backbone-options", [*TRAIN, "--teacher", "{root}/five.keras", "--backbone-options",
                                  '{"widths": [8]}'], "--backbone-options with --teacher"),
    ("teacher-applications", [*TRAIN, "--teacher", "applications:ResNet99"],
     "unknown keras.applications model 'ResNet99'; choose from ResNet50"),
    ("teacher-applications-gray", [*TRAIN, "--teacher", "applications:MobileNetV2"],
     "takes RGB images but the run's images have 1 channel(s); add --channels 3"),
    ("data-dir-proc", [*TRAIN, "--data-dir", "/proc/thumbnet-data"],
     "--data-dir '/proc/thumbnet-data' is not writable"),
    ("manifest-yaml", [*TRAIN[:1], "--dataset", "{root}/bad_yaml.yaml"],
     "not valid YAML: line 3, column 1: expected ',' or ']'"),
    ("tfds-not-prepared", [*TRAIN[:1], "--dataset", "{root}/tfds_absent.yaml", "--runs-dir", "{root}/runs"],
     "TFDS dataset 'imagenet2012' is not prepared under {root}/tfds"),
    ("export-output-folder", ["export", "--run", "{root}/runs/r24", "--factor", "4", "--format", "onnx",
                              "--output", "{root}/a_file/m.onnx"], "'{root}/a_file' is a file"),
    ("export-output-suffix", ["export", "--run", "{root}/runs/r24", "--factor", "4", "--format", "onnx",
                              "--output", "{root}/m.tflite"], "an onnx export is a .onnx file"),
    ("generalize-smoke", ["generalize", "--source-run", "{root}/runs/r24", "--smoke",
                          "--epochs", "2"], "--smoke sets --epochs (a run shrunk to a plumbing check)"),
    ("generalize-seeds", ["generalize", "--source-run", "{root}/runs/r24", "--seed", "1", "--seed", "1"],
     "--seed [1, 1]: seeds must be distinct"),
    ("generalize-multi-process", ["generalize", "--source-run", "{root}/runs/r24", "--factor", "4"],
     "KERAS_DISTRIBUTION_NUM_PROCESSES=2: a thumbnet run trains in one process"),
    # An experiment's data is checked as train's is, before Prefect starts
    # (a trial: ~11 s in, after the frameworks, and a shorter message).
    ("generalize-data-gone", ["generalize", "--source-run", "{root}/runs/r24", "--factor", "4",
                              "--experiment", "{root}/gone.yaml:", "--runs-dir", "{root}/runs"],
     "image folder '{root}/gone' not found"),
    ("predict-text-keras", ["predict", "--model", "{root}/fake.keras", "{root}/nope"],
     "is not a Keras archive"),
    ("predict-no-weights", ["predict", "--model", "{root}/config_only.keras", "{root}/a_file"],
     "holds a model's config.json but no weights"),
    ("predict-nothing", ["predict", "--model", "{root}/m.onnx", "{root}/nope"],
     "Nothing to classify ('{root}/nope': not found)"),
    ("predict-model", ["predict", "--model", "{root}/nope.onnx", "{root}/a_file"],
     "--model '{root}/nope.onnx': not found"),
    ("predict-not-a-model", ["predict", "--model", "{root}/a_file", "{root}/a_file"],
     "--model: Unknown model format '{root}/a_file': expected a .keras, .onnx or .tflite"),
    ("predict-top-k", ["predict", "--model", "{root}/m.onnx", "{root}/a_file", "--top-k", "0"],
     "--top-k 0: must be >= 1"),
    # --output is checked before the model is loaded or any image classified.
    ("predict-output-suffix", ["predict", "--model", "{root}/m.onnx", "{root}/a_file",
                               "--output", "{root}/p.txt"],
     "--output '{root}/p.txt': must end in .csv or .json."),
    ("predict-output-folder", ["predict", "--model", "{root}/m.onnx", "{root}/a_file",
                               "--output", "{root}/dir.csv"], "is a folder; give a file name"),
    ("predict-output-proc", ["predict", "--model", "{root}/m.onnx", "{root}/a_file",
                             "--output", "/proc/x.csv"], "--output's folder '/proc' is not writable"),
    ("keras-backend", ["train", "--batch-size", "8"], "KERAS_BACKEND='tensorflw' is not a Keras backend"),
    # Refused before any data is prepared (it used to fail in the teacher stage).
    ("distribution-torch", [*TRAIN, "--distribution", "data_parallel"],
     "--distribution data_parallel needs the jax or tensorflow backend (KERAS_BACKEND); "
     "this process runs 'torch'."),
    # Found only after the data was prepared (a platform trial).
    ("jax-batch-split", [*TRAIN, "--distribution", "data_parallel", "--batch-size", "7"],
     "batch_size 7 does not split over the 2 devices of distribution='data_parallel' "
     "(JAX gives every device the same share of a batch): use a multiple of 2, "
     "e.g. --batch-size 8."),
    # Every process ran every step; Keras refused the datasets (a trial).
    ("multi-process", [*TRAIN], "KERAS_DISTRIBUTION_NUM_PROCESSES=2: a thumbnet "
     "run trains in one process"),
    # Prepared data written among a finished run's outputs (a platform trial).
    ("data-dir-in-a-run", [*TRAIN, "--data-dir", "{root}/runs/r24/_data"],
     "--data-dir '{root}/runs/r24/_data' is inside the run folder '{root}/runs/r24'"),
    # A whole run written inside a finished run's stages/ (a Prefect trial).
    ("runs-dir-in-a-run", [*TRAIN, "--runs-dir", "{root}/runs/r24/stages"],
     "--runs-dir '{root}/runs/r24/stages' is inside the run folder '{root}/runs/r24'"),
    # Accepted and recorded, and did nothing (a platform trial).
    ("sync-batchnorm-alone", [*TRAIN, "--sync-batchnorm"],
     "--sync-batchnorm synchronizes BatchNorm statistics across the replicas of "
     "--distribution data_parallel; this run has none (--distribution none)."),
    # argparse's own errors: one line too, not the 33-line usage first.
    ("choice", [*TRAIN, "--precision", "float64"], "argument --precision: invalid choice: 'float64'"),
    ("export-format", ["export", "--run", "{root}/runs/r24", "--format", "lite-rt"],
     "argument --format: invalid choice: 'lite-rt' (choose from 'saved_model',"),
    ("int", [*TRAIN, "--batch-size", "abc"], "argument --batch-size: invalid int value: 'abc'"),
    ("typo", [*TRAIN, "--batchsize", "8"], "--batchsize: did you mean --batch-size?"),
    ("demo-option", ["demo", "--backbone", "resnet18"], "--backbone is an option of thumbnet train"),
    ("no-run", ["evaluate"], "the following arguments are required: --run. See: thumbnet evaluate --help"),
]  # fmt: skip


def run_cli(args: list[str], root: Path, env_extra: dict | None = None):
    env = subprocess_env() | (env_extra or {})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "thumbnet_keras.cli", *args],
        capture_output=True,
        text=True,
        cwd=root,
        env=env,
        timeout=120,
    )
    return result, time.monotonic() - started


def run_refused(args: list[str], root: Path, env_extra: dict | None = None) -> str:
    """Runs the CLI, checks it refused (exit 2, no traceback); its stderr."""
    result, seconds = run_cli(args, root, env_extra)
    print(f"{seconds:.2f}s  thumbnet {' '.join(args)}\n  {result.stderr.strip()}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    return result.stderr


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("thumbnet:")]


@pytest.mark.parametrize("case,args,expected", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(world, case, args, expected):
    root = str(world)
    args = [a.replace("{root}", root) for a in args]
    env = {}
    if case == "export-packages":
        env["PYTHONPATH"] = f"{root}/no_onnx:" + subprocess_env()["PYTHONPATH"]
    if case == "keras-backend":
        env["KERAS_BACKEND"] = "tensorflw"  # A typo.
    if case == "distribution-torch":
        env["KERAS_BACKEND"] = "torch"
    if case == "jax-batch-split":
        env["KERAS_BACKEND"] = "jax"
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    if case in ("multi-process", "generalize-multi-process"):
        env["KERAS_DISTRIBUTION_NUM_PROCESSES"] = "2"
    before = snapshot(world)
    lines = run_refused(args, world, env).strip().splitlines()
    # `thumbnet train: error: ...` where argparse finds it.
    assert len(lines) == 1 and re.match(r"thumbnet( \w+)?: error: ", lines[0]), lines
    assert expected.replace("{root}", root) in lines[0]
    assert snapshot(world) == before  # Nothing written, nothing touched.


def test_a_teacher_without_feature_maps_is_refused_before_any_stage(world, tmp_path):
    """A teacher with no 4-D layer (Input -> pooling -> Dense) used to train
    the first stages and then fail the joint stage with a 190-line
    traceback (a practitioner's trial, 2026-11-29). It is refused where the
    flow loads the teacher, before any stage: exit 2, one error line."""
    runs = tmp_path / "runs"
    args = ["train", "--dataset", f"{world}/brightness.yaml", "--runs-dir", str(runs),
            "--teacher", f"{world}/no_feature_map.keras"]  # fmt: skip
    errors = error_lines(run_refused(args, world))
    assert len(errors) == 1, errors
    assert (
        "has no layer with a 4-D (B, H, W, C) output to use for feature mapping. "
        "ThumbNet's student is the teacher's convolutional network run on "
        "thumbnails; give a CNN classifier."
    ) in errors[0]
    assert not list(runs.glob("*/stages/*.json"))  # no stage ran


def test_debug_shows_the_traceback(world):
    result, _ = run_cli(["train", "--batch-size", "0", "--debug"], world)
    assert result.returncode == 2
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("thumbnet: error:")


@pytest.mark.parametrize("case", ["name-taken", "evaluate-unfinished", "export-factor"])
def test_user_error_imports_no_framework(world, case):
    # The checks run before Keras, TensorFlow or Prefect is imported.
    args = [
        a.replace("{root}", str(world)) for a in dict((c[0], c[1]) for c in CASES)[case]
    ]
    result = run_and_list_frameworks(
        f"from thumbnet_keras.cli import main\nassert main({args!r}) == 2\n", world
    )
    assert result.stdout.strip() == "[]", result.stderr[-2000:]


def run_and_list_frameworks(code: str, cwd=None) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter, which then prints the frameworks
    (Keras, TensorFlow, JAX, torch, Prefect) it imported: "[]" for none."""
    code = (
        "import sys\n" + code
        + "print(sorted(m for m in ('keras', 'tensorflow', 'jax', 'torch', 'prefect')"
        " if m in sys.modules))\n"
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(),
        timeout=60,
    )


def test_help_imports_no_framework():
    result = run_and_list_frameworks(
        "import contextlib, io\n"
        "from thumbnet_keras.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['train', '--help'])\n"
        "    except SystemExit: pass\n"
    )
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
    assert result.stderr == ""  # No framework start-up lines either.


def test_data_found_bad_while_preparing_is_one_error_line(tmp_path):
    """Images that all fail to decode pass the checks before the flow (they
    have image names) and fail its prepare-data step: one `thumbnet: error`
    line naming the quarantine report, exit 2, no traceback, and no run
    folder left (the report stays in the data cache). A real flow: Prefect
    and TensorFlow start first, so this one takes 15-30 s."""
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        for i in range(6):
            (tmp_path / "bad" / name / f"{i}.png").write_text("not an image")
    (tmp_path / "bad.yaml").write_text(
        f"name: bad\ndescription: test\nlicense: CC0\n"
        f"source: {{type: image_folder, root: '{tmp_path}/bad'}}\n"
        "classes: [a, b]\nimage: {height: 40, width: 40, channels: 1}\n"
    )
    args = ["train", "--dataset", "bad.yaml", "--smoke", "--run-name", "r"]
    errors = error_lines(run_refused(args, tmp_path))
    assert len(errors) == 1 and errors[0].startswith("thumbnet: error: bad: split")
    assert "has no usable example (12 quarantined: 12 not_an_image; see " in errors[0]
    assert "quarantine.failed.json" in errors[0]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["_data"]


def test_option_value_the_builder_refuses_is_one_error_line(tmp_path):
    """A backbone option of the right name and type that only the builder
    refuses (an empty `widths`) is found once Keras runs, in the flow's
    resolve-run step: no traceback, one `thumbnet: error` line, exit 2, and
    no run folder (nor the `runs/` it made) left. Prefect and TensorFlow
    start first: 10-30 s. (A value from a fixed set, like `head`, is checked
    before: the `json-bad-choice` case.)"""
    manifest = tiny_dataset(tmp_path, per_class=2)
    args = ["train", "--dataset", manifest, "--smoke", "--run-name", "r",
            "--backbone-options", '{"widths": []}']  # fmt: skip
    stderr = run_refused(args, tmp_path)
    errors = error_lines(stderr)
    assert stderr.count("thumbnet: error:") == 1, stderr  # Not the flow's copy too.
    assert errors == [
        'thumbnet: error: Backbone options {"widths": []} (--backbone-options): '
        "`widths` must name at least one stage, received ()."
    ]
    assert not (tmp_path / "runs").exists()


def test_backbone_weights_that_do_not_fit_are_one_error_line(world, tmp_path):
    """A trial: a --backbone-weights file that does not fit the backbone
    failed inside the teacher stage, after the run had started (three
    Prefect tracebacks, exit 1). It is refused where the flow resolves the
    run: one error line, exit 2, no stage."""
    runs = tmp_path / "runs"
    weights = f"{world}/tiny.weights.h5"
    args = ["train", "--dataset", f"{world}/brightness.yaml", "--runs-dir", str(runs),
            "--backbone", "resnet18", "--backbone-weights", weights]  # fmt: skip
    errors = error_lines(run_refused(args, world))
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        f"thumbnet: error: --backbone-weights {weights!r}: Weights file {weights!r} "
        "does not match backbone 'resnet18'"
    ), errors
    assert not list(runs.glob("*/stages/*.json"))
    assert not (runs / "_data").exists()  # refused before the data step


def test_a_teacher_failing_its_health_checks_is_reported_without_traceback(tmp_path):
    """A given teacher whose logits do not depend on the image fails its
    health checks in the teacher stage, once the flow runs: exit 3 and the
    failure as the last line. Prefect used to log the error's traceback
    twice first (task and flow run, ~6 KB, seen by a practitioner); the
    command drops tracebacks of user errors from Prefect's run logs unless
    --debug or -v. 15-30 s: Prefect and TensorFlow start."""
    manifest = tiny_dataset(tmp_path, per_class=4)
    image = keras.Input((32, 32, 1))
    features = keras.layers.Conv2D(4, 3, padding="same")(image)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    logits = keras.layers.Dense(2, kernel_initializer="zeros")(pooled)
    keras.Model(image, logits).save(tmp_path / "constant.keras")
    args = ["train", "--dataset", manifest, "--smoke", "--run-name", "r",
            "--image-size", "32", "--teacher", str(tmp_path / "constant.keras")]  # fmt: skip
    result, _ = run_cli(args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "[teacher] failed its health checks" in errors[0]
    assert "predictions do not depend on the input" in errors[0]
    assert "likely cause: the teacher does not fit these images" in errors[0]
    # Said once: Prefect's task and flow state lines used to repeat it.
    assert output.count("Every later stage learns from the teacher") == 1, output[
        -3000:
    ]
    assert "Finished in state Failed (error below)" in output


def test_a_finished_run_without_fm_pretrain_is_finished(tmp_path):
    """`fm_epochs` 0 (the default recipe) skips fm_pretrain, which then writes
    no record: `evaluate` and `report` used to call every such run
    unfinished ("next: f2-fm_pretrain")."""
    from thumbnet_keras.pipeline.config import ConfigError
    from thumbnet_keras.pipeline.preflight import check_finished_run
    from thumbnet_keras.pipeline.stages import STAGES

    def run_folder(name, fm_epochs, done, e_pretrain_epochs=0):
        run = tmp_path / name
        (run / "stages").mkdir(parents=True)
        for sid in done:
            (run / "stages" / f"{sid}.json").write_text("{}")
        (run / "data.json").write_text("{}")
        config = {"factors": [2, 4], "fm_epochs": fm_epochs,
                  "e_pretrain_epochs": e_pretrain_epochs}  # fmt: skip
        (run / "config.json").write_text(
            json.dumps({"kind": "thumbnet", "config": config})
        )
        return str(run)

    skipped = ("fm_pretrain", "e_pretrain")
    trained = [f"f{f}-{s}" for f in (2, 4) for s in STAGES if s not in skipped]
    assert check_finished_run(run_folder("default", 0, ["teacher", *trained]))
    # With the E pre-training stage (the default since it exists), its record
    # is needed.
    with pytest.raises(
        ConfigError, match=r"\(11 of 13 stages done; next: f2-e_pretrain\)"
    ):
        check_finished_run(run_folder("e_pre", 0, ["teacher", *trained], 2))
    # With an FM pre-training stage, its record is needed.
    with pytest.raises(
        ConfigError, match=r"\(11 of 13 stages done; next: f2-fm_pretrain\)"
    ):
        check_finished_run(run_folder("paper", 2, ["teacher", *trained]))
    # The count is of the stages the run has: 5 of 11, next the first missing.
    with pytest.raises(
        ConfigError, match=r"\(5 of 11 stages done; next: f2-bicubic_kd_equal\)"
    ):
        check_finished_run(run_folder("half", 0, ["teacher", *trained[:4]]))
    # `report` also needs the export step: a Prefect trial's run killed after
    # its health step got a metrics.json listing no thumbnet.keras, exit 0.
    stopped = run_folder("stopped", 0, ["teacher", *trained])
    with pytest.raises(ConfigError, match="no thumbnet.keras and no export.json"):
        check_finished_run(stopped, exported=True)
    (Path(stopped) / "thumbnet.keras").write_bytes(b"")  # an extra format failed
    with pytest.raises(ConfigError, match=r"did not finish \(no export.json\)"):
        check_finished_run(stopped, exported=True)
    (Path(stopped) / "export.json").write_text("{}")
    assert check_finished_run(stopped, exported=True)
    # A run its health step failed exports nothing by design: its report is
    # what it has (review).
    failed = run_folder("failed", 0, ["teacher", *trained])
    (Path(failed) / "health.json").write_text('{"status": "failed"}')
    assert check_finished_run(failed, exported=True)


def test_generalize_checks_import_no_framework(world, tmp_path):
    """An upgrade trial (2026-12-01): `thumbnet generalize` printed
    TensorFlow's start-up lines before its output or one-line refusal: its
    preflight imported the generalize module (Keras) to hash the source's
    E. Every check, that hash included, runs before any framework."""
    run = tmp_path / "src"
    (run / "f2").mkdir(parents=True)
    (run / "f2" / "downscaler.keras").write_bytes(b"PK")
    (run / "config.json").write_text(json.dumps({"kind": "thumbnet", "config": {
        "factors": [2], "dataset": str(world / "brightness.yaml"),
        "backbone": "tiny_cnn"}}))  # fmt: skip
    values = {"source_run": str(run), "factor": 2, "runs_dir": str(tmp_path / "runs")}
    result = run_and_list_frameworks(
        "from thumbnet_keras.pipeline.preflight import check_generalize\n"
        f"check_generalize({values!r})\n",
        world,
    )
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
