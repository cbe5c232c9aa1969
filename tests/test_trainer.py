import keras
import numpy as np
import pytest
from conftest import BACKEND, run_python, tiny_teacher, to_numpy

from thumbnet_keras import (
    DownscalerPretrainer,
    ThumbNetTrainer,
    bicubic_downscaler,
    build_downscaler,
    make_student,
)
from thumbnet_keras.pipeline.preflight import keras_archive_output_activation


def _problem(rng, n=96, size=16, classes=3):
    """Labels live in period-2 stripes, which a bicubic thumbnail blurs away:
    0 plain, 1 horizontal stripes, 2 vertical stripes."""
    x = 0.4 + 0.2 * rng.random((n, size, size, 3), dtype="float32")
    y = rng.integers(0, classes, n)
    x[y == 1, ::2, :, :] += 0.4
    x[y == 2, :, ::2, :] += 0.4
    return x, y.astype("int32")


def _trainer(teacher, factor=2, **kwargs):
    shape = teacher.input_shape[1:]
    return ThumbNetTrainer(
        teacher=teacher,
        downscaler=build_downscaler(shape, factor, width=8, depth=1),
        student=make_student(teacher, factor),
        **kwargs,
    )


def _trained_teacher(x, y):
    teacher = tiny_teacher(x.shape[1:])
    teacher.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    teacher.fit(x, y, epochs=15, batch_size=32, verbose=0)
    return teacher


def test_two_stage_fit_lowers_every_term_and_keeps_teacher_frozen(rng):
    x, y = _problem(rng)
    teacher = _trained_teacher(x, y)
    before = [to_numpy(w).copy() for w in teacher.weights]
    # Default weights: MM is unit-free, and on these noise images a bicubic
    # thumbnail starts ~0.7 off in variance, so a larger MM weight would let
    # it dominate fm_pretrain and FM would not fall there.
    trainer = _trainer(teacher, stage="joint")
    trainer.compile(optimizer="adam")
    initial = trainer.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)

    trainer.stage = "fm_pretrain"
    with pytest.raises(ValueError, match="compile"):
        trainer.fit(x, epochs=1, verbose=0)
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
    h1 = trainer.fit(x, epochs=6, batch_size=32, verbose=0).history
    assert set(h1) == {"loss", "fm_loss", "mm_loss"}  # no labels needed
    assert h1["loss"][-1] < h1["loss"][0]
    assert h1["fm_loss"][-1] < h1["fm_loss"][0]

    trainer.stage = "joint"
    trainer.compile(optimizer=keras.optimizers.Adam(3e-3), metrics=["accuracy"])
    h2 = trainer.fit(x, y, epochs=6, batch_size=32, verbose=0).history
    assert {"cl_loss", "kd_loss", "fm_loss", "mm_loss", "accuracy"} <= set(h2)
    assert h2["loss"][-1] < h2["loss"][0]

    final = trainer.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    for term in ("cl_loss", "kd_loss", "fm_loss", "mm_loss"):
        assert final[term] < initial[term], (term, initial[term], final[term])

    for b, w in zip(before, teacher.weights):
        np.testing.assert_array_equal(b, to_numpy(w))  # bit-identical


def test_total_loss_is_the_weighted_sum(rng):
    x, y = _problem(rng, n=32)
    teacher = tiny_teacher(x.shape[1:])
    trainer = _trainer(
        teacher, cl_weight=0.5, kd_weight=2.0, fm_weight=3.0, mm_weight=4.0
    )
    trainer.compile(optimizer="sgd")
    logs = trainer.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    weighted = (
        0.5 * logs["cl_loss"]
        + 2 * logs["kd_loss"]
        + 3 * logs["fm_loss"]
        + 4 * logs["mm_loss"]
    )
    assert logs["loss"] == pytest.approx(weighted, rel=1e-4)


def test_config_roundtrip():
    teacher = tiny_teacher()
    trainer = _trainer(
        teacher,
        stage="fm_pretrain",
        temperature=2.5,
        kd_weight=0.3,
        mm_weight=7.0,
        teacher_feature_layer="relu0",
        student_feature_layer="relu0",
        label_smoothing=0.1,
    )
    config = trainer.get_config()
    clone = ThumbNetTrainer.from_config(config)
    for key in (
        "stage",
        "temperature",
        "cl_weight",
        "kd_weight",
        "fm_weight",
        "mm_weight",
        "teacher_feature_layer",
        "student_feature_layer",
        "label_smoothing",
    ):
        assert getattr(clone, key) == getattr(trainer, key), key
    assert clone.get_config() == config


