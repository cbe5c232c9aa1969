"""Teachers as users have them (`thumbnet_keras.models.teachers`), offline.

keras.applications and keras-hub teachers are built with local random
weights (ImageNet weights and Kaggle presets download). The embedded
preprocessing must equal `keras.applications.<family>.preprocess_input`;
the wrapped teachers must equal the bare classifier on preprocessed input;
`make_student` and FM must work on them (nested backbones included). The
whole smoke flows (ResNet-50 and keras-hub teachers) and the raw-pixel
`thumbnet.keras` check run under TensorFlow only (CI time).
"""

from __future__ import annotations

import json
import os
import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND, run_python, tiny_teacher, to_numpy
from pipeline_fixtures import subprocess_env, tiny_dataset

from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student
from thumbnet_keras.models.teachers import (
    TeacherSpecError,
    is_raw_pixel_teacher,
    load_teacher,
    preprocessing_layers,
)

TF_ONLY = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="whole smoke flows run under one backend (CI time); the models "
    "they export are loaded under every backend in a subprocess",
)


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape).astype("float32")


def _nested(model) -> bool:
    return any(isinstance(layer, keras.Model) for layer in model.layers)


@pytest.mark.parametrize(
    "mode, module",
    [("caffe", "resnet50"), ("torch", "densenet"), ("tf", "mobilenet_v2")],
)
def test_preprocessing_equals_preprocess_input(mode, module):
    x = _pixels((2, 5, 4, 3))
    x[0, 0, 0] = [0.0, 128.0, 255.0]  # hand-checkable pixel
    expected = getattr(keras.applications, module).preprocess_input(x.copy())
    got = to_numpy(keras.Sequential(preprocessing_layers(mode))(x))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    first = {
        "caffe": [255.0 - 103.939, 128.0 - 116.779, 0.0 - 123.68],  # BGR
        "torch": [
            (0 - 0.485) / 0.229,
            (128 / 255 - 0.456) / 0.224,
            (1 - 0.406) / 0.225,
        ],  # fmt: skip
        "tf": [-1.0, 128 / 127.5 - 1, 1.0],
    }[mode]
    np.testing.assert_allclose(got[0, 0, 0], first, atol=1e-5)


def _resnet50(shape, classes):
    return keras.applications.ResNet50(
        weights=None, input_shape=shape, classes=classes, classifier_activation=None
    )


def _student_and_fm(teacher, factor=2):
    """S and a ThumbNetTrainer on a raw-pixel teacher: the checks every
    wrapped teacher must pass."""
    size = teacher.inputs[0].shape[1]
    student = make_student(teacher, factor)
    assert student.input_shape == (None, size // factor, size // factor, 3)
    assert not _nested(student)
    pre = [la for la in student.layers if la.name.startswith("preprocess_")]
    assert len(pre) == 1 and not pre[0].trainable  # the contract, not trained
    for w_t, w_s in zip(teacher.weights, student.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w_t), to_numpy(w_s))
    downscaler = build_downscaler(
        (size, size, 3), factor, width=4, value_range=(0.0, 255.0)
    )
    trainer = ThumbNetTrainer(teacher, downscaler, student)
    # FM reads a feature map inside the classifier, not the preprocessing.
    assert not trainer.teacher_feature_layer.startswith("preprocess_")
    return student, trainer


def test_applications_resnet50_local_weights(tmp_path):
    shape = (32, 32, 3)
    classifier = _resnet50(shape, 3)
    weights = str(tmp_path / "resnet50.weights.h5")
    classifier.save_weights(weights)
    teacher = load_teacher(f"applications:ResNet50:{weights}", shape, 3)
    assert not _nested(teacher) and teacher.layers[1].name == "preprocess_caffe"
    x = _pixels((2, *shape))
    expected = classifier(
        keras.applications.resnet50.preprocess_input(x.copy()), training=False
    )
    np.testing.assert_allclose(
        to_numpy(teacher(x, training=False)), to_numpy(expected), atol=1e-4, rtol=1e-4
    )
    _, trainer = _student_and_fm(teacher)
    assert trainer.teacher_feature_layer == "conv5_block3_out"


