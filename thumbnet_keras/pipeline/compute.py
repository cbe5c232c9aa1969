"""How a run computes: precision (dtype policy), XLA and data parallelism.

* `precision_scope(precision)`: sets Keras' global dtype policy ("float32",
  "mixed_bfloat16", "mixed_float16") for the models built inside it and
  restores the previous one on exit. Models loaded from disk keep the policy
  they were saved with, so `with_precision(model, policy)` rebuilds them under
  the run's policy (same weights). Variables stay float32 under both mixed
  policies; `compile()` wraps the optimizer in
  `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling) when the
  model's policy is `mixed_float16`. Models are saved in float32
  (`with_precision(model, "float32")`): a user loads a plain float32 model.
* `distribution_scope(distribution)`: `"data_parallel"` replicates the models
  on every local accelerator (every local CPU device when there is none) and
  splits each global batch between them: `keras.distribution.DataParallel`
  on JAX, `tf.distribute.MirroredStrategy` on TensorFlow. Build, compile and
  fit inside it. `batch_size` stays the global batch. torch: refused.
* `jit_compile_option(value)`: the `jit_compile` argument of `compile()`.

`with_sync_batchnorm(model)` turns a model's `BatchNormalization` layers into
synchronized ones (statistics over the global batch under
`tf.distribute`). JAX's DataParallel traces one program over the global
batch, so its BatchNorm statistics are already the global batch's.
"""

from __future__ import annotations

import contextlib
from typing import Any

__all__ = [
    "DISTRIBUTIONS",
    "check_batch_size",
    "compute_scope",
    "prepare_model",
    "run_compute",
    "JIT_COMPILE",
    "PRECISIONS",
    "distribution_scope",
    "even_batches",
    "float32_model",
    "portable_model",
    "initialize_multi_host",
    "jit_compile_option",
    "local_devices",
    "precision_scope",
    "with_precision",
    "with_sync_batchnorm",
]

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DISTRIBUTIONS = ("none", "data_parallel")
JIT_COMPILE = ("auto", "on", "off")
_STRATEGIES: dict = {}
# The active `compute_scope`'s settings (None outside one).
_ACTIVE: dict | None = None


def _error(message: str) -> Exception:
    from thumbnet_keras.pipeline.config import ConfigError

    return ConfigError(message)


@contextlib.contextmanager
def precision_scope(precision: str = "float32"):
    """Sets Keras' global dtype policy to `precision` inside the block."""
    import keras

    if precision not in PRECISIONS:
        raise _error(
            f"`precision` must be one of {PRECISIONS}, received {precision!r}."
        )
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield precision
    finally:
        keras.config.set_dtype_policy(previous)


def _rewrite(obj: Any, edit) -> Any:
    """`obj` (a nested config) with `edit(layer_config_dict)` applied to
    every layer config (a dict with "class_name" and "config")."""
    if isinstance(obj, list):
        return [_rewrite(v, edit) for v in obj]
    if not isinstance(obj, dict):
        return obj
    obj = {k: _rewrite(v, edit) for k, v in obj.items()}
    if "class_name" in obj and isinstance(obj.get("config"), dict):
        obj = edit(obj)
    return obj


def _rebuild(model, edit):
    import keras

    config = _rewrite(keras.saving.serialize_keras_object(model), edit)
    new = keras.saving.deserialize_keras_object(config)
    from thumbnet_keras.models.weights import copy_weights

    copy_weights(model, new)
    return new


def _policies(model) -> set[str]:
    return {layer.dtype_policy.name for layer in model._flatten_layers()}