def test_student_of_a_frozen_teacher_trains(rng):
    # Regression (issue 8): the trainer froze the caller's teacher and a
    # student derived from it afterwards (second factor) was frozen too, so
    # only E's weights trained, without a word.
    x, y = _problem(rng, n=32)
    teacher = tiny_teacher(x.shape[1:])
    _trainer(teacher)  # freezes `teacher`
    assert not teacher.trainable_weights
    trainer = _trainer(teacher, factor=4)
    student_weights = {id(v) for v in trainer.student.weights}
    trained = [v for v in trainer.trainable_weights if id(v) in student_weights]
    assert len(trained) == len(tiny_teacher(x.shape[1:]).trainable_weights)
    before = [to_numpy(v).copy() for v in trained]
    trainer.compile(optimizer=keras.optimizers.SGD(0.1))
    trainer.fit(x, y, epochs=1, batch_size=32, verbose=0)
    moved = [np.abs(b - to_numpy(v)).max() > 0 for b, v in zip(before, trained)]
    assert all(moved)


def test_frozen_or_shared_student_is_refused():
    teacher = tiny_teacher((16, 16, 3))
    frozen = make_student(teacher, 2)
    frozen.trainable = False
    with pytest.raises(ValueError, match="no trainable weights"):
        ThumbNetTrainer(teacher, build_downscaler((16, 16, 3), 2, width=4), frozen)
    # A size-agnostic teacher passed as its own student shares every weight.
    inputs = keras.Input((None, None, 3))
    h = keras.layers.Conv2D(4, 3, name="c")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    agnostic = keras.Model(inputs, keras.layers.Dense(2, name="logits")(h))
    with pytest.raises(ValueError, match="shares"):
        ThumbNetTrainer(agnostic, build_downscaler((16, 16, 3), 2, width=4), agnostic)


def test_expensive_downscaler_warns(rng):
    teacher = tiny_teacher((32, 32, 3), width=4)
    student = make_student(teacher, 2)
    with pytest.warns(UserWarning, match="costs .* of the inference model") as wide:
        ThumbNetTrainer(teacher, build_downscaler((32, 32, 3), 2, width=32), student)
    (message,) = [str(w.message) for w in wide if "inference model" in str(w.message)]
    assert "Use a narrower E" in message
    # At the narrowest width there is no narrower E to advise (a trial
    # followed the README's auto_downscaler_width and was told to use it).
    small = tiny_teacher((64, 64, 3), width=2)
    e = build_downscaler((64, 64, 3), 2, width=4)
    with pytest.warns(UserWarning, match="costs .* of the inference model") as narrow:
        ThumbNetTrainer(small, e, make_student(small, 2))
    (message,) = [str(w.message) for w in narrow if "inference model" in str(w.message)]
    assert "already at the narrowest width (4)" in message
    assert "Use a narrower E" not in message
    from thumbnet_keras import auto_downscaler_width, count_flops

    width = auto_downscaler_width((32, 32, 3), 2, student)
    e = build_downscaler((32, 32, 3), 2, width=width)
    share = count_flops(e) / (count_flops(e) + count_flops(student))
    assert share <= 0.15 or width == 4
    if width < 32:  # The next wider candidate would exceed the share.
        from thumbnet_keras.layers.downscaler import AUTO_WIDTHS

        wider = AUTO_WIDTHS[AUTO_WIDTHS.index(width) - 1]
        e2 = build_downscaler((32, 32, 3), 2, width=wider)
        assert count_flops(e2) / (count_flops(e2) + count_flops(student)) > 0.15


def test_default_feature_layers_are_last_4d_maps():
    trainer = _trainer(tiny_teacher())
    assert trainer.teacher_feature_layer == "relu1"
    assert trainer.student_feature_layer == "relu1"


