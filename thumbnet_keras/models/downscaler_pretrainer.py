"""`DownscalerPretrainer`: trains the downscaler E alone, through the frozen
teacher, before E and S train together.

E's thumbnail is scaled back up to the teacher's input size (bicubic) and
read by the teacher; E learns to make the teacher predict what it predicts
on the full image (KD) and the label (CL). The teacher and its input size do
not change, so what the loss rewards is information E keeps in the
thumbnail that bicubic loses, read by the network that knows what matters in
the full-size images.

Why a separate stage: in the joint stage S starts from the teacher's
weights and adapts to whatever thumbnail it gets, so E (a residual on
bicubic, starting at zero) hardly moves: on ELPV its thumbnail moved by 1-4%
of the bicubic thumbnail's spread in 4 epochs, and E + S ended level with
bicubic + S. Trained through the teacher first, the same E lifts the
teacher's validation top-1 on its up-scaled thumbnails from 65.5% (bicubic)
to 70-76% at f = 4 (`benchmarks/e_information_bound.py`). S fine-tuned on
those thumbnails for 4 epochs turned a part of that into accuracy at f = 4
(+0.85 validation points over E + S on the mean of 3 seeds, within their
spread) and none at f = 2 (`benchmarks/e_pretrain.py`, `docs/results.md`).
This stage is not in the ThumbNet paper.
"""

from __future__ import annotations

import copy

import keras
from keras import ops

from thumbnet_keras.losses import thumbnet_losses as L
from thumbnet_keras.models.student import image_input_shape
from thumbnet_keras.models.trainer import (
    FailSafeSteps,
    batch_size_weight,
    check_logits_model,
    check_loss_arguments,
    checked_fit,
    labelled_metrics,
    losses_only,
    scale_loss_for_replicas,
    warn_torch_jit,
)

__all__ = ["DownscalerPretrainer"]

_CL_NEEDS_LABELS = (
    "CL needs labels: fit(x, y) or a dataset of (images, labels) tuples (not "
    "dicts); or set cl_weight=0 to train on the teacher's logits alone."
)


