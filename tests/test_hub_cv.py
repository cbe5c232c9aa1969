"""Teachers built with keras-hub (maintained) and keras-cv 0.9 (final release).

Presets download from Kaggle, so each test builds a small ResNet from an
explicit config and trains one ThumbNet step with a derived student.
"""

import numpy as np
import pytest
from conftest import to_numpy

from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student


def _train_one_step(teacher):
    student = make_student(teacher, 2)
    assert student.input_shape == (None, 16, 16, 3)
    assert type(student) is type(teacher)
    trainer = ThumbNetTrainer(
        teacher, build_downscaler((32, 32, 3), 2, width=8), student
    )
    assert trainer.teacher_feature_layer.startswith("res_net_backbone")
    before = [to_numpy(w).copy() for w in teacher.weights]
    trainer.compile(optimizer="adam")
    rng = np.random.default_rng(0)
    x = rng.random((8, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 3, 8).astype("int32")
    history = trainer.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    for term in ("cl_loss", "kd_loss", "fm_loss", "mm_loss"):
        assert np.isfinite(history[term][0])
    for b, w in zip(before, teacher.weights):
        np.testing.assert_array_equal(b, to_numpy(w))
    return trainer


def test_keras_hub_resnet_teacher():
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=False,
        image_shape=(32, 32, 3),
    )
    teacher = keras_hub.models.ResNetImageClassifier(
        backbone=backbone, num_classes=3, activation=None
    )
    _train_one_step(teacher)


def test_keras_cv_resnet_teacher():
    keras_cv = pytest.importorskip("keras_cv")
    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 16],
        stackwise_blocks=[1, 1],
        stackwise_strides=[1, 2],
        include_rescaling=False,
        input_shape=(32, 32, 3),
        block_type="basic_block",
    )
    teacher = keras_cv.models.ImageClassifier(
        backbone=backbone, num_classes=3, activation=None
    )
    _train_one_step(teacher)