def test_channel_adapter_is_trained_but_not_exported(rng):
    x, y = _problem(rng, n=32)
    teacher = tiny_teacher(x.shape[1:], width=8)
    student = tiny_teacher((8, 8, 3), width=4, name="narrow")  # 8 vs 16 channels
    trainer = ThumbNetTrainer(teacher, build_downscaler((16, 16, 3), 2), student)
    assert trainer.fm_adapter is not None
    trainer.compile(optimizer="adam")
    trainer.fit(x, y, epochs=1, batch_size=32, verbose=0)
    exported = trainer.export()
    names = {w.path for w in exported.weights}
    assert not any("fm_adapter" in n for n in names)
    assert (
        exported.count_params()
        == trainer.downscaler.count_params() + student.count_params()
    )


def test_export_matches_trainer_and_thumbnail_model(rng):
    x, y = _problem(rng, n=16)
    trainer = _trainer(tiny_teacher())
    exported = trainer.export()
    assert exported.input_shape == (None, 16, 16, 3)
    np.testing.assert_allclose(
        to_numpy(exported(x)), to_numpy(trainer(x)["logits"]), atol=1e-5
    )
    # Called without `training`, the exported model is in inference mode.
    np.testing.assert_allclose(
        to_numpy(exported(x)), to_numpy(exported(x, training=False)), atol=1e-6
    )
    thumb = trainer.export_thumbnail_model()
    assert thumb.input_shape == (None, 8, 8, 3)
    np.testing.assert_allclose(
        to_numpy(thumb(trainer.downscaler(x))), to_numpy(exported(x)), atol=1e-5
    )


def test_saved_export_loads_without_thumbnet_keras(tmp_path, rng):
    x, y = _problem(rng, n=64)
    trainer = _trainer(_trained_teacher(x, y), stage="joint")
    trainer.compile(optimizer="adam")
    trainer.fit(x, y, epochs=1, batch_size=32, verbose=0)
    path = tmp_path / "thumbnet.keras"
    # export(path) with a .keras path writes that file (it wrote a SavedModel
    # folder named thumbnet.keras, which load_model could not read).
    model = trainer.export(str(path))
    assert path.is_file()
    with pytest.raises(ValueError, match="a .keras path is the Keras file itself"):
        trainer.export(str(tmp_path / "other.keras"), format="onnx")
    np.save(tmp_path / "x.npy", x[:8])
    np.save(tmp_path / "expected.npy", to_numpy(model.predict(x[:8], verbose=0)))
    result = run_python(
        f"""
        import json, sys
        sys.modules["thumbnet_keras"] = None  # importing it now raises
        import keras, numpy as np
        model = keras.saving.load_model({str(path)!r}, safe_mode=True)
        x = np.load({str(tmp_path / "x.npy")!r})
        got = keras.ops.convert_to_numpy(model(x))
        diff = float(np.abs(got - np.load({str(tmp_path / "expected.npy")!r})).max())
        print(json.dumps({{"diff": diff, "backend": keras.backend.backend()}}))
        """
    )
    assert result["backend"] == BACKEND
    assert result["diff"] <= 1e-4


# -- bad input ---------------------------------------------------------------
def test_teacher_with_softmax_is_rejected():
    teacher = tiny_teacher()
    probs = keras.Model(
        teacher.inputs,
        keras.layers.Dense(3, activation="softmax", name="p")(
            teacher.get_layer("gap").output
        ),
    )
    with pytest.raises(ValueError, match="probabilities, not logits"):
        _trainer(probs)


def test_teacher_not_a_logits_vector_is_rejected():
    teacher = tiny_teacher()
    fmap = keras.Model(teacher.inputs, teacher.get_layer("relu1").output, name="fmap")
    with pytest.raises(ValueError, match=r"one logits vector \(B, classes\)"):
        ThumbNetTrainer(
            fmap, build_downscaler((16, 16, 3), 2), make_student(teacher, 2)
        )


def test_feature_layer_not_found_lists_candidates():
    with pytest.raises(ValueError, match=r"'nope' not found.*Candidates.*relu1"):
        _trainer(tiny_teacher(), teacher_feature_layer="nope")


def test_student_class_count_mismatch():
    teacher = tiny_teacher(num_classes=3)
    with pytest.raises(
        ValueError, match="outputs 5 logits but the teacher 'tiny' outputs 3"
    ):
        ThumbNetTrainer(
            teacher,
            build_downscaler((16, 16, 3), 2),
            tiny_teacher((8, 8, 3), num_classes=5),
        )


