"""`ThumbNetTrainer`: trains the downscaler E and the student S under a frozen
teacher T with the ThumbNet losses, on any Keras backend.

Like `keras.distillation.Distiller`, it overrides `compute_loss` (not
`train_step`), so the stock TensorFlow, JAX and torch training loops, XLA
compilation, `keras.distribution` and `tf.distribute` all apply. Unlike
Distiller, the forward pass returns the thumbnail and the student's feature map
next to the logits, so S runs once per step, and the loss is scaled for
`tf.distribute` replicas as Keras' own `CompileLoss` does
(`scale_loss_for_replicas`; Distiller's plain mean makes every update N times
too large on N replicas). Losses are computed in float32 whatever the dtype
policy.

Stages (ThumbNet, Sec. 3.3):

* `"fm_pretrain"`: MM + FM. Needs no labels.
* `"joint"`: CL + KD + FM + MM.

Each active term is logged in the `fit` history as `cl_loss`, `kd_loss`,
`fm_loss`, `mm_loss`, unweighted; `loss` is the weighted total.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings

import keras
import numpy as np
from keras import ops

from thumbnet_keras.losses import thumbnet_losses as L
from thumbnet_keras.models.alignment import GeometryError, fm_pooling, layer_output
from thumbnet_keras.models.student import (
    GLOBAL_POOLING,
    image_input_shape,
    not_a_graph_message,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ThumbNetTrainer",
    "STAGES",
    "find_feature_layer",
    "DOWNSCALER_SHARE",
    "scale_loss_for_replicas",
]

# E should stay a small part of the inference model's cost; above this share
# of MACs(E + S) the trainer warns (see `auto_downscaler_width`).
DOWNSCALER_SHARE = 0.15

STAGES = {
    "fm_pretrain": ("fm", "mm"),
    "joint": ("cl", "kd", "fm", "mm"),
}
_TERMS = ("cl", "kd", "fm", "mm")


_JOINT_NEEDS_LABELS = (
    "The 'joint' stage needs labels: fit(x, y) or a dataset of (images, labels) "
    "tuples (not dicts). The 'fm_pretrain' stage trains without them."
)


def check_fit_images(expected: tuple, x, value_range=None) -> None:
    """What `fit(x)`'s images say before anything is traced (arrays, tensors,
    a `tf.data.Dataset`'s element spec; other inputs are not looked at):
    channels-first images (what PyTorch loaders give) are refused with the
    permutation to use, and so are images whose size or channels differ
    from `expected` (E's input); integer images (uint8, 0-255) are warned
    of, since the models see their values as they are; in-memory images far
    outside E's `value_range` are refused (`check_value_range`)."""
    spec = getattr(x, "element_spec", None)
    spec_given = spec is not None
    if spec is not None:
        x = spec[0] if isinstance(spec, (tuple, list)) else spec
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    try:
        shape = tuple(shape) if shape is not None else None
    except (TypeError, ValueError):  # unknown rank
        shape = None
    if shape is not None and len(shape) == 4 and None not in expected:
        h, w, c = expected
        if tuple(shape[1:]) != (h, w, c) and tuple(shape[1:]) == (c, h, w):
            raise ValueError(
                f"Images of shape {shape} are channels-first (N, C, H, W); these "
                f"models take channels-last (N, H, W, C) = (N, {h}, {w}, {c}). "
                "Permute them, e.g. `x.permute(0, 2, 3, 1)` (torch) or "
                "`np.transpose(x, (0, 2, 3, 1))`."
            )
    if shape is not None and len(shape) == 4:
        # Keras' own failure for a wrong channel count was a Reshape deep in
        # E ("The total size of the tensor must be unchanged").
        wrong = [
            i
            for i, (got, want) in enumerate(zip(shape[1:], expected))
            if got is not None and want is not None and got != want
        ]
        if wrong:
            names = ("height", "width", "channels")
            differ = " and ".join(names[i] for i in wrong)
            raise ValueError(
                f"Images of shape {shape} do not fit these models, which take "
                f"(N, H, W, C) = (N, {', '.join(str(d) for d in expected)}) "
                f"(their {differ} differ). "
                + (
                    "Gray images of an RGB model: repeat the channel "
                    "(`np.repeat(x, 3, axis=-1)`); RGB images of a gray model: "
                    "convert them to one channel."
                    if 2 in wrong
                    else "Resize the images to the teacher's input size."
                )
            )
    if value_range is not None and hasattr(x, "shape") and not spec_given:
        check_value_range(x, value_range)
    if dtype is not None:
        name = keras.backend.standardize_dtype(dtype)
        if "int" in name:
            warnings.warn(
                f"Images are {name}: the teacher, E and S see those values as "
                "they are (0-255 for uint8). If the teacher was trained on "
                "[0, 1] or normalized images, convert them the same way first "
                "(e.g. `x / 255`).",
                stacklevel=3,
            )


def check_value_range(x, value_range) -> None:
    """Refuses in-memory images whose values lie more than a whole span
    outside `value_range` (E clips its thumbnail to it): images on 0-255
    given to an E built with `value_range=(0, 1)` trained in silence, every
    thumbnail clipped to 1, and gave a model whose output ignored the
    image. Up to 256 images are looked at."""
    try:
        sample = np.asarray(ops.convert_to_numpy(x[:256]), dtype="float64")
    except Exception:  # not an array Keras can read: fit will say so
        return
    if sample.size == 0:
        return
    low, high = value_range
    span = high - low
    seen_low, seen_high = float(sample.min()), float(sample.max())
    if seen_low < low - span or seen_high > high + span:
        raise ValueError(
            f"Images range over [{seen_low:g}, {seen_high:g}], but E clips its "
            f"thumbnail to value_range ({low:g}, {high:g}): every thumbnail "
            "would be clipped and the model would learn nothing from the "
            "image. Scale the images to that range (e.g. `x / 255`) or build E "
            "with the images' range (`value_range=(0, 255)`)."
        )


def downscaler_value_range(downscaler):
    """`(low, high)` that E clips its thumbnail to (`build_downscaler`'s
    `value_range`, read back from its clip layers, which a saved E keeps),
    or None."""
    shift = relu = None
    for layer in downscaler.layers:
        if layer.name.endswith("clip_shift"):
            shift = layer
        elif layer.name.endswith("clip_relu"):
            relu = layer
    if shift is None or relu is None or relu.max_value is None:
        return None
    low = -float(shift.offset)
    return low, low + float(relu.max_value)


def warn_torch_jit(jit_compile) -> None:
    """`jit_compile=True` under torch is `torch.compile`, which recompiles
    these models' steps many times (a trial: 48 s for an epoch of 4 steps,
    ~1 s eager)."""
    if jit_compile is True and keras.backend.backend() == "torch":
        warnings.warn(
            "jit_compile=True under torch runs torch.compile, which recompiles "
            "this model's train step many times and was ~10x slower than eager "
            "here; leave jit_compile='auto' (eager on torch).",
            stacklevel=3,
        )


def _after_global_pooling(model) -> set[int]:
    """ids of the layers every path from the input to which passes through
    a global pooling layer (the pooling layers included): 4-D when pooled
    with `keepdims=True`, but no feature map (MobileNetV3's classifier is a
    1x1 `Conv2D` named "logits" after such a pooling, and was taken as FM's
    feature layer). A squeeze-and-excitation block's product is not one:
    the unpooled path also reaches it."""
    graph = getattr(model, "_functional", model)
    pooled: dict[int, bool] = {}
    for depth in sorted(graph._nodes_by_depth, reverse=True):  # input first
        for node in graph._nodes_by_depth[depth]:
            parents = node.parent_nodes
            pooled[id(node)] = isinstance(node.operation, GLOBAL_POOLING) or (
                bool(parents) and all(pooled.get(id(p), False) for p in parents)
            )
    return {
        id(node.operation)
        for level in graph._nodes_by_depth.values()
        for node in level
        if pooled[id(node)]
    }


def _rank4_layers(model):
    names = []
    pooled = _after_global_pooling(model)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in pooled:
            continue
        try:
            output = layer_output(model, layer)
        except (AttributeError, ValueError):  # Unused or shared layer.
            continue
        if hasattr(output, "shape") and len(output.shape) == 4:
            names.append(layer.name)
    return names


def find_feature_layer(model: keras.Model, name: str | None, role: str) -> str:
    """Resolves the feature layer name; `None` picks the last 4-D feature map."""
    candidates = _rank4_layers(model)
    if name is None:
        if not candidates:
            raise ValueError(
                f"The {role} '{model.name}' has no layer with a 4-D (B, H, W, C) "
                "output to use for feature mapping."
            )
        return candidates[-1]
    if name not in candidates:
        shown = ", ".join(candidates[-12:])
        more = f" (last 12 of {len(candidates)})" if len(candidates) > 12 else ""
        raise ValueError(
            f"Feature layer '{name}' not found among the {role} '{model.name}' "
            f"layers with a 4-D output. Candidates{more}: {shown}."
        )
    return name


def check_logits_model(model, role: str) -> int:
    """The number of logits `model` outputs; raises `ValueError` naming the
    problem unless it is a `keras.Model` with one (batch, classes) output
    that does not end in softmax or sigmoid (`role` names it: "teacher")."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{role}` must be a keras.Model, received {type(model).__name__}."
        )
    if not getattr(model, "outputs", None):
        raise ValueError(not_a_graph_message(model, role))
    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        shapes = [tuple(o.shape) for o in model.outputs]
        raise ValueError(
            f"The {role} '{model.name}' must output one logits vector (B, classes); "
            f"its outputs have shapes {shapes}."
        )
    activation, last = _output_activation(model)
    if activation is None and _outputs_probabilities(model, last):
        activation = "softmax"
    if activation in ("softmax", "sigmoid"):
        raise ValueError(
            f"The {role} '{model.name}' ends in a {activation} activation "
            f"('{last.name}'), so it outputs probabilities, not logits. "
            "Rebuild it with `classifier_activation=None` (keras.applications), "
            "`activation=None` on its last layer, or without its final "
            f"{activation} layer or `keras.ops.{activation}`; the weights are "
            "unchanged."
        )
    return model.outputs[0].shape[-1]


def _outputs_probabilities(model, last) -> bool:
    """For an output made by a `Lambda` or a layer from outside Keras (what
    it computes is not in its config): whether `model`'s outputs on two
    random images are rows of probabilities (>= 0, summing to 1), as a
    softmax's are whatever the input. A teacher ending in
    `Lambda(keras.ops.softmax)` was taken for a logits model and KD did
    nothing. Models of unknown input size are not probed."""
    from_keras = type(last).__module__.startswith("keras.")
    if from_keras and not isinstance(last, keras.layers.Lambda):
        return False
    shape = tuple(model.inputs[0].shape[1:])
    if len(model.inputs) != 1 or None in shape:
        return False
    dtype = keras.backend.standardize_dtype(model.inputs[0].dtype)
    high = 255.0 if "int" in dtype else 1.0
    batch = model.inputs[0].shape[0] or 2
    try:
        x = np.random.default_rng(0).uniform(0, high, (batch, *shape)).astype(dtype)
        out = np.asarray(ops.convert_to_numpy(model(x, training=False)), "float64")
    except Exception:  # a model this probe cannot call: not refused on a guess
        return False
    return bool(
        out.shape[-1] > 1
        and np.all(out >= -1e-6)
        and np.allclose(out.sum(-1), 1.0, atol=1e-3)
    )


def _output_activation(model):
    """`(activation, operation)` of the operation that makes `model`'s
    output: a layer's `activation`, a `Softmax` layer, or a bare
    `keras.ops.softmax` / `sigmoid` (an operation, not a layer, so
    `model.layers[-1]` does not show it), looked for inside a nested model
    that makes the output."""
    history = getattr(model.outputs[0], "_keras_history", None)
    op = history.operation if history is not None else model.layers[-1]
    if isinstance(op, keras.Model) and getattr(op, "outputs", None):
        return _output_activation(op)
    if isinstance(op, keras.layers.Softmax):
        return "softmax", op
    kind = type(op).__name__
    if kind in ("Softmax", "Sigmoid"):  # keras.ops.softmax / sigmoid
        return kind.lower(), op
    return getattr(getattr(op, "activation", None), "__name__", None), op


def batch_size_weight(images):
    """The batch's size as a float, the weight of its loss terms in their
    epoch means: Keras weights `loss` by examples (its tracker's
    `sample_weight` is the batch size), so a plain mean of per-batch terms
    gave a short last batch a full batch's weight and the terms no longer
    summed to `loss`."""
    return ops.cast(ops.shape(images)[0], "float32")


def check_loss_arguments(temperature, label_smoothing, weights) -> None:
    """Raises ValueError naming the argument: `label_smoothing` in [0, 1),
    `temperature` > 0, and each `(term, weight)` of `weights` a number >= 0
    (`ThumbNetTrainer`, `DownscalerPretrainer`)."""
    if not isinstance(label_smoothing, (int, float)) or not (0 <= label_smoothing < 1):
        raise ValueError(
            f"`label_smoothing` must be in [0, 1), received {label_smoothing!r}."
        )
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, received {temperature!r}.")
    for term, weight in weights:
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(
                f"`{term}_weight` must be a number >= 0, received {weight!r}."
            )


def checked_fit(parent, needs_labels: str | None, x=None, y=None, *args, **kwargs):
    """`parent.fit(x, y, ...)` (`parent`: a trainer's `super()`) after what
    its inputs show is checked (`check_inputs`, validation data included),
    under `failure_reset`."""
    model = parent.__self__
    batch_size = kwargs.get("batch_size", args[0] if args else None)
    check_inputs(model, needs_labels, x, y, kwargs, batch_size)
    L.check_validation_labels(kwargs.get("validation_data"), _num_classes(model))
    with failure_reset(model):
        return parent.fit(x, y, *args, **kwargs)


def check_inputs(model, needs_labels: str | None, x, y, kwargs, batch_size) -> None:
    """What a trainer's `fit(x, y)` or `evaluate(x, y)` inputs show, checked
    before Keras traces a step: `check_fit_images`, no sample weights,
    `labels_missing` when the step `needs_labels` (with that message),
    `check_fit_labels` with the teacher's class count, and even batches
    under JAX's data parallelism."""
    value_range = getattr(model, "value_range", None) or downscaler_value_range(
        model.downscaler
    )
    check_fit_images(image_input_shape(model.downscaler), x, value_range)
    check_no_sample_weights(type(model).__name__, x, kwargs)
    if needs_labels and L.labels_missing(x, y):
        raise ValueError(needs_labels)
    L.check_fit_labels(x, y, _num_classes(model))
    check_even_batches(x, batch_size)


def _num_classes(model) -> int:
    # The teacher passed `check_logits_model`: one (batch, classes) output.
    return int(model.teacher.outputs[0].shape[-1])


@contextlib.contextmanager
def failure_reset(model):
    """A `fit` or `evaluate` of `model` under `weights_kept_on_failure`;
    if it fails, the compiled step functions are dropped, so the next call
    traces afresh (a step whose first trace failed made TensorFlow refuse
    the next one: "Creating variables on a non-first call to a function
    decorated with tf.function"), and so are the compiled metrics, so they
    are built again from the next call's batch: Keras builds them from the
    first batch's shapes before the loss can refuse it, so one-hot labels
    left `"accuracy"` categorical, and every later call with class indices
    reported ~chance accuracy (a trial, torch and JAX)."""
    try:
        with weights_kept_on_failure(model):
            yield
    except BaseException:
        model.train_function = model.test_function = model.predict_function = None
        compiled = getattr(model, "_compile_metrics", None)
        if compiled is not None:
            compiled.built = False
        raise


def check_even_batches(x, batch_size) -> None:
    """Under JAX's `keras.distribution.DataParallel`, every device takes an
    equal share of each batch: arrays whose batch size, or whose last batch,
    does not split over the devices are refused here, naming the fix (JAX
    failed inside the step with `IndivisibleError`)."""
    if keras.backend.backend() != "jax" or not hasattr(x, "shape"):
        return
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return
    devices = int(distribution.device_mesh.devices.size)
    n, batch = int(x.shape[0]), int(batch_size or 32)
    last = n % batch
    if devices <= 1 or not (batch % devices or last % devices):
        return
    uneven = f"batches of {batch}" if batch % devices else f"a last batch of {last}"
    raise ValueError(
        f"Under keras.distribution.DataParallel over {devices} devices each batch "
        f"must split evenly, and {n} examples in batches of {batch} give {uneven}. "
        f"Use a batch_size that is a multiple of {devices} and a multiple of it "
        f"in examples (x[:{n - last}] here, if batch_size is), or a "
        "tf.data.Dataset batched with drop_remainder=True."
    )


def check_no_sample_weights(owner: str, x, kwargs) -> None:
    """The trainers weight their loss terms, not examples: `sample_weight`,
    `class_weight` and datasets of `(images, labels, weights)` are refused
    before Keras starts (raised inside the first step, the error also cost
    JAX users their weights, see `weights_kept_on_failure`)."""
    for name in ("sample_weight", "class_weight"):
        if kwargs.get(name) is not None:
            raise ValueError(
                f"{owner} does not support `{name}`: it weights its loss terms "
                "(cl_weight, kd_weight, fm_weight, mm_weight), not examples. "
                "Resample the data instead (e.g. repeat rare classes)."
            )
    validation = kwargs.get("validation_data")
    if isinstance(validation, (tuple, list)) and len(validation) >= 3:
        if validation[2] is not None:
            raise ValueError(
                f"{owner} does not support sample weights; validation_data "
                "holds (images, labels, weights): pass (images, labels)."
            )
    spec = getattr(x, "element_spec", None)
    if isinstance(spec, (tuple, list)) and len(spec) >= 3 and spec[2] is not None:
        raise ValueError(
            f"{owner} does not support sample weights; the dataset yields "
            "(images, labels, weights). Map it to (images, labels), e.g. "
            "`ds.map(lambda x, y, w: (x, y))`."
        )


# Per model being fitted, evaluated or predicted on JAX: each variable's value
# as Keras last detached it (`FailSafeSteps._get_jax_state`).
_DETACHED: dict[int, list] = {}


@contextlib.contextmanager
def weights_kept_on_failure(model):
    """On JAX, Keras' `fit`, `evaluate` and `predict` detach every variable's
    value (model, optimizer, metrics) for the length of the loop and
    reattach them at the end; a step that raises (the first one most often:
    a trace-time error) left them detached, so the teacher, E and S the user
    passed in lost their weights ("'NoneType' object is not callable" on the
    next call). Here they are reattached when that happens: the last
    completed step's state, else the values as they were detached
    (references to JAX's immutable arrays, not copies, held for the length
    of the call). Other backends keep their variables attached."""
    if keras.backend.backend() != "jax" or id(model) in _DETACHED:
        yield  # not JAX, or inside an outer call (fit's validation)
        return
    _DETACHED[id(model)] = []
    # `*_on_batch` leave their state in `_jax_state` after they sync it: only
    # a state this call's steps wrote is newer than the variables.
    stale = getattr(model, "_jax_state", None)
    try:
        yield
    except BaseException:
        if getattr(model, "_jax_state", None) is not stale:
            model.jax_state_sync()  # the last completed step's state
        for variable, value in _DETACHED[id(model)]:
            if variable._value is None:
                variable._value = value
        raise
    finally:
        del _DETACHED[id(model)]


class FailSafeSteps:
    """Mixed into the trainers: `evaluate` checks its inputs as `fit` does
    (`check_inputs`; the trainer's `_needs_labels()` says whether its step
    needs labels) and runs under `failure_reset`; `predict` runs under
    `weights_kept_on_failure` (`fit` goes through `checked_fit`)."""

    def evaluate(self, x=None, y=None, *args, **kwargs):
        if not kwargs.get("_use_cached_eval_dataset"):  # fit's validation: checked
            batch_size = kwargs.get("batch_size", args[0] if args else None)
            check_inputs(self, self._needs_labels(), x, y, kwargs, batch_size)
        with failure_reset(self):
            return super().evaluate(x, y, *args, **kwargs)

    def predict(self, *args, **kwargs):
        with weights_kept_on_failure(self):
            return super().predict(*args, **kwargs)

    def _get_jax_state(self, *args, **kwargs):
        # Keras' JAX trainer: the state its loop starts from, after which it
        # detaches the variables' values (`purge_model_variables`).
        if kwargs.get("purge_model_variables") and id(self) in _DETACHED:
            optimizer = getattr(self, "optimizer", None)
            variables = [
                *self.trainable_variables,
                *self.non_trainable_variables,
                *(optimizer.variables if optimizer is not None else ()),
                *self.metrics_variables,
            ]
            _DETACHED[id(self)] = [(v, v._value) for v in variables]
        return super()._get_jax_state(*args, **kwargs)


def labelled_metrics(model, metrics: list) -> list:
    """`metrics` less the compiled ones (accuracy and such) while they are
    unbuilt: a stage trained on images alone never builds them, and Keras
    would ask them for a result at the end of every epoch."""
    compiled = getattr(model, "_compile_metrics", None)
    return [m for m in metrics if m is not compiled or m.built]


def losses_only(model) -> dict:
    """`model`'s metric results without those that need labels (compiled
    metrics such as accuracy, which have nothing to compare without them)."""
    compiled = getattr(model, "_compile_metrics", None)  # accuracy and such
    out = {}
    for metric in model.metrics:
        if metric is compiled:
            continue
        result = metric.result()
        if isinstance(result, dict):
            out.update(result)
        else:
            out[metric.name] = result
    return out


def scale_loss_for_replicas(loss):
    """`loss` divided by the number of replicas under a `tf.distribute` strategy.

    Keras' TensorFlow trainer sums the replicas' gradients, so the loss each
    replica returns must be its share of the global mean: Keras' own
    `CompileLoss` applies the same scaling (`scale_loss_for_distribution`,
    only under `keras.src`, not public in Keras 3.15); a `compute_loss`
    override that returns a plain mean makes every update N times too large
    on N replicas. The trainer logs the loss unscaled again. JAX
    (`keras.distribution`) and torch see the global batch: unchanged there.
    """
    if keras.backend.backend() != "tensorflow":
        return loss
    import tensorflow as tf  # Already imported: this is the TF backend.

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        loss = loss * ops.cast(1.0 / replicas, loss.dtype)
    return loss


def _replica_mean_mm_scale(images):
    """MM's per-channel scale (the batch mean of each image's variance) over
    the global batch under `tf.distribute` (each replica sees its share; the
    mean of equal shares' means is the global mean); None elsewhere (the
    loss takes the batch's own, which is the global batch on JAX and torch)."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    mean = ops.mean(images, axis=(1, 2), keepdims=True)
    variance = ops.mean(ops.square(images - mean), axis=(1, 2))
    scale = ops.stop_gradient(ops.mean(variance, axis=0))
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, scale)


def _feature_model(model, layer_name, name):
    return keras.Model(
        model.inputs,
        [model.outputs[0], layer_output(model, model.get_layer(layer_name))],
        name=name,
    )


def downscaler_cost(downscaler, student) -> tuple[int, int, float]:
    """`(MACs of E, MACs of E + S, E's share of them)` for one image."""
    from thumbnet_keras.evaluation.flops import count_flops

    e_macs, s_macs = count_flops(downscaler), count_flops(student)
    return e_macs, e_macs + s_macs, e_macs / max(e_macs + s_macs, 1)


def _warn_downscaler_share(downscaler, student):
    if not downscaler.trainable_weights:  # A fixed resize is the baseline's.
        return
    try:
        e_macs, total, share = downscaler_cost(downscaler, student)
    except Exception as error:  # A model whose cost cannot be counted.
        logger.debug("Downscaler share not checked: %s", error)
        return
    if share > DOWNSCALER_SHARE:
        from thumbnet_keras.layers.downscaler import AUTO_WIDTHS, built_width

        cost = (
            f"The downscaler '{downscaler.name}' costs {e_macs / 1e6:.2f} M MACs, "
            f"{share:.1%} of the inference model (E + S = {total / 1e6:.2f} M): "
            f"more than {DOWNSCALER_SHARE:.0%}, so the thumbnail model saves less "
            "than the factor promises. "
        )
        width = built_width(downscaler)
        if width is not None and width <= min(AUTO_WIDTHS):
            # What `auto_downscaler_width` returns when no width fits: saying
            # "use it" to a user who did was the README's own first warning.
            advice = (
                f"E is already at the narrowest width ({width}): S is small "
                "beside the full-size image E reads, and only a smaller image or "
                "a larger S lowers E's share."
            )
        else:
            advice = (
                "Use a narrower E, e.g. `build_downscaler(..., "
                "width=auto_downscaler_width(input_shape, factor, student))`."
            )
        warnings.warn(cost + advice, stacklevel=3)


@keras.saving.register_keras_serializable(package="thumbnet_keras")
class ThumbNetTrainer(FailSafeSteps, keras.Model):
    """Trains a ThumbNet: downscaler E and student S under a frozen teacher T.

    Args:
        teacher: T, a trained classifier on full-size `(H, W, C)` images that
            outputs logits. Frozen: `trainable` is set to False and it is
            always called with `training=False`.
        downscaler: E, maps `(H, W, C)` to `(H/f, W/f, C)`; see
            `thumbnet_keras.build_downscaler`.
        student: S, T's architecture at `(H/f, W/f, C)` (see
            `thumbnet_keras.make_student`), same number of classes as T.
        stage: `"fm_pretrain"` (MM + FM, no labels) or `"joint"`
            (CL + KD + FM + MM). Defaults to `"joint"`. After changing it, call
            `compile()` again.
        temperature: KD softening temperature. Defaults to 4.0.
        cl_weight, kd_weight, fm_weight, mm_weight: non-negative weights of the
            four terms in the total loss. Default to 1.0.
        teacher_feature_layer, student_feature_layer: names of the layers
            whose outputs FM compares. Default: the last 4-D feature map of
            each (before the global pooling); given only the teacher's, S's
            layer of the same name where it has one.
        label_smoothing: CL's label smoothing epsilon in [0, 1). Defaults to 0.

    S must be trainable and share no weights with T (T is frozen here: a
    student that is T, or built on T's layers, would be frozen with it); the
    trainer refuses otherwise. FM compares each S cell with the T features of
    the same image region: the pooling follows both networks' padding and
    strides (`thumbnet_keras.models.alignment`); when a network's geometry
    cannot be traced it falls back to adaptive pooling, with a warning
    (none when `fm_weight` is 0: FM is off).
    When T's and S's feature maps differ in channels, a trainable 1x1 conv
    (`fm_adapter`) maps S's channels to T's; it belongs to the trainer and is
    left out of `export()`. A downscaler that costs more than 15% of the
    inference model's MACs (E + S) draws a warning.

    Call: `trainer(images)` returns a dict with `"logits"` (B, classes),
    `"thumbnail"` (B, H/f, W/f, C) and `"features"` (S's feature map).
    Compile-time `metrics` (e.g. `["accuracy"]`) see the logits.

    Example:

    >>> teacher = backbones.build("resnet18", (64, 64, 3), num_classes=10)
    >>> trainer = ThumbNetTrainer(
    ...     teacher=teacher,
    ...     downscaler=build_downscaler((64, 64, 3), factor=2),
    ...     student=make_student(teacher, factor=2),
    ...     stage="fm_pretrain",
    ... )
    >>> trainer.compile(optimizer="adam")
    >>> trainer.fit(images, epochs=1)           # no labels needed
    >>> trainer.stage = "joint"
    >>> trainer.compile(optimizer="adam", metrics=["accuracy"])
    >>> trainer.fit(images, labels, epochs=1)
    >>> trainer.export().save("thumbnet.keras")  # image -> E -> S -> logits

    Reference: Zhao & Ghanem, ThumbNet, ACM MM 2020 (arXiv:1904.05034);
    Hinton, Vinyals & Dean 2015 for KD.
    """

    def __init__(
        self,
        teacher: keras.Model,
        downscaler: keras.Model,
        student: keras.Model,
        stage: str = "joint",
        temperature: float = 4.0,
        cl_weight: float = 1.0,
        kd_weight: float = 1.0,
        fm_weight: float = 1.0,
        mm_weight: float = 1.0,
        teacher_feature_layer: str | None = None,
        student_feature_layer: str | None = None,
        label_smoothing: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_classes = check_logits_model(teacher, "teacher")
        student_classes = check_logits_model(student, "student")
        if student_classes != num_classes:
            raise ValueError(
                f"The student '{student.name}' outputs {student_classes} logits but "
                f"the teacher '{teacher.name}' outputs {num_classes}; they must agree."
            )
        if not isinstance(downscaler, keras.Model):
            raise ValueError(
                f"`downscaler` must be a keras.Model, received {type(downscaler).__name__}."
            )
        self._check_shapes(teacher, downscaler, student)
        self._check_student_trainable(teacher, student)
        check_loss_arguments(
            temperature,
            label_smoothing,
            zip(_TERMS, (cl_weight, kd_weight, fm_weight, mm_weight)),
        )

        self.teacher = teacher
        self.teacher.trainable = False
        self.downscaler = downscaler
        self.student = student
        self._stage = None
        self.stage = stage
        self.temperature = float(temperature)
        self.cl_weight = float(cl_weight)
        self.kd_weight = float(kd_weight)
        self.fm_weight = float(fm_weight)
        self.mm_weight = float(mm_weight)
        self.label_smoothing = float(label_smoothing)
        self.teacher_feature_layer = find_feature_layer(
            teacher, teacher_feature_layer, "teacher"
        )
        if student_feature_layer is None and teacher_feature_layer is not None:
            # S derived from T has the same layer: FM compares it (a trial's
            # T layer 'c2' was paired with S's last map 'c3' without a word).
            with contextlib.suppress(ValueError):
                student_feature_layer = find_feature_layer(
                    student, self.teacher_feature_layer, "student"
                )
        self.student_feature_layer = find_feature_layer(
            student, student_feature_layer, "student"
        )

        self._teacher_features = _feature_model(
            teacher, self.teacher_feature_layer, "teacher_features"
        )
        self._student_features = _feature_model(
            student, self.student_feature_layer, "student_features"
        )
        self.fm_pooling = self._fm_pooling(teacher, downscaler, student)
        _warn_downscaler_share(downscaler, student)
        t_channels = self._teacher_features.outputs[1].shape[-1]
        s_channels = self._student_features.outputs[1].shape[-1]
        self.fm_adapter = None
        if t_channels != s_channels:
            self.fm_adapter = keras.layers.Conv2D(t_channels, 1, name="fm_adapter")
            # Built now so the optimizer sees its variables on every backend.
            self.fm_adapter.build(self._student_features.outputs[1].shape)
        self._term_trackers = {
            term: keras.metrics.Mean(name=f"{term}_loss") for term in _TERMS
        }

    @staticmethod
    def _check_shapes(teacher, downscaler, student):
        t_shape = image_input_shape(teacher)
        e_in = image_input_shape(downscaler)
        s_shape = image_input_shape(student)
        e_out = tuple(downscaler.outputs[0].shape[1:])
        if None not in t_shape and None not in e_in and t_shape != e_in:
            raise ValueError(
                f"The downscaler takes {e_in} images but the teacher takes {t_shape}."
            )
        if len(e_out) != 3 or e_out[-1] != e_in[-1]:
            raise ValueError(
                f"The downscaler must output (H/f, W/f, {e_in[-1]}) thumbnails, "
                f"its output shape is {e_out}."
            )
        if None not in s_shape and None not in e_out and s_shape != e_out:
            raise ValueError(
                f"The student takes {s_shape} inputs but the downscaler makes "
                f"{e_out} thumbnails."
            )

    @staticmethod
    def _check_student_trainable(teacher, student):
        teacher_ids = {id(v) for v in teacher.weights}
        shared = [v.path for v in student.weights if id(v) in teacher_ids]
        if shared:
            raise ValueError(
                f"The student '{student.name}' shares {len(shared)} weights with "
                f"the teacher '{teacher.name}' (e.g. {shared[0]}); the teacher is "
                "frozen, so they would not train. Derive the student with "
                "`make_student(teacher, factor)`, which copies the weights."
            )
        if student.weights and not student.trainable_weights:
            raise ValueError(
                f"The student '{student.name}' has no trainable weights "
                "(`trainable=False` on it or all its layers); only the "
                "downscaler would train. Set `student.trainable = True` or derive "
                "it with `make_student(teacher, factor)`."
            )

    def _fm_pooling(self, teacher, downscaler, student):
        image_hw = tuple(image_input_shape(downscaler)[:2])
        thumb_hw = tuple(downscaler.outputs[0].shape[1:3])
        try:
            return fm_pooling(
                teacher,
                self.teacher_feature_layer,
                student,
                self.student_feature_layer,
                image_hw,
                thumb_hw,
            )
        except GeometryError as error:
            if not self.fm_weight:  # FM is off: nothing is compared.
                return None
            warnings.warn(
                f"FM cannot trace which image region each feature cell sees "
                f"({error}); it falls back to adaptive average pooling, which "
                "may compare misaligned cells.",
                stacklevel=3,
            )
            return None

    # -- stage ---------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        if value not in STAGES:
            raise ValueError(
                f"`stage` must be one of {sorted(STAGES)}, received {value!r}."
            )
        if value != self._stage and self._stage is not None:
            # The compiled step and the metric list depend on the stage.
            self.compiled = False
            self.train_function = self.test_function = self.predict_function = None
            self._recompile_for = value
        self._stage = value

    @property
    def active_terms(self) -> tuple:
        return STAGES[self.stage]

    @property
    def metrics(self):
        trackers = set(map(id, self._term_trackers.values()))
        base = [
            m for m in labelled_metrics(self, super().metrics) if id(m) not in trackers
        ]
        return base + [self._term_trackers[t] for t in self.active_terms]

    # -- forward and loss ----------------------------------------------------
    def call(self, inputs, training=None):
        thumbnail = self.downscaler(inputs, training=training)
        logits, features = self._student_features(thumbnail, training=training)
        return {"logits": logits, "thumbnail": thumbnail, "features": features}

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, its inputs checked first (`checked_fit`)."""
        # Not in an overridden compile(): Keras would then skip compiling a
        # loaded trainer (`compile_from_config`).
        stage = getattr(self, "_recompile_for", None)
        if stage is not None and not self.compiled:
            raise ValueError(
                f"The stage changed to {stage!r} since compile(): each stage "
                "compiles its own step and metrics. Call compile() again, e.g. "
                "`trainer.compile(optimizer=keras.optimizers.Adam(1e-4))`."
            )
        warn_torch_jit(getattr(self, "jit_compile", None))
        return checked_fit(super(), self._needs_labels(), x, y, *args, **kwargs)

    def _needs_labels(self) -> str | None:
        """The refusal of a step without labels, if this stage needs them."""
        return _JOINT_NEEDS_LABELS if self.stage == "joint" else None

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if sample_weight is not None:
            raise ValueError(
                "ThumbNetTrainer does not support `sample_weight`; weight the "
                "loss terms with cl_weight, kd_weight, fm_weight and mm_weight."
            )
        if y_pred is None:
            y_pred = self(x, training=training)
        t_logits, t_features = self._teacher_features(x, training=False)
        # Losses are computed in float32 whatever the compute dtype (a
        # mixed_bfloat16 policy makes every output bfloat16).
        t_logits = ops.stop_gradient(ops.cast(t_logits, "float32"))
        t_features = ops.stop_gradient(ops.cast(t_features, "float32"))
        s_features = y_pred["features"]
        if self.fm_adapter is not None:
            s_features = self.fm_adapter(s_features)
        s_features = ops.cast(s_features, "float32")
        s_logits = ops.cast(y_pred["logits"], "float32")

        images = ops.cast(x, "float32")
        terms = {
            "fm": L.feature_mapping_loss(t_features, s_features, self.fm_pooling),
            "mm": L.moment_matching_loss(
                images,
                ops.cast(y_pred["thumbnail"], "float32"),
                scale=_replica_mean_mm_scale(images),
            ),
        }
        if self.stage == "joint":
            if y is None:
                raise ValueError(_JOINT_NEEDS_LABELS)
            terms["cl"] = L.classification_loss(y, s_logits, self.label_smoothing)
            terms["kd"] = L.distillation_loss(t_logits, s_logits, self.temperature)
        weights = {
            "cl": self.cl_weight,
            "kd": self.kd_weight,
            "fm": self.fm_weight,
            "mm": self.mm_weight,
        }
        total = 0.0
        batch = batch_size_weight(images)
        for term in self.active_terms:
            self._term_trackers[term].update_state(terms[term], sample_weight=batch)
            total = total + weights[term] * terms[term]
        if self.stage == "fm_pretrain":
            # S's head past the feature layer gets a zero gradient instead of
            # none: JAX differentiates it to zeros anyway, and under
            # tf.distribute replicas whose gradient lists differ abort the
            # all-reduce (shape mismatch).
            total = total + 0.0 * ops.mean(s_logits)
        if self.losses:
            total = total + ops.sum(ops.stack(self.losses))
        return scale_loss_for_replicas(total)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None:  # fm_pretrain without labels: its loss terms only
            if self.stage == "joint":
                raise ValueError(_JOINT_NEEDS_LABELS)
            return losses_only(self)
        logits = y_pred["logits"] if isinstance(y_pred, dict) else y_pred
        return super().compute_metrics(x, y, logits, sample_weight)

    # -- export --------------------------------------------------------------
    def export(self, filepath=None, format="saved_model", representative=None):
        """Returns the deployable model: full-size image -> E -> S -> logits.

        A Functional model of E and S (built-in layers only when E and S are),
        sharing their weights; the teacher and `fm_adapter` are left out.
        Save it with `.save("thumbnet.keras")` (or `export("thumbnet.keras")`).
        Its layers keep the dtype
        policy E and S were built under: trained under `mixed_float16` or
        `mixed_bfloat16`, save `thumbnet_keras.pipeline.compute.float32_model(
        model)` for a float32 model (what a run saves). With `filepath`, it is also
        saved there as a `.keras` file when the path ends in `.keras`, else
        converted to `format` ("saved_model", "onnx", "litert", or
        "litert_int8" with `representative` calibration inputs) by
        `thumbnet_keras.deploy.export_model`: the verified converters, run in a
        fresh TensorFlow process on the saved `.keras` file, whatever this
        process's backend. (`keras.Model.export(format="onnx")` turns E's
        normalization constants into graph inputs that ONNX Runtime refuses.)
        """
        shape = image_input_shape(self.downscaler)
        image = keras.Input(shape, name="image")
        logits = self.student(self.downscaler(image))
        model = keras.Model(image, logits, name="thumbnet")
        if filepath is not None and str(filepath).endswith(".keras"):
            # `export("thumbnet.keras")` wrote a SavedModel folder of that name,
            # which load_model then could not read (a docs trial).
            if format != "saved_model":
                raise ValueError(
                    f"export({str(filepath)!r}, format={format!r}): a .keras path "
                    "is the Keras file itself; give the converted model its own "
                    "name (e.g. thumbnet.onnx, thumbnet.tflite)."
                )
            model.save(filepath)
            return model
        if filepath is not None:
            import os
            import tempfile

            from thumbnet_keras.deploy import export_model

            fmt = {"tf_saved_model": "saved_model"}.get(format, format)
            with tempfile.TemporaryDirectory() as tmp:
                source = os.path.join(tmp, "thumbnet.keras")
                model.save(source)
                export_model(source, fmt, filepath, representative=representative)
        return model

    def export_thumbnail_model(self) -> keras.Model:
        """Returns S alone: thumbnail `(H/f, W/f, C)` -> logits."""
        return self.student

    # -- serialization -------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        for key in ("layers", "input_layers", "output_layers"):
            config.pop(key, None)
        serialize = keras.saving.serialize_keras_object
        config.update(
            {
                "teacher": serialize(self.teacher),
                "downscaler": serialize(self.downscaler),
                "student": serialize(self.student),
                "stage": self.stage,
                "temperature": self.temperature,
                "cl_weight": self.cl_weight,
                "kd_weight": self.kd_weight,
                "fm_weight": self.fm_weight,
                "mm_weight": self.mm_weight,
                "teacher_feature_layer": self.teacher_feature_layer,
                "student_feature_layer": self.student_feature_layer,
                "label_smoothing": self.label_smoothing,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # deserialization consumes nested dicts
        for key in ("teacher", "downscaler", "student"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
