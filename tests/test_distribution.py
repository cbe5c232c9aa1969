"""Data parallelism on two virtual CPU devices: keras.distribution.DataParallel
(JAX) and tf.distribute.MirroredStrategy (TensorFlow), through
`thumbnet_keras.pipeline.compute`. Each test runs in a subprocess (the devices
must be configured before the backend starts)."""

import numpy as np
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
        try:
            trainer.fit(x[:17], y[:17], batch_size=8, verbose=0)
            uneven = None
        except ValueError as error:
            uneven = str(error)
        print(json.dumps({{
            "uneven": uneven,
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
    # 17 examples in batches of 8 leave a last batch of 1 for 2 devices: named
    # before any step (a platform trial got JAX's IndivisibleError).
    assert result["uneven"] == (
        "Under keras.distribution.DataParallel over 2 devices each batch must "
        "split evenly, and 17 examples in batches of 8 give a last batch of 1. Use "
        "a batch_size that is a multiple of 2 and a multiple of it in examples "
        "(x[:16] here, if batch_size is), or a tf.data.Dataset batched with "
        "drop_remainder=True."
    )


@pytest.mark.skipif(BACKEND != "jax", reason="uneven batches matter to JAX only")
def test_uneven_batches_are_cut_not_dropped_and_odd_batch_sizes_refused():
    # A practitioner's run with --batch-size 7 on 2 devices trained on one
    # 2-image batch an epoch and lost per-epoch validation (7 images, one
    # odd batch), exit code 0: every uneven batch was dropped whole.
    result = run_python(
        """
        import json
        import numpy as np, tensorflow as tf
        from thumbnet_keras.pipeline.compute import (
            check_batch_size, compute_scope, even_batches)
        from thumbnet_keras.pipeline.config import ConfigError

        def sizes(data):
            return [int(x.shape[0]) for x, _ in data.as_numpy_iterator()]

        def pairs(n, batch):
            x = np.arange(n, dtype="float32")
            return tf.data.Dataset.from_tensor_slices((x, x)).batch(batch)

        out = {}
        with compute_scope("float32", "data_parallel") as replicas:
            out["replicas"] = replicas
            out["7 by 4"] = sizes(even_batches(pairs(7, 4)))
            out["9 by 4"] = sizes(even_batches(pairs(9, 4)))  # last batch: 1
            out["per epoch"] = sizes(even_batches(lambda epoch: pairs(7, 4))(0))
            images = tf.data.Dataset.from_tensor_slices(np.zeros((5, 2))).batch(4)
            out["images only"] = [b.shape[0] for b in even_batches(images)]
            check_batch_size(8, replicas)
            try:
                check_batch_size(7, replicas)
            except ConfigError as error:
                out["refusal"] = str(error)
        print(json.dumps(out))
        """,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "KERAS_BACKEND": "jax",
        },
    )
    assert result["replicas"] == 2
    assert result["7 by 4"] == [4, 2]  # 3 cut to 2, not dropped
    assert result["9 by 4"] == [4, 4]  # a batch cut to nothing is left out
    assert result["per epoch"] == [4, 2]
    assert result["images only"] == [4]
    assert "batch_size 7 does not split over the 2 devices" in result["refusal"]
    assert "--batch-size 8" in result["refusal"]


# One SGD step on 2 replicas must move every weight exactly as one step on one
# device with the same global batch. Run once with the trainer's loss scaling
# and once with it disabled (a plain mean, as before the fix): on TensorFlow
# that moves the weights 2x as far, so the check can fail.
_EQUIVALENCE = """
import json, sys
sys.path.insert(0, {tests!r})
import keras, numpy as np
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from conftest import tiny_teacher
from thumbnet_keras import (
    DownscalerPretrainer, ThumbNetTrainer, build_downscaler, make_student)
from thumbnet_keras.models import trainer as trainer_module
from thumbnet_keras.pipeline.compute import (
    distribution_scope, local_devices, with_sync_batchnorm)

def teacher_no_bn():
    inputs = keras.Input((16, 16, 3), name="image")
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(8 * (i + 1), 3, padding="same", activation="relu",
                                name=f"conv{{i}}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="nobn")

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.random((8, 16, 16, 3), dtype="float32")
y = rng.integers(0, 3, 8).astype("int32")
reference = {{"nobn": teacher_no_bn(), "bn": tiny_teacher()}}
T = {{k: m.get_weights() for k, m in reference.items()}}
E = build_downscaler((16, 16, 3), 2, width=8).get_weights()

def step(kind, stage, distribution, scale=True, sync_bn=False):
    trainer_module.scale_loss_for_replicas = (
        original if scale else (lambda loss: loss))
    with distribution_scope(distribution) as replicas:
        teacher = teacher_no_bn() if kind == "nobn" else tiny_teacher()
        teacher.set_weights(T[kind])
        student = make_student(teacher, 2)
        if sync_bn:
            student = with_sync_batchnorm(student)
        downscaler = build_downscaler((16, 16, 3), 2, width=8)
        downscaler.set_weights(E)
        if stage == "e_pretrain":  # E alone, through the frozen teacher
            trainer = DownscalerPretrainer(teacher, downscaler)
        else:
            trainer = ThumbNetTrainer(teacher, downscaler, student, stage=stage,
                                      mm_weight=5.0)
        trainer.compile(optimizer=keras.optimizers.SGD(0.5))
        before = [keras.ops.convert_to_numpy(v) for v in trainer.trainable_weights]
        trainer.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        after = [keras.ops.convert_to_numpy(v) for v in trainer.trainable_weights]
    return replicas, before, after

original = trainer_module.scale_loss_for_replicas
out = {{"devices": len(local_devices())}}
tf_backend = keras.backend.backend() == "tensorflow"
cases = [("nobn", "joint", False), ("nobn", "fm_pretrain", False),
         ("nobn", "e_pretrain", False), ("bn", "joint", False)]
if tf_backend:  # per-replica BatchNorm statistics, then synchronized ones
    cases.append(("bn", "joint", True))
for kind, stage, sync_bn in cases:
    _, before, single = step(kind, stage, "none")
    replicas, _, multi = step(kind, stage, "data_parallel", sync_bn=sync_bn)
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(single, before))
    key = f"{{kind}}-{{stage}}" + ("-sync" if sync_bn else "")
    out[key] = {{
        "replicas": replicas,
        "max_diff": max(float(np.abs(a - b).max()) for a, b in zip(multi, single)),
        "moved": moved,
    }}
    if key == "nobn-joint":
        _, _, plain = step(kind, stage, "data_parallel", scale=False)
        out[key]["plain_ratio"] = sum(
            float(np.abs(a - b).sum()) for a, b in zip(plain, before)) / moved
print(json.dumps(out))
"""


@pytest.mark.skipif(
    BACKEND not in ("tensorflow", "jax"),
    reason="data parallelism is offered on jax and tensorflow only",
)
def test_two_replicas_step_equals_one_device_step():
    env = {"KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if BACKEND == "jax":
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    result = run_python(_EQUIVALENCE.format(tests=str(REPO / "tests")), env=env)
    assert result["devices"] == 2
    for key in ("nobn-joint", "nobn-fm_pretrain", "nobn-e_pretrain"):
        case = result[key]
        assert case["replicas"] == 2, key
        assert case["moved"] > 1e-2, key  # the step does move the weights
        assert case["max_diff"] < 1e-5, (key, case)
    # Without the loss scaling, TensorFlow's replicas' gradients add up: 2x.
    # JAX sees the global batch: the plain mean is right there.
    expected = 2.0 if BACKEND == "tensorflow" else 1.0
    assert result["nobn-joint"]["plain_ratio"] == pytest.approx(expected, rel=1e-3)
    if BACKEND == "jax":
        # DataParallel traces one program over the global batch: BatchNorm's
        # statistics are the global batch's, with no option needed.
        assert result["bn-joint"]["max_diff"] < 1e-5, result["bn-joint"]
    else:
        # MirroredStrategy: each replica normalizes by its own half-batch's
        # statistics unless BatchNormalization(synchronized=True).
        assert result["bn-joint"]["max_diff"] > 1e-4, result["bn-joint"]
        assert result["bn-joint-sync"]["max_diff"] < 1e-5, result["bn-joint-sync"]


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="one backend runs the distributed smoke run (cost); TF: MirroredStrategy",
)
def test_smoke_run_trains_distributed_in_mixed_precision(tmp_path):
    """The flow's steps (what `thumbnet` runs, without Prefect's server, which
    a loaded CI machine can be too slow to start) on 2 replicas in
    mixed_bfloat16 with synchronized BatchNorm, to a float32 thumbnet.keras."""
    from pipeline_fixtures import subprocess_env, tiny_dataset

    manifest = tiny_dataset(tmp_path)
    runs = str(tmp_path / "runs")
    result = run_python(
        f"""
        import json
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras
        import logging
        from thumbnet_keras import pipeline
        said = []
        handler = logging.Handler()
        handler.emit = lambda record: said.append(record.getMessage())
        logging.getLogger("thumbnet_keras").addHandler(handler)
        logging.getLogger("thumbnet_keras").setLevel(logging.INFO)
        params = pipeline.ThumbNetParams(
            dataset={manifest!r}, smoke=True, runs_dir={runs!r}, run_name="dp",
            precision="mixed_bfloat16", distribution="data_parallel",
            sync_batchnorm=True, bn_batches=1)
        run_dir = pipeline.resolve_run(params)["run_dir"]
        prepared = pipeline.prepare_dataset({manifest!r}, {runs!r} + "/_data")
        pipeline.get_teacher(run_dir, prepared, verbose=0)
        records = {{s: pipeline.train_stage(run_dir, 2, s, verbose=0)
                   for s in ("e_pretrain", "fm_pretrain", "joint")}}
        model = keras.saving.load_model(
            pipeline.export_run(run_dir)["factors"]["2"]["thumbnet"])
        config = json.dumps(model.get_config())
        print(json.dumps({{
            "synchronized": '"synchronized": true' in config,
            "batchnorm": '"BatchNormalization"' in config,
            "policies": sorted({{l.dtype_policy.name for l in model._flatten_layers()}}),
            "losses": {{s: r["history"]["loss"] for s, r in records.items()}},
            "policy_after": keras.config.dtype_policy().name,
            "said": [m for m in said if m.startswith("data_parallel")],
            "replicas": {{s: r["replicas"] for s, r in records.items()}},
        }}))
        """,
        env=subprocess_env() | {"KERAS_BACKEND": "tensorflow"},
        timeout=600,
    )
    assert result["policies"] == ["float32"]  # saved as float32 for users
    # ... and with plain BatchNorm: Keras refuses `synchronized=True` on JAX
    # and torch, where a trial's thumbnet.keras then failed to load.
    assert result["batchnorm"] and not result["synchronized"]
    for stage, losses in result["losses"].items():
        assert losses and all(np.isfinite(losses)), stage
    assert result["policy_after"] == "float32"
    # Said once for the run, with the replica count (nothing said it before).
    (said,) = result["said"]
    assert said.startswith("data_parallel: 2 replicas ("), said
    # ... and each stage's record keeps it.
    assert result["replicas"] == {s: 2 for s in ("e_pretrain", "fm_pretrain", "joint")}


def test_data_parallel_on_one_device_warns(caplog):
    """A platform trial: --distribution data_parallel on a one-device machine
    trained on one replica and said nothing."""
    import logging

    from thumbnet_keras.pipeline.compute import _say_replicas

    with caplog.at_level(logging.INFO, logger="thumbnet_keras.pipeline.compute"):
        _say_replicas("runs/one-device-run", 1)
        _say_replicas("runs/one-device-run", 1)  # Once per run and process.
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("data_parallel found one device (")
    assert "--xla_force_host_platform_device_count=N" in record.getMessage()


# Several machines, as far as one allows: two JAX processes on CPU (one device
# each, gloo collectives) join through `keras.distribution.initialize()` from
# the environment, as a multi-host run does, and one step of the joint stage
# on the global batch equals the step on one device.
_WORKER = """
import os, sys
from thumbnet_keras.pipeline.compute import distribution_scope, initialize_multi_host
initialize_multi_host()  # before anything touches JAX
import keras, numpy as np
import tensorflow as tf
from thumbnet_keras import ThumbNetTrainer, build_downscaler, make_student

def teacher_no_bn():
    inputs = keras.Input((16, 16, 3), name="image")
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(8 * (i + 1), 3, padding="same", activation="relu",
                                name=f"conv{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x), name="nobn")

rng = np.random.default_rng(0)
x = rng.random((8, 16, 16, 3), dtype="float32")
y = rng.integers(0, 3, 8).astype("int32")
keras.utils.set_random_seed(0)
T = teacher_no_bn().get_weights()
E = build_downscaler((16, 16, 3), 2, width=8).get_weights()
with distribution_scope(DISTRIBUTION) as replicas:
    teacher = teacher_no_bn()
    teacher.set_weights(T)
    downscaler = build_downscaler((16, 16, 3), 2, width=8)
    downscaler.set_weights(E)
    trainer = ThumbNetTrainer(teacher, downscaler, make_student(teacher, 2),
                              mm_weight=5.0)
    trainer.compile(optimizer=keras.optimizers.SGD(0.5))
    # The global batch of 8; Keras gives each process its share.
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), verbose=0)
    weights = [keras.ops.convert_to_numpy(v) for v in trainer.trainable_weights]
REPLICAS = replicas
"""


@pytest.mark.skipif(BACKEND != "jax", reason="multi-process runs are JAX's")
def test_two_processes_step_equals_one_device_step(tmp_path):
    import socket
    import subprocess
    import sys

    from pipeline_fixtures import subprocess_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = (
        _WORKER.replace("DISTRIBUTION", '"data_parallel"')
        + "import jax, json\n"
        + "np.savez(sys.argv[1], *weights)\n"
        + "print(json.dumps([REPLICAS, jax.process_count()]))\n"
    )
    env = subprocess_env() | {
        "KERAS_BACKEND": "jax",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
        "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
        "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
    }
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path / f"w{i}.npz")],
            env=env | {"KERAS_DISTRIBUTION_PROCESS_ID": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "[2, 2]"  # 2 replicas, 2 processes
    # The reference: the same step on one device, in this process.
    scope = {}
    exec(_WORKER.replace("DISTRIBUTION", '"none"'), scope)
    reference = scope["weights"]
    for i in range(2):
        got = np.load(tmp_path / f"w{i}.npz")
        diffs = [np.abs(got[f"arr_{k}"] - r).max() for k, r in enumerate(reference)]
        assert max(diffs) < 1e-5, (i, max(diffs))


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's DataParallel")
def test_sync_batchnorm_is_tensorflows_only_and_jax_trains_without_it():
    """A trial (2026-12-01): `--sync-batchnorm` on JAX with 2 devices rebuilt
    the teacher with `BatchNormalization(synchronized=True)`, which Keras
    supports on TensorFlow only: a 3 KB TypeError after data preparation.
    JAX's statistics are the global batch's already: nothing to do there."""
    result = run_python(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        import keras
        from conftest import tiny_teacher
        from thumbnet_keras.pipeline.compute import compute_scope, prepare_model
        with compute_scope("float32", "data_parallel", sync_batchnorm=True) as n:
            model = prepare_model(tiny_teacher())
            synced = [l.synchronized for l in model._flatten_layers()
                      if isinstance(l, keras.layers.BatchNormalization)]
        print(json.dumps({{"replicas": n, "synced": synced}}))
        """,
        env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "KERAS_BACKEND": "jax",
        },
    )
    assert result["replicas"] == 2
    assert result["synced"] and not any(result["synced"])
