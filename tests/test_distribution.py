"""ThumbNetTrainer under keras.distribution.DataParallel on two virtual CPU
devices (JAX only: keras.distribution is implemented for the JAX backend)."""

import pytest
from conftest import BACKEND, REPO, run_python


@pytest.mark.skipif(
    BACKEND != "jax", reason="keras.distribution.DataParallel is JAX-only in Keras 3"
)
def test_data_parallel_fit_on_two_cpu_devices():
    result = run_python(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import keras, numpy as np, jax
        devices = keras.distribution.list_devices("cpu")
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        from conftest import tiny_teacher
        from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student
        keras.utils.set_random_seed(0)
        teacher = tiny_teacher()
        trainer = ThumbNetTrainer(teacher, build_downscaler((16, 16, 3), 2, width=8),
                                  make_student(teacher, 2), mm_weight=5.0)
        trainer.compile(optimizer=keras.optimizers.Adam(3e-3))
        rng = np.random.default_rng(0)
        x = rng.random((64, 16, 16, 3), dtype="float32")
        y = rng.integers(0, 3, 64).astype("int32")
        hist = trainer.fit(x, y, batch_size=16, epochs=4, verbose=0).history
        kernel = trainer.downscaler.get_layer("residual_conv").kernel
        print(json.dumps({{
            "devices": len(jax.devices()),
            "loss": hist["loss"],
            "kernel_devices": len(kernel.value.sharding.device_set),
        }}))
        """,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "KERAS_BACKEND": "jax",
        },
    )
    assert result["devices"] == 2
    assert result["kernel_devices"] == 2  # weights replicated on both devices
    assert result["loss"][-1] < result["loss"][0]
