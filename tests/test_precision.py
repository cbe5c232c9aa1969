"""Mixed precision and XLA: `pipeline.compute` on the current backend.

A few steps of a tiny ThumbNet under each dtype policy: the losses are finite,
every variable stays float32, the layers compute in the dtype asked for, and
mixed_float16 trains through a LossScaleOptimizer.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND, tiny_teacher

from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student
from thumbnet_keras.pipeline import ConfigError
from thumbnet_keras.pipeline.compute import (
    jit_compile_option,
    precision_scope,
    with_precision,
)
from thumbnet_keras.pipeline.recipe import SparseCrossentropy


def _data(n=8):
    rng = np.random.default_rng(0)
    x = rng.random((n, 16, 16, 3), dtype="float32")
    return x, rng.integers(0, 3, n).astype("int32")


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_trainer_steps_under_mixed_precision(precision):
    compute = precision.removeprefix("mixed_")
    keras.utils.set_random_seed(0)
    saved = tiny_teacher()  # float32, as a loaded .keras teacher would be
    with precision_scope(precision):
        teacher = with_precision(saved, precision)
        student = make_student(teacher, 2)
        trainer = ThumbNetTrainer(
            teacher, build_downscaler((16, 16, 3), 2, width=8), student
        )
        trainer.compile(optimizer=keras.optimizers.SGD(0.01))
        x, y = _data()
        history = trainer.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert keras.config.dtype_policy().name == "float32"  # restored
    for key in ("loss", "cl_loss", "kd_loss", "fm_loss", "mm_loss"):
        assert np.isfinite(history[key][-1]), key
    assert {v.dtype for v in trainer.variables} == {"float32"}
    assert student.get_layer("conv0").compute_dtype == compute
    assert teacher.get_layer("conv0").compute_dtype == compute
    assert trainer.downscaler.get_layer("residual_conv").compute_dtype == compute
    is_scaled = isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)
    assert is_scaled == (precision == "mixed_float16")
    # The teacher's weights were carried over, and a float32 copy is exact.
    back = with_precision(teacher, "float32")
    for a, b in zip(back.get_weights(), saved.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(back(x)),
        keras.ops.convert_to_numpy(saved(x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_downscaler_pretrainer_steps_in_mixed_bfloat16():
    """E alone through the teacher (the e_pretrain stage) in bfloat16: the
    up-scaled thumbnail and the losses stay finite, variables float32."""
    from thumbnet_keras.models.downscaler_pretrainer import DownscalerPretrainer

    keras.utils.set_random_seed(0)
    saved = tiny_teacher()
    with precision_scope("mixed_bfloat16"):
        teacher = with_precision(saved, "mixed_bfloat16")
        e = build_downscaler((16, 16, 3), 2, width=8, value_range=(0.0, 1.0))
        pre = DownscalerPretrainer(teacher, e, value_range=(0.0, 1.0))
        pre.compile(optimizer=keras.optimizers.SGD(0.01))
        x, y = _data()
        before = keras.ops.convert_to_numpy(e.get_layer("residual_conv").kernel)
        history = pre.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    after = keras.ops.convert_to_numpy(e.get_layer("residual_conv").kernel)
    assert np.abs(after - before).max() > 0  # E trains (it did not in bf16)
    for key in ("loss", "cl_loss", "kd_loss"):
        assert np.isfinite(history[key][-1]), key
    assert {v.dtype for v in e.variables} == {"float32"}
    assert e.get_layer("residual_conv").compute_dtype == "bfloat16"


def test_with_precision_is_identity_when_already_there():
    model = tiny_teacher()
    assert with_precision(model, "float32") is model
    with pytest.raises(ConfigError, match="precision"):
        with_precision(model, "float16")
    with pytest.raises(ConfigError, match="precision"):
        with precision_scope("bfloat16"):
            pass


def test_classifier_loss_is_float32_on_bfloat16_logits():
    logits = keras.ops.cast(
        np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], "float32"), "bfloat16"
    )
    labels = np.array([0, 2])
    loss = SparseCrossentropy(label_smoothing=0.1)(labels, logits)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"
    # Golden: the same (bfloat16-exact) logits in float64.
    z = keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32")).astype("f8")
    target = np.full((2, 3), 0.1 / 3) + 0.9 * np.eye(3)[labels]
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    expected = -(target * log_p).sum(axis=1).mean()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(
    BACKEND == "torch", reason="torch.compile (Inductor) crashes on this CPU"
)
def _set_tf_op_determinism(on: bool) -> bool:
    """Sets TensorFlow's op determinism (an earlier run in this process may
    have turned it on); returns whether it was on."""
    if keras.backend.backend() != "tensorflow":
        return False
    from tensorflow.python.framework import config as tf_config

    was = bool(tf_config.is_op_determinism_enabled())
    (tf_config.enable_op_determinism if on else tf_config.disable_op_determinism)()
    return was


def test_trainer_step_with_jit_compile():
    # Keras turns XLA off under TensorFlow's op determinism (deterministic
    # runs); this test is about XLA itself.
    was = _set_tf_op_determinism(False)
    try:
        _jit_step()
    finally:
        _set_tf_op_determinism(was)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's op determinism"
)
def test_jit_on_under_op_determinism_warns(caplog):
    was = _set_tf_op_determinism(True)
    try:
        with caplog.at_level("WARNING"):
            assert jit_compile_option("on") is True
        assert "trains without XLA" in caplog.text
        assert "--no-deterministic" in caplog.text
    finally:
        _set_tf_op_determinism(was)


def _jit_step():
    keras.utils.set_random_seed(0)
    teacher = tiny_teacher()
    trainer = ThumbNetTrainer(
        teacher, build_downscaler((16, 16, 3), 2, width=8), make_student(teacher, 2)
    )
    trainer.compile(optimizer="sgd", jit_compile=jit_compile_option("on"))
    assert trainer.jit_compile is True  # not silently turned off
    x, y = _data()
    history = trainer.fit(x, y, batch_size=4, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][-1])
    with pytest.raises(ConfigError, match="jit_compile"):
        jit_compile_option("yes")


def test_cli_options_reach_the_run_config():
    from thumbnet_keras.cli import _parser, _train_values
    from thumbnet_keras.pipeline import ThumbNetParams

    argv = ["train", "--precision", "mixed_bfloat16", "--distribution",
            "data_parallel", "--jit-compile", "on", "--sync-batchnorm"]  # fmt: skip
    config = ThumbNetParams(**_train_values(_parser().parse_args(argv))).to_config()
    assert (config.precision, config.distribution) == (
        "mixed_bfloat16",
        "data_parallel",
    )
    assert (config.jit_compile, config.sync_batchnorm) == ("on", True)
    default = ThumbNetParams().to_config()
    assert (default.precision, default.distribution) == ("float32", "none")
    with pytest.raises(ValueError, match="precision"):
        ThumbNetParams(precision="float16")


def test_jit_compile_on_under_torch_warns_once_before_the_run(monkeypatch):
    # A practitioner's one-epoch torch run with --jit-compile on took 9x as
    # long as eager (torch.compile recompiling), without a word.
    import warnings

    from thumbnet_keras.pipeline import environment, preflight

    monkeypatch.setattr(environment, "planned_backend", lambda: "torch")
    with pytest.warns(UserWarning, match="--jit-compile on under the torch backend"):
        preflight._warn_torch_jit("on")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight._warn_torch_jit("auto")
        monkeypatch.setattr(environment, "planned_backend", lambda: "jax")
        preflight._warn_torch_jit("on")