def test_bad_teacher_specs_name_the_problem(tmp_path):
    cases = {
        "applications:ResNet51": "unknown keras.applications model 'ResNet51'",
        f"applications:ResNet50:{tmp_path}/none.h5": "weights file .* not found",
        "applications:ResNet50": "1000 classes but the dataset has 3",
        "applications:ResNet50:none": "1 channel\\(s\\); set channels=3",
        str(tmp_path / "missing.keras"): "Teacher file not found",
    }
    for spec, message in cases.items():
        shape = (32, 32, 1) if spec.endswith(":none") else (32, 32, 3)
        with pytest.raises(TeacherSpecError, match=message):
            load_teacher(spec, shape, 3)


def test_a_saved_subclassed_teacher_is_told_to_rebuild_it_functionally(tmp_path):
    """A trial (2026-11-30): `thumbnet train --teacher t_sub.keras` printed
    Keras' "Could not locate class 'Sub' ... register_keras_serializable",
    steering the user to make a class importable that no teacher can be."""

    class Sub(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.pool(x))

    model = Sub()
    model(np.zeros((1, 32, 32, 3), "float32"))
    path = tmp_path / "t_sub.keras"
    model.save(path)
    with pytest.raises(TeacherSpecError) as info:
        load_teacher(str(path), (32, 32, 3), 3)
    message = str(info.value)
    assert "uses the class 'Sub', defined in your code" in message
    assert "rebuild it functionally" in message
    # A custom layer in a Functional model: not told it is subclassed.

    class Doubled(keras.layers.Layer):
        def call(self, x):
            return 2 * x

    image = keras.Input((32, 32, 3))
    logits = keras.layers.Dense(3)(
        keras.layers.GlobalAveragePooling2D()(Doubled()(image))
    )
    keras.Model(image, logits).save(tmp_path / "t_layer.keras")
    with pytest.raises(TeacherSpecError) as info:
        load_teacher(str(tmp_path / "t_layer.keras"), (32, 32, 3), 3)
    message = str(info.value)
    assert "uses the class 'Doubled'" in message and "Python API" in message
    assert "A subclassed model" not in message


def test_weights_of_another_architecture_get_a_short_message(tmp_path):
    """Keras' weight-loading error prints every value of the variable it
    failed on (126 KB for MobileNetV2, seen by a user); the teacher error
    keeps the first sentence and says what to do."""
    shape = (32, 32, 3)
    other = keras.applications.MobileNetV2(
        input_shape=shape, alpha=0.35, weights=None, classes=3,
        classifier_activation=None,
    )  # fmt: skip
    weights = str(tmp_path / "alpha035.weights.h5")
    other.save_weights(weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TeacherSpecError) as info:
            load_teacher(f"applications:MobileNetV2:{weights}", shape, 3)
    # Keras' per-layer "Skipping nested container" warnings (103 lines for a
    # user) are dropped when the error says it all.
    assert not [w for w in caught if "Skipping" in str(w.message)], caught[:3]
    message = str(info.value)
    assert len(message) < 1000, len(message)
    assert "could not be loaded" in message and "alpha" in message
    assert ".keras file as the teacher" in message and "value=[[" not in message


def _hub_task(classes=3, image_shape=(None, None, 3), converter_size=None):
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        image_shape=image_shape,
    )
    # The ImageNet presets' converter: (x / 255 - mean) / std ("torch" mode).
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=converter_size, scale=list(1 / (255 * std)), offset=list(-mean / std)
    )
    preprocessor = keras_hub.models.ResNetImageClassifierPreprocessor(
        image_converter=converter
    )
    return keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=classes, activation=None,
        preprocessor=preprocessor,
    )  # fmt: skip


@pytest.mark.parametrize("image_shape", [(32, 32, 3), (None, None, 3)])
def test_a_hub_classifier_whose_preprocessor_resizes_derives_a_student(image_shape):
    """A preset classifier's preprocessor holds a Resizing(224, 224) (its
    image converter): outside the model's graph, it was taken for a resize
    inside the teacher and every such classifier was refused."""
    from thumbnet_keras import make_student

    task = _hub_task(image_shape=image_shape, converter_size=(224, 224))
    student = (
        make_student(task, 2) if image_shape[0] else make_student(task, size=(16, 16))
    )
    assert tuple(student.outputs[0].shape) == tuple(task.outputs[0].shape)
    assert student.inputs[0].shape[1] in (16, None)