def with_precision(model, policy: str):
    """`model` rebuilt with every layer under `policy` (same weights, same
    trainable flags), or `model` itself when it already is.

    A loaded `.keras` model keeps the dtype policy it was saved with,
    whatever the global policy; this applies the run's. Input layers keep
    their input dtype; quantized layers are refused.
    """
    if policy not in PRECISIONS:
        raise _error(f"`precision` must be one of {PRECISIONS}, received {policy!r}.")
    present = _policies(model)
    if present == {policy}:
        return model
    if not present <= set(PRECISIONS) | {"float32"}:
        raise _error(
            f"Model '{model.name}' has layers under dtype policies {sorted(present)}; "
            f"only {PRECISIONS} can be converted to {policy!r}."
        )

    def edit(layer):
        config = layer["config"]
        dtype = config.get("dtype")
        if layer["class_name"] == "InputLayer":
            return layer
        if isinstance(dtype, dict) and dtype.get("class_name") == "DTypePolicy":
            dtype = dict(dtype, config=dict(dtype["config"], name=policy))
        elif isinstance(dtype, str) and dtype in PRECISIONS:
            dtype = policy
        else:
            return layer
        return dict(layer, config=dict(config, dtype=dtype))

    return _rebuild(model, edit)


def float32_model(model):
    """`model` under float32 when its layers are under mixed policies (what a
    run saves, so users load float32 models); otherwise `model` itself."""
    present = _policies(model)
    if present <= {"float32"} or not present <= set(PRECISIONS):
        return model
    return with_precision(model, "float32")


def with_sync_batchnorm(model, synchronized: bool = True):
    """`model` with `synchronized` set on every `BatchNormalization` layer
    (same weights), or `model` itself when none needs the change."""
    import keras

    if not any(
        isinstance(layer, keras.layers.BatchNormalization)
        and layer.synchronized != synchronized
        for layer in model._flatten_layers()
    ):
        return model

    def edit(layer):
        if layer["class_name"] != "BatchNormalization":
            return layer
        return dict(layer, config=dict(layer["config"], synchronized=synchronized))

    return _rebuild(model, edit)


def portable_model(model):
    """`model` as a run saves it, loadable on every backend: float32
    (`float32_model`) and plain BatchNorm. `synchronized=True`, a training
    setting, is TensorFlow-only in Keras: a model saved with it failed to
    load on JAX and torch ("only supported with the TensorFlow backend"; a
    trial's `--sync-batchnorm` run)."""
    return with_sync_batchnorm(float32_model(model), synchronized=False)