def test_shape_mismatches():
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="student takes"):
        ThumbNetTrainer(
            teacher, build_downscaler((16, 16, 3), 4), make_student(teacher, 2)
        )
    with pytest.raises(ValueError, match="downscaler takes"):
        ThumbNetTrainer(
            teacher, bicubic_downscaler((32, 32, 3), 4), make_student(teacher, 2)
        )


def test_bad_stage_weights_temperature_and_missing_labels(rng):
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match="`stage` must be one of"):
        _trainer(teacher, stage="finetune")
    with pytest.raises(ValueError, match="mm_weight"):
        _trainer(teacher, mm_weight=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        _trainer(teacher, temperature=0)
    trainer = _trainer(teacher, stage="joint")
    trainer.compile(optimizer="adam")
    x, _ = _problem(rng, n=8)
    with pytest.raises(ValueError, match="needs labels"):
        trainer.fit(x, epochs=1, verbose=0)


def test_float_and_one_hot_labels_are_refused_not_truncated(rng):
    """A trial (2026-11-30): `fit(x, y + 0.5)` trained on the truncated
    labels without a word; one-hot labels gave a raw framework error."""
    trainer = _trainer(tiny_teacher(), stage="joint")
    trainer.compile(optimizer="adam")
    x, y = _problem(rng, n=8)
    with pytest.raises(ValueError, match="integer class indices; received float32"):
        trainer.fit(x, y.astype("float32") + 0.5, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"shape \(.*3\)\. One-hot labels"):
        trainer.fit(x, np.eye(3, dtype="int32")[y], epochs=1, verbose=0)
    import tensorflow as tf

    floats = tf.data.Dataset.from_tensor_slices((x, y.astype("float64"))).batch(4)
    with pytest.raises(ValueError, match="received float64"):  # its element spec
        trainer.fit(floats, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="received float32"):  # before epoch 1
        trainer.fit(x, y, validation_data=(x, y.astype("float32")), verbose=0)
    unknown = tf.data.Dataset.from_tensor_slices((x, y)).map(
        lambda a, b: (a, tf.py_function(lambda v: v, [b], tf.int32))
    )  # labels of unknown rank: not refused before tracing
    from thumbnet_keras.losses.thumbnet_losses import check_fit_labels

    check_fit_labels(unknown.batch(4))
    trainer.fit(x, y[:, None], epochs=1, verbose=0)  # (batch, 1) is fine,
    # and the same trainer still trains after the refusals (nothing traced).


def test_labels_out_of_range_are_refused_before_training(rng):
    """Labels counted from 1 (1..K): TensorFlow failed mid-step and JAX's
    sparse cross-entropy read label K as an all-zero one-hot row, so those
    examples added no loss without a word."""
    trainer = _trainer(tiny_teacher(), stage="joint")  # 3 classes
    trainer.compile(optimizer="adam")
    x, y = _problem(rng, n=8)
    with pytest.raises(ValueError, match=r"\[0, 3\).*from 1 to 3\. Labels counted"):
        trainer.fit(x, y + 1, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="from -1 to"):
        trainer.fit(x, y, validation_data=(x, y - 1), epochs=1, verbose=0)
    pretrainer = DownscalerPretrainer(trainer.teacher, build_downscaler(x.shape[1:], 2))
    pretrainer.compile(optimizer="adam")
    with pytest.raises(ValueError, match=r"from 7 to 7\.$"):
        pretrainer.fit(x, np.full(len(x), 7), epochs=1, verbose=0)
    history = trainer.fit(x, y, epochs=1, verbose=0).history  # in range: trains
    assert np.isfinite(history["cl_loss"][0])


def test_whole_trainer_saves_and_loads(tmp_path, rng):
    x, y = _problem(rng, n=16)
    trainer = _trainer(tiny_teacher(), stage="joint", kd_weight=0.5)
    trainer.compile(optimizer="adam")
    trainer.fit(x, y, epochs=1, batch_size=16, verbose=0)
    trainer.save(tmp_path / "trainer.keras")
    loaded = keras.saving.load_model(tmp_path / "trainer.keras")
    assert isinstance(loaded, ThumbNetTrainer)
    assert (loaded.stage, loaded.kd_weight) == ("joint", 0.5)
    np.testing.assert_array_equal(
        to_numpy(loaded(x)["logits"]), to_numpy(trainer(x)["logits"])
    )
    history = loaded.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(history["loss"][0])


def test_export_to_onnx_runs_in_onnx_runtime(tmp_path, rng):
    # `trainer.export(path, format="onnx")` goes through the verified
    # converter (Keras' own ONNX export makes E's constants graph inputs).
    import onnxruntime

    x, _ = _problem(rng, n=8)
    trainer = _trainer(tiny_teacher(x.shape[1:]))
    model = trainer.export(tmp_path / "thumbnet.onnx", format="onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "thumbnet.onnx"))
    assert [i.name for i in session.get_inputs()] == ["image"]
    (got,) = session.run(None, {"image": x})
    expected = to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_images_only_stage_change_channels_first_and_uint8(rng):
    """A PyTorch user's trial (2026-11-30): with `metrics=["accuracy"]`
    compiled, images-only batches failed with `'NoneType' object has no
    attribute 'shape'` (in fm_pretrain, and in joint instead of "needs
    labels"); a stage changed without compile() gave Keras' generic
    message; channels-first images and uint8 pixels got no word."""
    teacher = tiny_teacher()
    x, y = _problem(rng, n=8)
    trainer = _trainer(teacher, stage="fm_pretrain")
    trainer.compile(optimizer="adam", metrics=["accuracy"])
    logs = trainer.fit(x, epochs=1, verbose=0).history
    assert "fm_loss" in logs and "accuracy" not in logs
    trainer.stage = "joint"
    with pytest.raises(ValueError, match="stage changed to .joint. since compile"):
        trainer.fit(x, y, epochs=1, verbose=0)
    trainer.compile(optimizer="adam", metrics=["accuracy"])
    with pytest.raises(ValueError, match="'joint' stage needs labels"):
        trainer.fit(x, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"channels-first .*x.permute\(0, 2, 3, 1\)"):
        trainer.fit(np.transpose(x, (0, 3, 1, 2)), y, epochs=1, verbose=0)
    with pytest.warns(UserWarning, match="Images are uint8"):
        trainer.fit((255 * x).astype("uint8"), y, epochs=1, verbose=0)
    from thumbnet_keras.models.trainer import warn_torch_jit

    if keras.backend.backend() == "torch":  # warned by fit (not run here: slow)
        with pytest.warns(UserWarning, match="torch.compile"):
            warn_torch_jit(True)


def test_teacher_ending_in_a_softmax_op_is_refused(tmp_path):
    """A Python-API trial (2026-11-30): `keras.ops.softmax` at the end is an
    operation, not a layer, and was accepted; CL then trained on
    probabilities read as logits (cl_loss stuck near log K) and KD on
    nothing."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, padding="same")(inputs)
    )
    logits = keras.layers.Dense(3)(x)
    for op in (keras.ops.softmax, keras.ops.sigmoid):
        teacher = keras.Model(inputs, op(logits), name="probs")
        kind = op.__name__
        with pytest.raises(ValueError, match=f"ends in a {kind} .*not logits"):
            _trainer(teacher)
        teacher.save(tmp_path / f"{kind}.keras")  # what the CLI reads, no Keras
        assert keras_archive_output_activation(str(tmp_path / f"{kind}.keras")) == kind
    wrapped = keras.Sequential(  # the softmax inside a nested model
        [keras.Input((16, 16, 3)), keras.Model(inputs, keras.ops.softmax(logits))]
    )
    with pytest.raises(ValueError, match="ends in a softmax"):
        DownscalerPretrainer(wrapped, build_downscaler((16, 16, 3), 2))
    _trainer(keras.Model(inputs, logits))  # the same model with logits: fine


def test_teacher_ending_in_a_lambda_softmax_is_refused():
    """A Python-API trial (2026-11-30): `Lambda(keras.ops.softmax)` at the end
    says nothing about its function in the config, was taken for a logits
    model, and KD trained on nothing (kd_loss 1.5e-05). Such an output is
    probed: rows of probabilities are refused; a Lambda that keeps logits
    is not."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, padding="same")(inputs)
    )
    logits = keras.layers.Dense(3)(x)
    probs = keras.Model(inputs, keras.layers.Lambda(keras.ops.softmax)(logits))
    with pytest.raises(ValueError, match="ends in a softmax .*not logits"):
        ThumbNetTrainer(
            probs,
            build_downscaler((16, 16, 3), 2, width=8, depth=1),
            make_student(tiny_teacher(), 2),
        )
    scaled = keras.Model(inputs, keras.layers.Lambda(lambda v: 2.0 * v)(logits))
    ThumbNetTrainer(
        scaled,
        build_downscaler((16, 16, 3), 2, width=8, depth=1),
        make_student(tiny_teacher(), 2),
    )


def test_images_that_do_not_fit_e_are_refused_in_one_line(rng):
    """A Python-API trial (2026-11-30): gray images given to an RGB trainer
    (or RGB to a gray one) failed in a Reshape deep inside E ("The total
    size of the tensor must be unchanged"), for arrays and tf.data alike."""
    x, y = _problem(rng, n=8)
    for trainer in (
        _trainer(tiny_teacher()),
        DownscalerPretrainer(tiny_teacher(), build_downscaler((16, 16, 3), 2)),
    ):
        trainer.compile(optimizer="adam")
        with pytest.raises(ValueError, match=r"channels differ.*np.repeat"):
            trainer.fit(x[..., :1], y, epochs=1, verbose=0)
        with pytest.raises(ValueError, match=r"\(their height and width differ\)"):
            trainer.fit(x[:, :8, :8], y, epochs=1, verbose=0)
    import tensorflow as tf

    gray = tf.data.Dataset.from_tensor_slices((x[..., :1], y)).batch(4)
    with pytest.raises(ValueError, match=r"\(N, 16, 16, 3\).*channels differ"):
        trainer.fit(gray, epochs=1, verbose=0)


def test_images_far_outside_e_s_value_range_are_refused(rng):
    """A Python-API trial (2026-11-30): images on 0-255 given to an E built
    with `value_range=(0, 1)` trained without a word, every thumbnail
    clipped to 1, and the exported model gave the same logits for every
    image. Both trainers read E's range from its clip layers (the
    pretrainer's own `value_range` too); images in range still train."""
    x, y = _problem(rng, n=8)  # values in [0.4, 1.0]
    teacher = tiny_teacher()
    e = build_downscaler((16, 16, 3), 2, width=8, depth=1, value_range=(0, 1))
    trainers = (
        ThumbNetTrainer(teacher, e, make_student(teacher, 2)),
        DownscalerPretrainer(
            teacher, build_downscaler((16, 16, 3), 2), value_range=(0, 1)
        ),
    )
    for trainer in trainers:
        trainer.compile(optimizer="adam")
        with pytest.raises(
            ValueError, match=r"range over \[.*\], but E clips .*\(0, 1\)"
        ):
            trainer.fit(255 * x, y, epochs=1, verbose=0)
        trainer.fit(x, y, epochs=1, verbose=0)
    # An E without a range takes any values (a teacher may read 0-255 floats).
    free = _trainer(teacher)
    free.compile(optimizer="adam")
    free.fit(255 * x, y, epochs=1, verbose=0)


@pytest.mark.parametrize("pretrainer", [False, True])
def test_term_metrics_are_example_means_like_loss(rng, pretrainer):
    """A Python-API trial (2026-11-30): each term's epoch value was the plain
    mean of its batches while Keras weights `loss` by examples, so with a
    short last batch (40 images in batches of 16) `loss` was not the
    weighted sum of the terms (2.9446 against 2.9873). With a zero learning
    rate every batch sees the same weights, and the sum must hold."""
    x, y = _problem(rng, n=40)
    teacher = tiny_teacher()
    if pretrainer:
        trainer = DownscalerPretrainer(
            teacher, build_downscaler((16, 16, 3), 2), cl_weight=1.3, kd_weight=0.7
        )
        weights = {"cl": 1.3, "kd": 0.7}
    else:
        weights = {"cl": 1.3, "kd": 0.7, "fm": 0.5, "mm": 2.0}
        trainer = _trainer(teacher, **{f"{k}_weight": v for k, v in weights.items()})
    trainer.compile(optimizer=keras.optimizers.SGD(0.0))
    logs = trainer.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False).history
    total = sum(w * logs[f"{t}_loss"][0] for t, w in weights.items())
    np.testing.assert_allclose(logs["loss"][0], total, rtol=1e-5)
    at_once = trainer.evaluate(x, y, batch_size=40, verbose=0, return_dict=True)
    batched = trainer.evaluate(x, y, batch_size=16, verbose=0, return_dict=True)
    for term in set(weights) - {"mm"}:  # MM's scale is the batch's own
        np.testing.assert_allclose(
            batched[f"{term}_loss"], at_once[f"{term}_loss"], rtol=1e-5
        )


