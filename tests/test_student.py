import keras
import numpy as np
import pytest
from conftest import tiny_teacher, to_numpy

from thumbnet_keras import make_student
from thumbnet_keras.models import backbones


def _pool_names(model):
    return [
        layer.name
        for layer in model.layers
        if isinstance(layer, keras.layers.MaxPooling2D)
    ]


def test_global_pool_teacher_keeps_architecture_and_weights(rng):
    teacher = tiny_teacher((16, 16, 3))
    student = make_student(teacher, 2)
    assert student.input_shape == (None, 8, 8, 3)
    assert student.output_shape == teacher.output_shape
    assert [x.name for x in student.layers] == [x.name for x in teacher.layers]
    for t, s in zip(teacher.weights, student.weights):
        np.testing.assert_array_equal(to_numpy(t), to_numpy(s))
    # Weights are copies, not shared.
    student.weights[0].assign(np.zeros(student.weights[0].shape))
    assert np.abs(to_numpy(teacher.weights[0])).sum() > 0
    # S computes what the teacher's own layers compute on a thumbnail: run
    # T's layers (conv, BN, ReLU, global pool, dense: all size-agnostic) one
    # by one on an 8x8 input and compare.
    thumb = rng.random((2, 8, 8, 3), dtype="float32")
    fresh = make_student(teacher, 2)
    x = thumb
    for layer in teacher.layers[1:]:
        x = layer(x, training=False)
    np.testing.assert_allclose(
        to_numpy(fresh(thumb, training=False)), to_numpy(x), rtol=1e-5, atol=1e-5
    )


def test_student_of_a_frozen_teacher_is_trainable():
    # Regression: the config copied `trainable: false`, so a student of a
    # frozen teacher (e.g. one already handed to a ThumbNetTrainer) had no
    # trainable weights and only E trained.
    teacher = backbones.build("resnet18", (32, 32, 3), 10)
    trainable = len(teacher.trainable_weights)
    teacher.trainable = False
    for factor in (2, 4):
        student = make_student(teacher, factor)
        assert student.trainable
        assert len(student.trainable_weights) == trainable
        assert all(layer.trainable for layer in student._flatten_layers())
    assert not teacher.trainable_weights  # The teacher itself stays frozen.


def test_student_at_an_arbitrary_size():
    teacher = tiny_teacher((16, 16, 3))
    student = make_student(teacher, size=(10, 10))
    assert student.input_shape == (None, 10, 10, 3)
    for t, s in zip(teacher.weights, student.weights):
        np.testing.assert_array_equal(to_numpy(t), to_numpy(s))
    with pytest.raises(ValueError, match="exactly one"):
        make_student(teacher, 2, size=(8, 8))
    with pytest.raises(ValueError, match="larger than"):
        make_student(teacher, size=(20, 20))
    with pytest.raises(ValueError, match="fixed spatial size"):
        make_student(tiny_teacher((16, 16, 3), head="flatten"), size=(10, 10))