def test_keras_hub_saved_task(tmp_path):
    task = _hub_task()
    task.save_to_preset(str(tmp_path / "preset"))
    shape = (32, 32, 3)
    teacher = load_teacher(f"keras_hub:{tmp_path / 'preset'}", shape, 3)
    assert not _nested(teacher)  # the backbone is inlined
    assert teacher.layers[1].name == "preprocess_keras_hub"
    x = _pixels((2, *shape), seed=1)
    expected = task(keras.applications.densenet.preprocess_input(x.copy()))
    np.testing.assert_allclose(
        to_numpy(teacher(x, training=False)), to_numpy(expected), atol=1e-4, rtol=1e-4
    )
    _student_and_fm(teacher)


def test_keras_hub_task_saved_as_a_keras_file(tmp_path):
    """A keras-hub user's trial (2026-12-01): `task.save("teacher.keras")`
    loaded as a plain model dropped the task's image converter (keras-hub
    applies it in predict and fit, outside the graph): the run fed [0, 1]
    images, the teacher scored chance and the report said to train it
    longer. Its converter now goes inside, as for a keras_hub: preset."""
    from thumbnet_keras.models.teacher_spec import raw_pixel_source

    task = _hub_task()
    task.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    task.fit(_pixels((4, 32, 32, 3)), np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    path = str(tmp_path / "task.keras")
    task.save(path)
    assert raw_pixel_source(path) == "keras_hub" and is_raw_pixel_teacher(path)
    plain = str(tmp_path / "plain.keras")
    tiny_teacher((32, 32, 3)).save(plain)
    assert raw_pixel_source(plain) is None
    shape = (32, 32, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = load_teacher(path, shape, 3)
    assert not [w for w in caught if "optimizer" in str(w.message)], caught
    assert teacher.layers[1].name == "preprocess_keras_hub"
    x = _pixels((2, *shape), seed=1)
    np.testing.assert_allclose(
        to_numpy(teacher(x, training=False)),
        task.predict(x, verbose=0),  # keras-hub's own path: converter, then model
        atol=1e-4,
        rtol=1e-4,
    )
    # A gray run: one line naming the fix (was numpy's broadcast error).
    with pytest.raises(TeacherSpecError, match=(
        "image converter has a scale per channel for 3 channels, but the run's "
        "images have 1; set --channels 3"
    )):  # fmt: skip
        load_teacher(path, (32, 32, 1), 3)


def test_nested_file_teacher_is_inlined(tmp_path):
    # A user's own wrapper: Rescaling + a nested classifier whose output is
    # 2-D; FM would otherwise only see the Rescaling layer's output.
    inner = _hub_task().backbone
    image = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Rescaling(1 / 255, name="preprocess_unit")(image)
    x = inner(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outer = keras.Model(image, keras.layers.Dense(3, name="logits")(x), name="user")
    outer.save(tmp_path / "user.keras")
    teacher = load_teacher(str(tmp_path / "user.keras"), (32, 32, 3), 3)
    assert not _nested(teacher) and teacher.input_shape == (None, 32, 32, 3)
    x = _pixels((2, 32, 32, 3), seed=2)
    np.testing.assert_allclose(
        to_numpy(teacher(x)), to_numpy(outer(x)), atol=1e-5, rtol=1e-5
    )
    _student_and_fm(teacher)


# ---- whole smoke flows (TensorFlow only) ----------------------------------


def _manifest(root, channels=3) -> str:
    manifest = tiny_dataset(root, "stripes", per_class=8)
    text = open(manifest).read().replace("channels: 1", f"channels: {channels}")
    with open(manifest, "w") as f:
        f.write(text)
    return manifest


def test_a_changed_keras_hub_preset_folder_is_not_resumed(tmp_path):
    """A local keras-hub preset is a folder: its files' content is a run
    input like a `.keras` teacher's, so a preset saved again under the same
    folder is not silently mixed with stages trained from the old one."""
    from thumbnet_keras.pipeline import ThumbNetParams, resolve_run
    from thumbnet_keras.pipeline.config import ConfigError
    from thumbnet_keras.pipeline.rundir import unlock_run

    preset = tmp_path / "preset"
    _hub_task(classes=2).save_to_preset(str(preset))
    params = ThumbNetParams(
        dataset=_manifest(tmp_path, 3), teacher=f"keras_hub:{preset}",
        image_size=32, smoke=True, runs_dir=str(tmp_path / "runs"), run_name="hub",
    )  # fmt: skip
    run = resolve_run(params)
    saved = json.loads(open(os.path.join(run["run_dir"], "config.json")).read())
    first = saved["inputs"]["teacher_preset_sha256"]
    assert len(first) == 64 and "teacher_sha256" not in saved["inputs"]
    os.makedirs(os.path.join(run["run_dir"], "stages"))
    with open(os.path.join(run["run_dir"], "stages", "teacher.json"), "w") as fh:
        fh.write("{}")  # A stage finished.
    unlock_run(run["run_dir"])
    assert resolve_run(params)["resumed"]  # Same folder: resumes.
    unlock_run(run["run_dir"])
    _hub_task(classes=2).save_to_preset(str(preset))  # New weights, same folder.
    with pytest.raises(ConfigError, match="keras-hub preset folder changed since"):
        resolve_run(params)


def _run_flow(root, teacher: str | None, channels=3) -> str:
    from thumbnet_keras.pipeline import run_thumbnet

    params = {
        "dataset": _manifest(root, channels),
        "teacher": teacher,
        "image_size": 32,
        "smoke": True,
        "runs_dir": str(root / "runs"),
        "run_name": "flow",
    }
    return run_thumbnet(params, verbose=0)["run_dir"]


def _check_raw_pixel_export(run_dir: str):
    """thumbnet.keras, loaded with safe_mode=True in fresh Keras-only
    processes (every backend), gives on uint8 images the logits of the
    pipeline's evaluation path (normalized batches -> E -> S)."""
    from thumbnet_keras import data
    from thumbnet_keras.pipeline.evaluate import compose
    from thumbnet_keras.pipeline.stages import load_run, stage_id

    run, config = load_run(run_dir)
    prepared = run.data()
    kwargs = dict(channels=config.channels, shuffle=False)
    size = config.image_size
    args = (prepared["prepared_dir"], "test", size, 64, False)
    raw = np.concatenate(
        [
            np.asarray(x)
            for x, _ in data.make_dataset(*args, normalization="raw", **kwargs)
        ]
    )
    pixels = np.round(raw).astype(np.uint8)
    # Images are stored at 40x40 and resized: feed the same uint8 pixels to both.
    normalized = to_numpy(
        data.normalization_layer(prepared["normalization"], config.channels)(
            pixels.astype("float32")
        )
    )
    joint = run.stage_dir(stage_id(config.factors[0], "joint"))
    load = keras.saving.load_model
    evaluation = compose(
        load(joint / "downscaler.keras"), load(joint / "student.keras"), "e"
    )
    expected = to_numpy(evaluation(normalized, training=False))
    np.save(os.path.join(run_dir, "pixels.npy"), pixels)
    code = f"""
        import json, sys, numpy as np, keras
        model = keras.saving.load_model({os.path.join(run_dir, "thumbnet.keras")!r},
                                        safe_mode=True)
        pixels = np.load({os.path.join(run_dir, "pixels.npy")!r})
        logits = model.predict(pixels, verbose=0)
        print(json.dumps({{"logits": np.asarray(logits).tolist(),
                          "input": list(model.input_shape),
                          "thumbnet": any(m.startswith("thumbnet_keras")
                                          for m in sys.modules)}}))
    """
    sidecar = json.loads(open(os.path.join(run_dir, "thumbnet_model.json")).read())
    assert sidecar["normalization"] == "none"
    assert sidecar["input_value_range"] == [0, 255]
    assert sidecar["input_size"] == [size, size]
    assert sidecar["channels"] == config.channels
    for backend in ("tensorflow", "jax", "torch"):
        env = subprocess_env() | {"KERAS_BACKEND": backend}
        out = run_python(code, env=env)
        assert not out["thumbnet"]
        assert out["input"] == [None, size, size, config.channels]
        np.testing.assert_allclose(
            np.array(out["logits"]), expected, atol=1e-4, rtol=1e-4, err_msg=backend
        )
    return prepared


@TF_ONLY
@pytest.mark.slow
def test_exported_model_takes_raw_pixels(tmp_path):
    # A run on unit-normalized gray images (tiny_cnn teacher trained here):
    # thumbnet.keras must hold the division by 255.
    run_dir = _run_flow(tmp_path, None, channels=1)
    prepared = _check_raw_pixel_export(run_dir)
    assert prepared["normalization"] == "unit"
    model = keras.saving.load_model(os.path.join(run_dir, "thumbnet.keras"))
    assert model.layers[1].name == "normalize_unit"


@TF_ONLY
@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("THUMBNET_LONG_TESTS") != "1",
    reason="the whole flow with a ResNet-50 teacher takes ~7 min on a 2-core CPU "
    "(graph building of two ResNet-50s in every stage), too long for CI's 40 "
    "minutes; set THUMBNET_LONG_TESTS=1 to run it. Covered in CI: the ResNet-50 "
    "teacher build, its preprocessing and its student "
    "(test_applications_resnet50_local_weights) and a whole flow with a "
    "keras-hub ResNet teacher (test_smoke_flow_keras_hub_resnet).",
)
def test_smoke_flow_applications_resnet50(tmp_path):
    weights = str(tmp_path / "resnet50.weights.h5")
    _resnet50((32, 32, 3), 2).save_weights(weights)
    run_dir = _run_flow(tmp_path, f"applications:ResNet50:{weights}")
    prepared = _check_raw_pixel_export(run_dir)
    assert prepared["normalization"] == "raw"
    record = json.loads(open(os.path.join(run_dir, "stages", "teacher.json")).read())
    assert record["source"] == "applications"


@TF_ONLY
@pytest.mark.slow
@pytest.mark.parametrize("saved", ["preset", "keras_file"])
def test_smoke_flow_keras_hub_resnet(tmp_path, saved):
    task = _hub_task(classes=2)
    if saved == "preset":
        task.save_to_preset(str(tmp_path / "preset"))
        teacher = f"keras_hub:{tmp_path / 'preset'}"
    else:  # task.save(): its converter goes inside as well
        teacher = str(tmp_path / "task.keras")
        task.save(teacher)
    run_dir = _run_flow(tmp_path, teacher)
    assert os.path.isfile(os.path.join(run_dir, "thumbnet.keras"))
    record = json.loads(open(os.path.join(run_dir, "stages", "teacher.json")).read())
    assert record["source"] == "keras_hub"
    data = json.loads(open(os.path.join(run_dir, "data.json")).read())
    assert data["normalization"] == "raw"  # the converter is inside T


def test_a_teacher_of_any_input_size_is_rebuilt_at_the_runs(tmp_path):
    """An edge deployer's trial (2026-11-30): a fully convolutional teacher
    saved with `Input((None, None, 3))` was refused before the run, with the
    impossible advice 'set --image-size None'."""
    from thumbnet_keras.pipeline import preflight

    image = keras.Input((None, None, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(image)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    flexible = keras.Model(image, keras.layers.Dense(2, name="logits")(x), name="fc")
    path = str(tmp_path / "flexible.keras")
    flexible.save(path)
    teacher = load_teacher(path, (16, 16, 3), 2)
    assert teacher.input_shape == (None, 16, 16, 3) and teacher.name == "fc"
    pixels = _pixels((2, 16, 16, 3))
    np.testing.assert_allclose(
        to_numpy(teacher(pixels)), to_numpy(flexible(pixels)), atol=1e-5
    )
    values = dict(
        dataset=_manifest(tmp_path, 3), teacher=path, image_size=16, smoke=True,
        runs_dir=str(tmp_path / "runs"), run_name="flex",
    )  # fmt: skip
    assert preflight.check_thumbnet(values).teacher == path  # accepted
    assert load_teacher(path, None, 2) is not None  # no run size: as saved
    gray = load_teacher(path, (16, 16, 1), 2)  # the channels disagree: as saved,
    assert gray.input_shape == (None, None, None, 3)  # for the caller to refuse


def test_a_file_that_is_no_weights_file_gets_only_keras_message(tmp_path):
    """A CLI trial passed a PNG as the weights: Keras' "File format not
    supported" was followed by "The file's weights do not fit ...", which
    is not the problem."""
    picture = tmp_path / "000.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    with pytest.raises(TeacherSpecError) as info:
        load_teacher(f"applications:MobileNetV2:{picture}", (32, 32, 3), 3)
    message = str(info.value)
    assert "format not supported" in message, message
    assert "do not fit" not in message
