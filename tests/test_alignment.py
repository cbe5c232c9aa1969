"""FM compares features of the same image regions (issue: misaligned pooling).

The geometry is checked by hand on the Fashion-MNIST teacher (tiny_cnn, four
stages, 28x28, f = 2), where naive pooling put S's cells 3.5 pixels away from
the teacher cells they were compared with, and end to end on a linear network
whose features *are* image coordinates: with the trainer's pooling, S's and
T's features agree; with the old adaptive pooling they are pixels apart.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import to_numpy

from thumbnet_keras import ThumbNetTrainer, bicubic_downscaler, make_student
from thumbnet_keras.losses import thumbnet_losses as L
from thumbnet_keras.models import backbones
from thumbnet_keras.models.alignment import (
    Axis,
    GeometryError,
    alignment_matrices,
    feature_geometry,
    fm_pooling,
)
from thumbnet_keras.models.trainer import find_feature_layer


def _centres(axis: Axis, scale: float = 1.0) -> np.ndarray:
    return scale * (axis.stride * np.arange(axis.size) + axis.offset + 0.5)


def test_fashion_mnist_teacher_geometry_by_hand():
    teacher = backbones.build("tiny_cnn", (28, 28, 1), 10, widths=[8, 8, 8, 8])
    student = make_student(teacher, 2)
    # TF "same" padding of a stride-2 3x3 conv pads (0, 1) on even inputs and
    # (1, 1) on odd ones. T: 28 -> 14 -> 7 -> 4, cell i centred on pixel 8i + 3.
    t_axes = feature_geometry(teacher, "stage3_relu", (28, 28))
    assert t_axes[0] == Axis(8.0, 3.0, 4) and t_axes[1] == t_axes[0]
    # S on 14x14: 14 -> 7 -> 4 -> 2, cell j centred on thumbnail pixel 8j + 5,
    # i.e. image x = 2 * (8j + 5.5) = 16j + 11.
    s_axes = feature_geometry(student, "stage3_relu", (14, 14))
    assert s_axes[0] == Axis(8.0, 5.0, 2)
    m_h, m_w = fm_pooling(
        teacher, "stage3_relu", student, "stage3_relu", (28, 28), (14, 14)
    )
    # S cell 0 spans image x in [3, 19]; T cells span [-0.5, 7.5], [7.5, 15.5],
    # [15.5, 23.5]: overlaps 4.5, 8, 3.5 of 16. S cell 1 spans [19, 35]:
    # 4.5 and 8 of T's cells 2 and 3 (12.5 inside T's map).
    np.testing.assert_allclose(
        m_h, [[4.5 / 16, 8 / 16, 3.5 / 16, 0], [0, 0, 4.5 / 12.5, 8 / 12.5]], atol=1e-7
    )
    np.testing.assert_array_equal(m_h, m_w)
    # Naive pooling averages T cells 0-1 (centre 7.5) for S's cell 0 (centre 11).
    assert _centres(t_axes[0])[:2].mean() == pytest.approx(7.5)
    assert _centres(s_axes[0], 2.0)[0] == pytest.approx(11.0)
    assert m_h[0] @ _centres(t_axes[0]) == pytest.approx(11.0)


@pytest.mark.parametrize(
    "name, size, factor, options",
    [
        ("tiny_cnn", 64, 2, {"widths": [8, 8, 8, 8]}),
        ("tiny_cnn", 64, 4, {"widths": [8, 8, 8]}),
        ("resnet18", 128, 2, {}),
        ("resnet50", 128, 2, {}),
        ("mobilenetv2", 128, 2, {"alpha": 0.35}),
    ],
)
def test_aligned_pooling_centres_on_student_cells(name, size, factor, options):
    teacher = backbones.build(name, (size, size, 3), 4, **options)
    student = make_student(teacher, factor)
    t_layer = find_feature_layer(teacher, None, "teacher")
    s_layer = find_feature_layer(student, None, "student")
    thumb = size // factor
    t_axis = feature_geometry(teacher, t_layer, (size, size))[0]
    s_axis = feature_geometry(student, s_layer, (thumb, thumb))[0]
    assert t_axis.size == teacher.get_layer(t_layer).output.shape[1]
    assert s_axis.size == student.get_layer(s_layer).output.shape[1]
    m_h, _ = fm_pooling(teacher, t_layer, student, s_layer, (size,) * 2, (thumb,) * 2)
    np.testing.assert_allclose(m_h.sum(axis=1), 1.0, atol=1e-6)
    s_centres = _centres(s_axis, factor)
    t_centres = _centres(t_axis)
    # Where S's cell lies inside T's map, the pooled T centre is S's centre.
    inside = (
        s_centres - factor * s_axis.stride / 2 >= t_centres[0] - t_axis.stride / 2
    ) & (s_centres + factor * s_axis.stride / 2 <= t_centres[-1] + t_axis.stride / 2)
    assert inside.any()
    np.testing.assert_allclose((m_h @ t_centres)[inside], s_centres[inside], atol=1e-4)


def _linear_box_net(size):
    """Three stride-2 box-filter convs, "same" padding, no nonlinearity: each
    feature is the mean of the pixels its cell sees."""
    inputs = keras.Input((size, size, 1), name="image")
    x = inputs
    for i in range(3):
        x = keras.layers.Conv2D(
            1,
            3,
            strides=2,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.Constant(1 / 9),
            name=f"box{i}",
        )(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x), name="box")


def _nested_box_net(size):
    """`_linear_box_net` with its convolutions in a base model called by the
    classifier, as `x = base(inputs)` or `Sequential([base, GAP, Dense])`."""
    flat = _linear_box_net(size)
    base = keras.Model(flat.inputs, flat.get_layer("box2").output, name="base")
    inputs = keras.Input((size, size, 1), name="image")
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x), name="nested")


@pytest.mark.parametrize("build", [_linear_box_net, _nested_box_net])
def test_trainer_fm_compares_the_same_image_regions(build):
    """Also with the backbone nested in the classifier (a Python-API trial:
    FM traced the base model's inner graph, could not reach the classifier's
    input, and fell back to plain pooling, cells 2.5-7.5 px apart)."""
    size = 128
    teacher = build(size)
    student = make_student(teacher, 2)
    trainer = ThumbNetTrainer(
        teacher=teacher,
        downscaler=bicubic_downscaler((size, size, 1), 2),
        student=student,
    )
    # A ramp: every pixel holds its own x coordinate. A box-filter feature is
    # then the x coordinate of what its cell sees (away from the zero border).
    ramp = np.tile(np.arange(size, dtype="float32") + 0.5, (size, 1))
    image = ramp.reshape(1, size, size, 1)
    out = trainer(image, training=False)
    _, t_map = trainer._teacher_features(image, training=False)
    s_map = to_numpy(out["features"])[0, :, :, 0]
    assert trainer.fm_pooling is not None  # traced, not the fallback
    aligned = to_numpy(L.align_pool(t_map, trainer.fm_pooling))[0, :, :, 0]
    naive = to_numpy(L.adaptive_average_pool(t_map, s_map.shape))[0, :, :, 0]
    # Interior cells (the zero padding bends the ramp at the borders).
    rows = slice(2, -2)
    cols = slice(2, -2)
    aligned_error = np.abs(aligned[rows, cols] - s_map[rows, cols]).max()
    naive_error = np.abs(naive[rows, cols] - s_map[rows, cols]).max()
    assert aligned_error < 0.2, aligned_error
    assert naive_error > 2.0, naive_error  # The old pooling compared shifted cells.


def test_untraceable_layer_raises_and_trainer_falls_back():
    inputs = keras.Input((16, 16, 1), name="image")
    x = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c0")(inputs)
    x = keras.layers.UpSampling2D(name="up")(x)
    x = keras.layers.Conv2D(2, 3, strides=2, padding="same", name="c1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    with pytest.raises(GeometryError, match="up"):
        feature_geometry(teacher, "c1", (16, 16))
    with pytest.warns(UserWarning, match="falls back to adaptive"):
        trainer = ThumbNetTrainer(
            teacher=teacher,
            downscaler=bicubic_downscaler((16, 16, 1), 2),
            student=make_student(teacher, 2),
        )
    assert trainer.fm_pooling is None
    # FM off (the default recipe, the KD baselines): nothing to warn about.
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="FM cannot trace")
        off = ThumbNetTrainer(
            teacher=teacher,
            downscaler=bicubic_downscaler((16, 16, 1), 2),
            student=make_student(teacher, 2),
            fm_weight=0.0,
        )
    assert off.fm_pooling is None


def test_alignment_matrices_reduce_to_average_pooling_when_cells_line_up():
    # T cells of width 1 at pixel i; S cells of 2 thumbnail... width 2 image px.
    m_h, m_w = alignment_matrices(
        (Axis(1.0, 0.0, 4), Axis(1.0, 0.0, 4)), (Axis(1.0, 0.0, 2),) * 2, 2.0
    )
    np.testing.assert_allclose(m_h, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    np.testing.assert_allclose(m_w, m_h)


def test_the_feature_layer_is_never_after_the_global_pooling():
    """MobileNetV3's classifier is a 1x1 Conv2D ("logits") after a global
    pooling with keepdims=True: 4-D, and it was picked as FM's feature layer
    (FM then matched logits). The last map before the pooling is picked; the
    squeeze-and-excitation blocks' products, which also follow global
    poolings, stay candidates."""
    teacher = keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, classes=5, classifier_activation=None
    )
    name = find_feature_layer(teacher, None, "teacher")
    layer = teacher.get_layer(name)
    assert name != "logits"
    assert tuple(layer.output.shape[1:]) == (2, 2, 576)
    with pytest.raises(ValueError, match="Feature layer 'logits' not found"):
        find_feature_layer(teacher, "logits", "teacher")
    multiplies = [
        x.name for x in teacher.layers if isinstance(x, keras.layers.Multiply)
    ]
    assert multiplies and all(
        find_feature_layer(teacher, m, "teacher") == m for m in multiplies
    )


def test_naming_only_the_teachers_feature_layer_pairs_the_same_student_layer():
    """A trial: `teacher_feature_layer="c2"` alone compared T's c2 with S's
    last map through a new adapter, without a word. S derived from T has the
    same layer, and FM compares it; a student without it keeps the default."""
    teacher = _linear_box_net(32)
    downscaler = bicubic_downscaler((32, 32, 1), 2)
    trainer = ThumbNetTrainer(
        teacher, downscaler, make_student(teacher, 2), teacher_feature_layer="box1"
    )
    assert trainer.student_feature_layer == "box1"
    other = keras.Sequential(
        [keras.Input((16, 16, 1)), keras.layers.Conv2D(2, 3, name="mine"),
         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)]
    )  # fmt: skip
    trainer = ThumbNetTrainer(teacher, downscaler, other, teacher_feature_layer="box1")
    assert trainer.student_feature_layer == "mine"