@pytest.mark.parametrize("factor, kept", [(2, ["pool0"]), (4, [])])
def test_flatten_head_drops_last_poolings(factor, kept, rng):
    teacher = tiny_teacher((16, 16, 3), head="flatten")
    student = make_student(teacher, factor)
    assert student.input_shape == (None, 16 // factor, 16 // factor, 3)
    assert _pool_names(student) == kept
    for t, s in zip(teacher.weights, student.weights):
        np.testing.assert_array_equal(to_numpy(t), to_numpy(s))
    # The Flatten sees the same 4x4 map the teacher's Dense was built for.
    assert (
        student.get_layer("flatten").output.shape
        == teacher.get_layer("flatten").output.shape
    )
    out = to_numpy(
        student(rng.random((2, 16 // factor, 16 // factor, 3), dtype="float32"))
    )
    assert out.shape == (2, 3)


def test_student_of_a_frozen_sequential_teacher_is_trainable():
    """On TensorFlow, a Sequential model's `trainable` setter does not reach
    its layers once they were rebuilt from a frozen config: S of a frozen
    Sequential teacher had 0 trainable weights (a trial; JAX and torch had
    them all)."""
    teacher = keras.Sequential(
        [keras.Input((16, 16, 1)), keras.layers.Conv2D(4, 3),
         keras.layers.BatchNormalization(), keras.layers.GlobalAveragePooling2D(),
         keras.layers.Dense(3)]
    )  # fmt: skip
    trainable = len(teacher.trainable_weights)
    teacher.trainable = False
    student = make_student(teacher, 2)
    assert len(student.trainable_weights) == trainable == 6
    assert all(layer.trainable for layer in student.layers)
    assert not teacher.trainable_weights


def test_an_adapted_normalization_layer_keeps_its_statistics(rng, tmp_path):
    """A teacher that normalizes inside with `Normalization().adapt(images)`:
    S got the adapted mean and variance as weights, but the layer computes
    with tensors that Keras makes from them only after adapt() or loading,
    so S normalized with mean 0, variance 1, and differed from itself saved
    and loaded again (logits off by ~850 in a trial)."""
    images = rng.random((32, 16, 16, 3), dtype="float32") * 255.0
    norm = keras.layers.Normalization()
    norm.adapt(images)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(norm(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(3)(x))
    thumbs = images[:4, ::2, ::2]
    for student in (make_student(teacher, 2), make_student(teacher, size=(8, 8))):
        path = tmp_path / f"{student.name}.keras"
        student.save(path)
        reloaded = keras.saving.load_model(path)
        np.testing.assert_allclose(
            to_numpy(student(thumbs)), to_numpy(reloaded(thumbs)), rtol=1e-4, atol=1e-3
        )
        # The student's layers compute what the teacher's do, at 8x8.
        x = thumbs
        for layer in teacher.layers[1:]:
            x = layer(x)
        np.testing.assert_allclose(
            to_numpy(student(thumbs)), to_numpy(x), rtol=1e-4, atol=1e-3
        )


def test_sequential_teacher():
    teacher = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(4, 3, padding="same"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(5),
        ],
        name="seq",
    )
    student = make_student(teacher, 2)
    assert student.input_shape == (None, 8, 8, 1)
    assert student.output_shape == (None, 5)
    assert not _pool_names(student)


def test_size_agnostic_teacher():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(2)(x))
    student = make_student(teacher, 4)
    assert student.input_shape == (None, None, None, 3)
    assert student.name == f"{teacher.name}_student"


def test_fixed_head_that_cannot_be_fixed_asks_for_explicit_student():
    import pickle

    from thumbnet_keras.models.student import StudentDerivationError

    teacher = tiny_teacher((16, 16, 3), head="flatten")  # two poolings only
    with pytest.raises(ValueError, match="pass it as `ThumbNetTrainer") as caught:
        make_student(teacher, 8)
    # The command line's own advice, and the error survives pickling (it
    # may leave a Prefect task or a worker process).
    error = caught.value
    assert isinstance(error, StudentDerivationError)
    assert error.cli_advice.startswith("Choose a smaller factor")  # 2x2: too small
    again = pickle.loads(pickle.dumps(error))
    assert (str(again), again.reason, again.cli_advice) == (
        str(error), error.reason, error.cli_advice
    )  # fmt: skip
    with pytest.raises(ValueError, match="pass it as `ThumbNetTrainer") as caught:
        make_student(tiny_teacher((24, 24, 3), head="flatten"), 3)  # not a power of 2
    assert "global pooling layer" in caught.value.cli_advice  # The head's fix.
    assert "ThumbNetTrainer" not in caught.value.cli_advice


def test_a_teacher_with_a_lambda_gets_the_real_reason():
    """A Python-API trial (2026-11-30): a teacher with a `Lambda` was refused
    as "does not build at 8x8 inputs", advising a smaller factor, which
    cannot help: safe mode does not rebuild a Lambda's function."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Lambda(lambda v: v * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(x))
    teacher = keras.Model(inputs, keras.layers.Dense(3)(x))
    with pytest.raises(ValueError, match="contains a `Lambda` layer") as caught:
        make_student(teacher, 2)
    assert "smaller factor" not in caught.value.cli_advice
    assert "register_keras_serializable" in str(caught.value)


def test_bad_factor():
    with pytest.raises(ValueError, match="not divisible by factor=3"):
        make_student(tiny_teacher((16, 16, 3)), 3)
    with pytest.raises(ValueError, match="factor"):
        make_student(tiny_teacher((16, 16, 3)), 1)


def test_a_path_instead_of_a_model_says_load_it():
    with pytest.raises(TypeError, match=r"received 'teacher.keras'\. Load it first"):
        make_student("teacher.keras", 2)


def test_weight_copies_keep_adapted_preprocessing_layers(rng):
    """`models.weights.copy_weights` (every weight copy of the package):
    Normalization takes its adapted statistics (`finalize_state`), and an
    adapted Discretization keeps the bin boundaries its config carries
    (calling its finalize_state too emptied them, the review found)."""
    from thumbnet_keras.models.weights import copy_weights

    values = rng.random((64, 3), dtype="float32") * 10.0
    norm, bins = keras.layers.Normalization(), keras.layers.Discretization(num_bins=4)
    norm.adapt(values)
    bins.adapt(values)
    inputs = keras.Input((3,))
    source = keras.Model(inputs, [norm(inputs), bins(inputs)])
    copy = keras.Model.from_config(source.get_config())
    copy_weights(source, copy)
    for got, want in zip(copy(values[:8]), source(values[:8])):
        np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=1e-5, atol=1e-5)


def test_a_global_pool_teacher_is_never_given_fewer_poolings():
    """A Python-API trial: DenseNet121 at f=4 does not build at the
    thumbnail's size (a 2x2 pooling meets a 1x1 map); make_student then
    removed two transition poolings and returned another architecture
    without a word. A global-pool head keeps its architecture or is refused
    naming the cause; a Flatten head still loses its last poolings."""
    image = keras.Input((32, 32, 3))
    x = image
    for i in range(4):
        x = keras.layers.Conv2D(4, 3, padding="same", name=f"c{i}")(x)
        x = keras.layers.AveragePooling2D(2, name=f"pool{i}")(x)  # 32 -> 2
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    teacher = keras.Model(image, keras.layers.Dense(3, name="logits")(x))
    assert len(make_student(teacher, 2).layers) == len(teacher.layers)
    with pytest.raises(ValueError, match=r"does not build at 8x8 inputs") as info:
        make_student(teacher, 4)
    assert "\x1b[" not in str(info.value)  # Keras' colour codes stripped
    assert info.value.cli_advice.startswith("Choose a smaller factor")


def test_a_resize_inside_the_teacher_is_scaled_or_refused():
    """A trial: a teacher resizing its input to its own size (a no-op) gave
    an S that resized the thumbnail back to full size, 1.3x the teacher's
    cost in the exported model. A resize to the input's own size now follows
    the thumbnail; any other fixed size is refused."""
    from thumbnet_keras import count_flops

    def teacher_resizing_to(size):
        image = keras.Input((32, 32, 3))
        x = keras.layers.Resizing(size, size, name="resize")(image)
        x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="c")(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(image, keras.layers.Dense(3)(x), name=f"to{size}")

    teacher = teacher_resizing_to(32)
    student = make_student(teacher, 2)
    assert student.get_layer("resize").height == 16
    assert count_flops(teacher) / count_flops(student) == pytest.approx(4, rel=0.05)
    for build in (
        lambda t: make_student(t, 2),
        lambda t: make_student(t, size=(20, 20)),
    ):
        with pytest.raises(
            ValueError, match=r"layer 'resize' resizes every input to 64x64"
        ):
            build(teacher_resizing_to(64))


def test_a_model_nested_mid_network_is_rebuilt_at_the_thumbnail_scale(rng):
    """keras.applications' ConvNeXt calls Sequential downsampling blocks
    built for a fixed map (16x16 in a 64x64 teacher); make_student kept their
    input size and refused the teacher as "does not build". Their inputs are
    scaled by the factor; S computes what T's layers compute at that size."""
    image = keras.Input((64, 64, 3))
    x = keras.layers.Conv2D(8, 4, strides=4, name="stem")(image)  # 16x16
    block = keras.Sequential(
        [keras.Input((16, 16, 8)), keras.layers.Conv2D(16, 2, strides=2, name="down")],
        name="block",
    )
    x = keras.layers.GlobalAveragePooling2D()(block(x))
    teacher = keras.Model(image, keras.layers.Dense(3, name="logits")(x))
    student = make_student(teacher, 2)
    assert student.get_layer("block").input_shape == (None, 8, 8, 8)
    thumb = rng.random((2, 32, 32, 3), dtype="float32")
    x = thumb
    for layer in teacher.layers[1:]:
        x = layer(x)
    np.testing.assert_allclose(to_numpy(student(thumb)), to_numpy(x), atol=1e-5)


def test_count_flops_knows_convnext_layer_scale():
    import warnings

    from thumbnet_keras import count_flops

    teacher = keras.applications.ConvNeXtTiny(
        weights=None, input_shape=(32, 32, 3), classes=3, classifier_activation=None
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count_flops(teacher)
    assert not [w for w in caught if "LayerScale" in str(w.message)]


def test_a_nested_flatten_head_still_loses_the_last_poolings(rng):
    """The review of the nested-model scaling: a Flatten + Dense head built
    as its own model for the teacher's 8x8 map was scaled to 4x4, and the
    student that drops the last pooling (its map 8x8 again) was refused."""
    image = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c0")(image)
    x = keras.layers.MaxPooling2D(2, name="pool0")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)  # 8x8
    head_in = keras.Input((8, 8, 4))
    head = keras.Model(
        head_in, keras.layers.Dense(3)(keras.layers.Flatten()(head_in)), name="head"
    )
    teacher = keras.Model(image, head(x))
    student = make_student(teacher, 2)
    assert student.input_shape == (None, 16, 16, 3)
    assert _pool_names(student) == ["pool0"]
    thumb = rng.random((2, 16, 16, 3), dtype="float32")
    expected = teacher.get_layer("head")(
        teacher.get_layer("pool0")(teacher.get_layer("c0")(thumb))
    )
    np.testing.assert_allclose(to_numpy(student(thumb)), to_numpy(expected), atol=1e-5)


def test_too_small_at_factor_2_does_not_advise_a_smaller_factor():
    """A CLI trial: ConvNeXt at 32 (16x16 thumbnails) was told "Choose a
    smaller factor" at f=2, the smallest there is."""
    image = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 5, name="c")(image)  # valid: 16 -> 12, 8 -> 4
    x = keras.layers.Conv2D(4, 5, name="d")(x)  # 12 -> 8, 4 -> 0
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(image, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="does not build at 8x8") as info:
        make_student(teacher, 2)
    assert "smaller factor" not in str(info.value)
    assert info.value.cli_advice.startswith("Choose a larger --image-size")