def local_devices() -> list[str]:
    """The devices data parallelism spreads over: every local accelerator,
    else every local CPU device (e.g. virtual ones)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        # Every process's devices once `initialize_multi_host` has run.
        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        chosen = accelerators or jax.devices("cpu")
        return [f"{d.platform}:{d.id}" for d in chosen]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
    return []


_MULTI_HOST_ENV = (
    "KERAS_DISTRIBUTION_JOB_ADDRESSES",
    "KERAS_DISTRIBUTION_NUM_PROCESSES",
    "KERAS_DISTRIBUTION_PROCESS_ID",
)
_INITIALIZED = False


def initialize_multi_host() -> int:
    """Joins a multi-process JAX run when `KERAS_DISTRIBUTION_NUM_PROCESSES`
    is above 1: `keras.distribution.initialize()`, which reads the
    coordinator's address (`KERAS_DISTRIBUTION_JOB_ADDRESSES`, "host:port" of
    process 0), the process count and this process's id
    (`KERAS_DISTRIBUTION_PROCESS_ID`) from the environment and calls
    `jax.distributed.initialize`. Once per process, before any computation.
    Returns the number of processes."""
    import os

    import keras

    global _INITIALIZED
    processes = int(os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "1") or 1)
    if processes <= 1 or _INITIALIZED:
        return processes
    missing = [name for name in _MULTI_HOST_ENV if not os.environ.get(name)]
    if missing:
        raise _error(
            f"A multi-process run ({processes} processes) needs {', '.join(missing)} "
            "in the environment (see docs/flows.md, 'Several machines')."
        )
    if keras.backend.backend() != "jax":
        raise _error(
            "Several processes (KERAS_DISTRIBUTION_NUM_PROCESSES > 1) need the jax "
            f"backend; this process runs {keras.backend.backend()!r}."
        )
    try:
        keras.distribution.initialize()
    except RuntimeError as err:  # JAX already computed something.
        raise _error(
            f"Joining the {processes}-process run failed: {err} Call "
            "`thumbnet_keras.pipeline.compute.initialize_multi_host()` first "
            "thing in the process."
        ) from err
    _INITIALIZED = True
    return processes


@contextlib.contextmanager
def distribution_scope(distribution: str = "none"):
    """Data parallelism over `local_devices()` inside the block (see the
    module docstring). Yields the number of replicas."""
    import keras

    if distribution not in DISTRIBUTIONS:
        raise _error(
            f"`distribution` must be one of {DISTRIBUTIONS}, received {distribution!r}."
        )
    if distribution == "none":
        yield 1
        return
    backend = keras.backend.backend()
    if backend == "jax":
        initialize_multi_host()
        devices = local_devices()
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
        try:
            yield len(devices)
        finally:
            keras.distribution.set_distribution(previous)
    elif backend == "tensorflow":
        import tensorflow as tf

        devices = tuple(local_devices())
        if devices not in _STRATEGIES:
            # One strategy per process and device set: strategies created one
            # after another in a process reuse collective keys, and their
            # all-reduces then clash (synchronized BatchNorm aborts).
            _STRATEGIES[devices] = tf.distribute.MirroredStrategy(devices=devices)
        strategy = _STRATEGIES[devices]
        with strategy.scope():
            yield strategy.num_replicas_in_sync
    else:
        raise _error(
            f"distribution='data_parallel' needs the jax or tensorflow backend "
            f"(KERAS_BACKEND); this process runs {backend!r}."
        )


def jit_compile_option(value: str = "auto"):
    """`compile(jit_compile=...)`: "auto" (Keras' choice: XLA on JAX, and on
    TensorFlow with a GPU and no tf.distribute strategy; eager on torch),
    "on" (XLA on JAX and TensorFlow, CPU included; torch: `torch.compile`)
    or "off"."""
    if value not in JIT_COMPILE:
        raise _error(f"`jit_compile` must be one of {JIT_COMPILE}, received {value!r}.")
    if _tf_op_determinism() and (value == "on" or (value == "auto" and _tf_gpu())):
        # keras.src.trainers.trainer.model_supports_jit returns False then.
        import logging

        logging.getLogger(__name__).warning(
            f"jit_compile={value!r} but TensorFlow's op determinism is on "
            "(deterministic=True), and Keras does not compile with XLA then: "
            "this run trains without XLA. Pass --no-deterministic "
            "(deterministic=False) to train with XLA."
        )
    return {"auto": "auto", "on": True, "off": False}[value]


def _backend() -> str:
    import keras

    return keras.backend.backend()


def _tf_gpu() -> bool:
    """True when TensorFlow sees a GPU (where "auto" would pick XLA)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _tf_op_determinism() -> bool:
    """True when the TensorFlow backend runs with op determinism enabled."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return False
    from tensorflow.python.framework import config as tf_config

    return bool(getattr(tf_config, "is_op_determinism_enabled", lambda: False)())


@contextlib.contextmanager
def compute_scope(
    precision: str = "float32",
    distribution: str = "none",
    sync_batchnorm: bool = False,
):
    """`precision_scope` and `distribution_scope` together; models loaded
    inside go through `prepare_model`. Yields the number of replicas."""
    global _ACTIVE
    previous = _ACTIVE
    with precision_scope(precision), distribution_scope(distribution) as replicas:
        _ACTIVE = {
            "precision": precision,
            "replicas": replicas,
            # TensorFlow's replicas each see a share of the batch; JAX's
            # DataParallel already normalizes by the global batch, and its
            # BatchNorm has no `synchronized` (it raised after data prep).
            "sync_batchnorm": bool(sync_batchnorm)
            and replicas > 1
            and _backend() == "tensorflow",
        }
        try:
            yield replicas
        finally:
            _ACTIVE = previous


def active_replicas() -> int:
    """The replicas of the active `compute_scope` (1 outside one)."""
    return _ACTIVE["replicas"] if _ACTIVE is not None else 1


def prepare_model(model):
    """A loaded model under the active `compute_scope`: the run's precision
    (`with_precision`) and, with `sync_batchnorm` on several replicas,
    synchronized BatchNorm. Unchanged outside a scope."""
    if _ACTIVE is None:
        return model
    model = with_precision(model, _ACTIVE["precision"])
    if _ACTIVE["sync_batchnorm"]:
        model = with_sync_batchnorm(model)
    return model


def even_batches(data):
    """Under JAX data parallelism in the active `compute_scope`: `data` (a
    batched tf.data dataset, a function epoch -> dataset, or None) with each
    batch cut to the largest size that splits evenly over the devices
    (`DataParallel` cannot shard an uneven batch). With a batch size that
    is a multiple of the device count (`run_compute` refuses any other) only
    the epoch's last, partial batch is cut, by fewer images than there are
    devices, so per-epoch validation keeps all but those few (a batch cut
    to nothing is left out; the run's final evaluation sees every image).
    TensorFlow's MirroredStrategy splits uneven batches itself: unchanged
    there."""
    import keras

    if (
        data is None
        or _ACTIVE is None
        or _ACTIVE["replicas"] <= 1
        or keras.backend.backend() != "jax"
    ):
        return data
    if callable(data) and not hasattr(data, "element_spec"):
        return lambda *args, **kwargs: even_batches(data(*args, **kwargs))
    import tensorflow as tf

    replicas = _ACTIVE["replicas"]

    def cut(*batch):
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        even = size - size % replicas
        cut_batch = tf.nest.map_structure(lambda t: t[:even], batch)
        return cut_batch if len(batch) > 1 else cut_batch[0]

    def not_empty(*batch):
        return tf.shape(tf.nest.flatten(batch)[0])[0] > 0

    return data.map(cut).filter(not_empty)


def check_batch_size(batch_size: int, replicas: int) -> None:
    """Refuses a global batch that JAX's `DataParallel` cannot split evenly
    over `replicas` devices (every batch would be cut, `even_batches`)."""
    import keras

    if replicas > 1 and keras.backend.backend() == "jax" and batch_size % replicas:
        multiple = -(-batch_size // replicas) * replicas
        raise _error(
            f"batch_size {batch_size} does not split over the {replicas} devices "
            f"of distribution='data_parallel' (JAX gives every device the same "
            f"share of a batch): use a multiple of {replicas}, e.g. "
            f"--batch-size {multiple}."
        )


def run_compute(function):
    """Decorates a run step `function(run_dir, ...)`: it runs inside the
    `compute_scope` of the run's `config.json` (precision, distribution)."""
    import functools

    @functools.wraps(function)
    def wrapper(run_dir, *args, **kwargs):
        from thumbnet_keras.pipeline.config import RunConfig
        from thumbnet_keras.pipeline.rundir import Run

        config = RunConfig.from_json(Run(run_dir).config()["config"])
        with compute_scope(
            config.precision, config.distribution, config.sync_batchnorm
        ) as replicas:
            check_batch_size(config.batch_size, replicas)
            if config.distribution == "data_parallel":
                _say_replicas(str(run_dir), replicas)
            return function(run_dir, *args, **kwargs)

    return wrapper


_SAID_REPLICAS: set[tuple[str, int]] = set()


def _say_replicas(run_dir: str, replicas: int) -> None:
    """Once per run and process: how many replicas data_parallel trains on; a
    warning when one (a platform trial's run trained on one replica, and
    nothing said so)."""
    import logging

    if (run_dir, replicas) in _SAID_REPLICAS:
        return
    _SAID_REPLICAS.add((run_dir, replicas))
    logger = logging.getLogger(__name__)
    if replicas > 1:
        logger.info(
            "data_parallel: %d replicas (%s)", replicas, ", ".join(local_devices())
        )
        return
    logger.warning(
        "data_parallel found one device (%s), so nothing is split: the run trains "
        "as without it. On a CPU, JAX takes more with XLA_FLAGS="
        "--xla_force_host_platform_device_count=N; TensorFlow with "
        "tf.config.set_logical_device_configuration before Keras starts.",
        ", ".join(local_devices()),
    )