@keras.saving.register_keras_serializable(package="thumbnet_keras")
class DownscalerPretrainer(FailSafeSteps, keras.Model):
    """Trains E so that the frozen teacher reads its thumbnails, scaled back
    up, as it reads the full image.

    Args:
        teacher: T, a trained classifier on `(H, W, C)` images that outputs
            logits. Frozen (`trainable=False`, called with `training=False`);
            gradients flow through it to E.
        downscaler: E, maps `(H, W, C)` to `(H/f, W/f, C)`
            (`thumbnet_keras.build_downscaler`).
        temperature: KD softening temperature. Defaults to 4.0.
        cl_weight, kd_weight: weights of CL (labels) and KD (the teacher's
            logits on the full image). Default to 1.0.
        label_smoothing: CL's label smoothing in [0, 1). Defaults to 0.
        value_range: optional `(low, high)`: the up-scaled thumbnail is
            clipped to it (the range of the images; bicubic up-scaling
            overshoots at edges).

    Call: `pretrainer(images)` returns the teacher's logits on E's thumbnail
    scaled back up to `(H, W)`. Compile-time `metrics` (e.g.
    `["accuracy"]`) see them. Only E's weights train; `downscaler` is the
    trained E (a plain Functional model, passed on to `ThumbNetTrainer`).

    Example:

    >>> e = build_downscaler((128, 128, 1), factor=4, value_range=(0, 1))
    >>> pre = DownscalerPretrainer(teacher, e, value_range=(0, 1))
    >>> pre.compile(optimizer="adamw", metrics=["accuracy"])
    >>> pre.fit(images, labels, epochs=2)
    >>> trainer = ThumbNetTrainer(teacher, e, make_student(teacher, 4))
    """

    def __init__(
        self,
        teacher: keras.Model,
        downscaler: keras.Model,
        temperature: float = 4.0,
        cl_weight: float = 1.0,
        kd_weight: float = 1.0,
        label_smoothing: float = 0.0,
        value_range=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_logits_model(teacher, "teacher")
        if not isinstance(downscaler, keras.Model):
            raise ValueError(
                "`downscaler` must be a keras.Model, received "
                f"{type(downscaler).__name__}."
            )
        t_shape = image_input_shape(teacher)
        e_shape = image_input_shape(downscaler)
        if None not in t_shape and None not in e_shape and t_shape != e_shape:
            raise ValueError(
                f"The downscaler takes {e_shape} images but the teacher takes "
                f"{t_shape}; E must read the teacher's full-size images."
            )
        if None in e_shape[:2]:
            raise ValueError(
                f"The downscaler's input size must be fixed, it is {e_shape}: "
                "its thumbnails are scaled back up to that size."
            )
        check_loss_arguments(
            temperature, label_smoothing, (("cl", cl_weight), ("kd", kd_weight))
        )
        if not cl_weight and not kd_weight:
            raise ValueError(
                "`cl_weight` and `kd_weight` are both 0: nothing to learn."
            )
        if value_range is not None:
            low, high = (float(v) for v in value_range)
            if not low < high:
                raise ValueError(
                    f"`value_range` must be (low, high) with low < high, received "
                    f"{value_range!r}."
                )
            value_range = (low, high)
        self.teacher = teacher
        self.teacher.trainable = False
        self.downscaler = downscaler
        self.temperature = float(temperature)
        self.cl_weight = float(cl_weight)
        self.kd_weight = float(kd_weight)
        self.label_smoothing = float(label_smoothing)
        self.value_range = value_range
        self.image_size = tuple(int(v) for v in e_shape[:2])
        self._trackers = {t: keras.metrics.Mean(name=f"{t}_loss") for t in ("cl", "kd")}

    def compile(self, *args, jit_compile="auto", **kwargs):
        """`keras.Model.compile`; on TensorFlow without XLA: its bicubic
        resize (`ResizeBicubic`) has no XLA kernel, so a compiled step would
        fail. JAX (always XLA) and torch are unaffected."""
        if keras.backend.backend() == "tensorflow":
            jit_compile = False
        warn_torch_jit(jit_compile)
        super().compile(*args, jit_compile=jit_compile, **kwargs)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, its inputs checked first (`checked_fit`)."""
        return checked_fit(super(), self._needs_labels(), x, y, *args, **kwargs)

    def _needs_labels(self) -> str | None:
        """The refusal of a step without labels, if CL is on."""
        return _CL_NEEDS_LABELS if self.cl_weight else None

    @property
    def metrics(self):
        trackers = set(map(id, self._trackers.values()))
        base = [
            m for m in labelled_metrics(self, super().metrics) if id(m) not in trackers
        ]
        return base + list(self._trackers.values())

    def upscale(self, thumbnail):
        """The thumbnail scaled back up to E's input size (bicubic), clipped
        to `value_range`. In float32: TensorFlow's bicubic resize has no
        gradient in bfloat16 (E would not train under mixed precision)."""
        up = ops.image.resize(
            ops.cast(thumbnail, "float32"), self.image_size, interpolation="bicubic"
        )
        if self.value_range is not None:
            up = ops.clip(up, *self.value_range)
        return up

    def call(self, inputs, training=None):
        thumbnail = self.downscaler(inputs, training=training)
        return self.teacher(self.upscale(thumbnail), training=False)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if sample_weight is not None:
            raise ValueError(
                "DownscalerPretrainer does not support `sample_weight`; weight "
                "the loss terms with cl_weight and kd_weight."
            )
        if y_pred is None:
            y_pred = self(x, training=training)
        logits = ops.cast(y_pred, "float32")
        terms = {}
        if self.kd_weight:
            t_logits = self.teacher(x, training=False)
            t_logits = ops.stop_gradient(ops.cast(t_logits, "float32"))
            terms["kd"] = L.distillation_loss(t_logits, logits, self.temperature)
        if self.cl_weight:
            if y is None:
                raise ValueError(_CL_NEEDS_LABELS)
            terms["cl"] = L.classification_loss(y, logits, self.label_smoothing)
        weights = {"cl": self.cl_weight, "kd": self.kd_weight}
        total = 0.0
        batch = batch_size_weight(x)
        for term, value in terms.items():
            self._trackers[term].update_state(value, sample_weight=batch)
            total = total + weights[term] * value
        if self.losses:
            total = total + ops.sum(ops.stack(self.losses))
        return scale_loss_for_replicas(total)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if y is None:  # KD alone (cl_weight 0): its loss terms only
            if self.cl_weight:
                raise ValueError(_CL_NEEDS_LABELS)
            return losses_only(self)
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def get_config(self):
        config = super().get_config()
        for key in ("layers", "input_layers", "output_layers"):
            config.pop(key, None)
        serialize = keras.saving.serialize_keras_object
        config.update(
            {
                "teacher": serialize(self.teacher),
                "downscaler": serialize(self.downscaler),
                "temperature": self.temperature,
                "cl_weight": self.cl_weight,
                "kd_weight": self.kd_weight,
                "label_smoothing": self.label_smoothing,
                "value_range": self.value_range,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)
        for key in ("teacher", "downscaler"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
