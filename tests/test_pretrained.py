"""The ELPV teacher shipped in `thumbnet_keras/pretrained/` (see
docs/elpv_teacher.md): loads safely on every backend, matches its recorded
summary, and derives trainable students at f=2 and f=4."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from thumbnet_keras import make_student
from thumbnet_keras.pretrained import elpv_teacher_info, elpv_teacher_path


@pytest.fixture(scope="module")
def teacher():
    return keras.saving.load_model(elpv_teacher_path(), compile=False, safe_mode=True)


@pytest.fixture(scope="module")
def info():
    return elpv_teacher_info()


def _reference_image(size):
    # Same formula as benchmarks/train_elpv_teacher.py:reference_image.
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return (((7 * i + 3 * j) % 17) / 16.0).astype("float32")[None, :, :, None]


def test_summary_records_what_the_demo_needs(info):
    # What the shipped teacher reaches (docs/elpv_teacher.md): well above the
    # majority class. The 0.80 target is tracked there, not in a test.
    assert info["test_top1"] >= info["test_majority_top1"] + 0.1
    assert info["val_top1"] >= 0.70 and info["test_top1"] >= 0.70
    assert info["normalization"] == "unit" and info["channels"] == 1
    assert info["image_size"] % 4 == 0
    assert "non-commercial" in info["license"]
    assert info["split"]["sizes"] == {"train": 1771, "validation": 197, "test": 656}
    assert os.path.getsize(elpv_teacher_path()) <= 2 * 1024 * 1024


def test_teacher_loads_safely_with_the_recorded_shape(teacher, info):
    assert teacher.input_shape[1:] == tuple(info["input_shape"])
    assert teacher.output_shape == (None, 4)
    assert teacher.name == info["backbone"]
    logits = keras.ops.convert_to_numpy(
        teacher(_reference_image(info["image_size"]), training=False)
    )
    # Logits, not probabilities, and the same numbers on every backend.
    assert np.abs(info["reference_logits"]).max() > 1e-2
    np.testing.assert_allclose(logits[0], info["reference_logits"], atol=1e-3)


@pytest.mark.parametrize("factor", [2, 4])
def test_students_at_f2_and_f4_are_trainable(teacher, info, factor):
    student = make_student(teacher, factor)
    size = info["image_size"] // factor
    assert student.input_shape == (None, size, size, 1)
    assert student.output_shape == (None, 4)
    assert len(student.trainable_weights) == len(teacher.trainable_weights)
    student.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
        # One step: tracing a 150-layer TF graph costs more than running it
        # eagerly; JAX op-by-op is slower than jit.
        run_eagerly=keras.backend.backend() != "jax",
    )
    x = np.random.default_rng(0).uniform(size=(2, size, size, 1)).astype("float32")
    before = [w.copy() for w in student.get_weights()]
    loss = student.train_on_batch(x, np.array([0, 3]))
    assert np.isfinite(float(np.asarray(loss).reshape(-1)[0]))
    changed = [not np.array_equal(a, b) for a, b in zip(before, student.get_weights())]
    assert any(changed)


def test_run_teacher_keeps_its_input_contract(info):
    # `teacher="pretrained:elpv"` goes through models.teachers.load_teacher:
    # the file's own contract (gray [0, 1], fed by the manifest's "unit"
    # normalization), no preprocessing added, same logits.
    from thumbnet_keras.models.teachers import is_raw_pixel_teacher, load_teacher

    assert not is_raw_pixel_teacher("pretrained:elpv")
    loaded = load_teacher("pretrained:elpv", tuple(info["input_shape"]), 4)
    assert loaded.input_shape[1:] == tuple(info["input_shape"])
    assert not any(layer.name.startswith("preprocess_") for layer in loaded.layers)
    logits = keras.ops.convert_to_numpy(
        loaded(_reference_image(info["image_size"]), training=False)
    )
    np.testing.assert_allclose(logits[0], info["reference_logits"], atol=1e-3)