def _nested_teacher():
    """The usual transfer-learning shape: a base model inside a Sequential
    classifier."""
    image = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(image)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    base = keras.Model(image, x, name="base")
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            base,
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ],
        name="nested",
    )


def test_a_base_model_nested_in_the_teacher_gives_the_feature_map(rng):
    """The trial's `Sequential([Input, MobileNetV2 base, GAP, Dense])`
    failed in the constructor: the nested base's `.output` belongs to its
    own graph ("Output with path `1` is not connected to `inputs`")."""
    teacher = _nested_teacher()
    trainer = _trainer(teacher, stage="joint")
    assert trainer.teacher_feature_layer == "base"
    x, y = _problem(rng, n=8)
    _, t_features = trainer._teacher_features(x)
    assert tuple(t_features.shape) == (8, 8, 8, 8)
    np.testing.assert_allclose(
        to_numpy(t_features), to_numpy(teacher.get_layer("base")(x)), atol=1e-6
    )
    trainer.compile(optimizer="adam")
    history = trainer.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    assert np.isfinite(history["fm_loss"][0])


def test_a_subclassed_teacher_is_told_what_is_needed():
    class SubTeacher(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.conv = keras.layers.Conv2D(4, 3)
            self.pool = keras.layers.GlobalAveragePooling2D()
            self.head = keras.layers.Dense(3)

        def call(self, x):
            return self.head(self.pool(self.conv(x)))

    sub = SubTeacher()
    sub(np.zeros((1, 16, 16, 3), "float32"))
    for build in (lambda: make_student(sub, 2), lambda: _trainer_on(sub)):
        with pytest.raises(ValueError, match="'sub' is a subclassed keras.Model"):
            build()
    image = keras.Input((16, 16, 3))
    wrapped = keras.Model(image, sub(image))  # a graph around an unregistered class
    with pytest.raises(ValueError, match="register_keras_serializable") as info:
        make_student(wrapped, 2)
    assert "smaller factor" not in str(info.value)


def _trainer_on(teacher):
    return ThumbNetTrainer(
        teacher, build_downscaler((16, 16, 3), 2), make_student(tiny_teacher(), 2)
    )


def test_sample_weights_refused_and_a_failed_step_keeps_the_weights(rng):
    """A trial on JAX (2026-11-30): `fit(..., class_weight=...)` raised
    inside the first step, and Keras' JAX loop had detached every
    variable's value for the loop: the user's teacher, E and S were left
    without weights ("'NoneType' object is not callable")."""
    import tensorflow as tf

    teacher = tiny_teacher()
    trainer = _trainer(teacher, stage="joint")
    trainer.compile(optimizer="adam", metrics=["accuracy"])
    x, y = _problem(rng, n=8)
    # Trainable weights: torch's eager forward pass updates BatchNorm's
    # moving statistics before the loss raises.
    before = [to_numpy(w) for w in trainer.trainable_weights]
    expected = to_numpy(teacher(x))
    with pytest.raises(ValueError, match="does not support `class_weight`"):
        trainer.fit(x, y, class_weight={0: 1.0, 1: 2.0, 2: 1.0}, verbose=0)
    with pytest.raises(ValueError, match="does not support `sample_weight`"):
        trainer.fit(x, y, sample_weight=np.ones(8), verbose=0)
    weighted = tf.data.Dataset.from_tensor_slices((x, y, np.ones(8))).batch(4)
    with pytest.raises(ValueError, match=r"\(images, labels, weights\)"):
        trainer.fit(weighted, verbose=0)

    def floats():  # a generator: its labels are only seen inside the step
        yield x, y.astype("float32")

    with pytest.raises(ValueError, match="integer class indices"):
        trainer.fit(floats(), epochs=1, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match="needs labels"):
        trainer.evaluate(x, verbose=0)  # joint: no labels, refused before a step
    with pytest.raises(ValueError, match="integer class indices"):
        trainer.evaluate(floats(), steps=1, verbose=0)  # fails in the step
    for got, want in zip(trainer.trainable_weights, before):
        np.testing.assert_array_equal(to_numpy(got), want)
    np.testing.assert_allclose(to_numpy(teacher(x)), expected, atol=1e-6)
    history = trainer.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    assert np.isfinite(history["loss"][0])  # and it still trains


def test_a_failed_evaluate_after_on_batch_calls_keeps_the_current_weights(rng):
    """Review (2026-11-30): `train_on_batch` leaves its state in Keras'
    `_jax_state`; restoring from it after a failed `evaluate` put back
    those older weights over ones set since, without a word."""
    trainer = _trainer(tiny_teacher(), stage="joint")
    trainer.compile(optimizer="adam")
    x, y = _problem(rng, n=8)
    trainer.train_on_batch(x, y)
    trainer.set_weights([np.full(w.shape, 0.5, "float32") for w in trainer.weights])
    current = [to_numpy(w) for w in trainer.trainable_weights]

    def floats():  # labels only seen inside the step, so the step fails
        yield x, y.astype("float32")

    with pytest.raises(ValueError, match="integer class indices"):
        trainer.evaluate(floats(), steps=1, verbose=0)
    for got, want in zip(trainer.trainable_weights, current):
        np.testing.assert_array_equal(to_numpy(got), want)
    with pytest.raises(ValueError, match="sample weights; validation_data"):
        trainer.fit(x, y, validation_data=(x, y, np.ones(8)), verbose=0)
    with pytest.raises(ValueError, match="does not support `sample_weight`"):
        trainer.evaluate(x, y, sample_weight=np.ones(8), verbose=0)


@pytest.mark.parametrize("kind", ["ThumbNetTrainer", "DownscalerPretrainer"])
def test_accuracy_after_a_failed_call_is_the_models(rng, kind):
    """A trial on torch (2026-12-01): Keras builds the compiled metrics from
    the first batch before the loss refuses it; after one `evaluate` or
    `fit` with one-hot labels, "accuracy" stayed categorical and every later
    call with class indices reported near-chance accuracy (torch and JAX:
    0.05 where the model's was 0.41). `evaluate` now checks its labels as
    `fit` does, and a failed call leaves the metrics to be built again."""
    from thumbnet_keras import DownscalerPretrainer

    x, y = _problem(rng, n=32)
    teacher = tiny_teacher()
    if kind == "ThumbNetTrainer":
        model = _trainer(teacher, stage="joint")
    else:
        model = DownscalerPretrainer(teacher, build_downscaler((16, 16, 3), 2, width=8))
    model.compile(optimizer="adam", metrics=["accuracy"])
    one_hot = np.eye(3, dtype="float32")[y]
    with pytest.raises(ValueError, match="Labels must be class indices"):
        model.evaluate(x, one_hot, verbose=0)  # refused before a step now

    def one_hot_batches():  # seen only inside the step: it fails there
        yield x, one_hot

    with pytest.raises(ValueError, match="Labels must be class indices"):
        model.fit(one_hot_batches(), epochs=1, steps_per_epoch=1, verbose=0)
    if kind == "ThumbNetTrainer":
        predicted = to_numpy(model.export()(x)).argmax(-1)
    else:  # the teacher reading E's thumbnail scaled back up
        predicted = to_numpy(model.predict(x, verbose=0)).argmax(-1)
    expected = float(np.mean(predicted == y))
    assert 0 < expected < 1  # so a categorical reading could not match it
    logs = model.evaluate(x, y, batch_size=32, verbose=0, return_dict=True)
    assert logs["accuracy"] == pytest.approx(expected, abs=1e-6)


def test_an_unbuilt_sequential_teacher_is_told_to_start_with_an_input():
    unbuilt = keras.Sequential(
        [keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()],
        name="seq",
    )
    with pytest.raises(ValueError, match="'seq' is a Sequential model with no input"):
        make_student(unbuilt, 2)
