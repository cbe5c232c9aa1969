"""Run configuration: a pydantic model for the flow side, a frozen dataclass for
the library, and `validate_config`, the checks a run makes before it writes
anything.

`ThumbNetParams` (pydantic) is what a Prefect flow, a deployment or the CLI
receives: every field has bounds and a description, so a bad value fails with a
message that names it. `ThumbNetParams.to_config()` turns it into `RunConfig`,
the frozen dataclass the rest of `thumbnet_keras.pipeline` reads, with the
`smoke` switch applied (a run shrunk to seconds, for tests).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ConfigError",
    "GeneralizeConfig",
    "GeneralizeParams",
    "RunConfig",
    "ThumbNetParams",
    "SMOKE",
]


class ConfigError(ValueError):
    """A run's inputs are invalid; the message names the problem."""


class TrainingHealthError(RuntimeError):
    """A run finished with a failed stage (`pipeline.health`); the message
    lists the stages and problems."""


# What `smoke=True` overrides: a whole run in seconds on a CPU (tests, CI).
SMOKE: dict[str, Any] = {
    "image_size": 32,
    "limit_per_class": 8,
    "teacher_epochs": 1,
    "fm_epochs": 1,
    "joint_epochs": 1,
    "batch_size": 8,
    "downscaler_width": 8,
    "backbone_options": {"widths": [8, 16]},
    "throughput_batches": 2,
    "bn_batches": 2,
}


class _RunFolder:
    """Where a run's folder and its prepared-data cache live (both configs)."""

    runs_dir: str
    run_name: str | None
    data_dir: str | None

    @property
    def run_path(self) -> str:
        """`<runs_dir>/<run_name>` (run_name must be resolved)."""
        return os.path.join(self.runs_dir, self.run_name or "")

    @property
    def resolved_data_dir(self) -> str:
        """The prepared-data cache folder."""
        return self.data_dir or os.path.join(self.runs_dir, "_data")


@dataclasses.dataclass(frozen=True)
class RunConfig(_RunFolder):
    """Everything a `thumbnet` run depends on (saved as `config.json`).

    Attributes (defaults are the ELPV demo's):
        dataset: a manifest name ("elpv", "imagenet2012", ...) or a YAML path.
        backbone: the teacher architecture (`thumbnet_keras.backbones`); the
            student S is the same architecture at thumbnail size.
        backbone_options: keyword options of `backbones.build` (e.g.
            `{"widths": [32, 64, 128]}` for tiny_cnn).
        teacher: a trained teacher `.keras` file. None: build `backbone` with
            `backbone_weights`, or train it on the dataset as stage 0.
        backbone_weights: a local `.weights.h5`/`.keras` file or "imagenet"
            for `backbone`, used as a trained teacher. None: train it.
        factors: downscaling factors; one ThumbNet (E, S) per factor. The
            first is the run's primary factor (`runs/<run>/thumbnet.keras`).
        image_size: full image side (images are resized to it); every
            factor must divide it.
        channels: 1 or 3; None: the manifest's.
        teacher_epochs: stage 0 epochs (when the teacher is trained here).
        fm_epochs: `fm_pretrain` epochs (FM + MM, no labels).
        joint_epochs: `joint` epochs (CL + KD + FM + MM). The bicubic
            baselines train for `fm_epochs + joint_epochs`, the same budget.
        batch_size: examples per step.
        optimizer: "adamw" (AdamW) or "sgd" (SGD, Nesterov momentum 0.9).
        weight_decay: decoupled weight decay of the optimizer (Keras
            optimizers' `weight_decay`; biases and BatchNorm scales and
            offsets are left undecayed). Defaults to 1e-4.
        warmup_epochs: linear warm-up from 0 to the stage's learning rate,
            then cosine decay to 0 at the stage's last step (capped at half
            the stage). Defaults to 1.
        label_smoothing: label smoothing of the CL (cross-entropy) term of
            every stage that has labels. Defaults to 0.1.
        learning_rate: the shared peak learning rate: every per-stage rate
            below that is None falls back to it. Defaults to 1e-3.
        teacher_learning_rate, fm_learning_rate, joint_learning_rate,
        baseline_learning_rate: peak learning rate of stage 0 (when the
            teacher is trained here), `fm_pretrain`, `joint`, and the
            bicubic baselines (`bicubic_cl`, `bicubic_kd`,
            `bicubic_kd_equal`). None: `learning_rate`.
        temperature, cl_weight, kd_weight, fm_weight, mm_weight: ThumbNet loss
            settings (`ThumbNetTrainer`).
        downscaler_width, downscaler_depth: size of E's learned branch;
            width None: sized from the student's cost
            (`auto_downscaler_width`, E a small share of E + S's MACs).
        downscaler_variant: E's design, "space_to_depth" (default) or
            "strided" (the earlier E; `build_downscaler(variant=...)`).
        bn_batches: batches of bicubic train thumbnails on which S's
            BatchNorm statistics are re-estimated before S (initialized from
            T) is trained, and for the `teacher_bicubic_bn` arm; 0: keep T's.
        limit_per_class: keep N examples per class (smoke runs); None: all.
        seed: the seed of data order, augmentation, initialization and
            dropout (each epoch's draws depend on (seed, epoch) only, so a
            resumed stage continues the same run).
        deterministic: also use deterministic kernels (TensorFlow's op
            determinism, which the tf.data input pipeline uses on every
            backend; torch's deterministic algorithms): same seed, same
            weights bit for bit, even on a busy machine. Defaults to True.
        on_nonfinite: "fail" (default): a non-finite loss stops the stage,
            restores its last good epoch and fails the run with the stage,
            epoch and likely cause; "continue": record it and train on.
        run_name: folder under `runs_dir`; resolved before the run starts.
        runs_dir: where run folders live.
        data_dir: cache of prepared datasets; None: `<runs_dir>/_data`.
        export_formats: extra exports of thumbnet.keras ("saved_model",
            "onnx", "litert", "litert_int8"; see docs/deploy.md).
        throughput_batches: timed batches per model for images/s.
        precision: dtype policy of every training stage, teacher included:
            "float32", "mixed_bfloat16" or "mixed_float16" (dynamic loss
            scaling); variables and losses stay float32, saved models are
            float32 (`pipeline.compute`).
        distribution: "none" or "data_parallel" (every local accelerator:
            `keras.distribution.DataParallel` on JAX,
            `tf.distribute.MirroredStrategy` on TensorFlow); `batch_size` is
            the global batch.
        sync_batchnorm: with data_parallel on TensorFlow, BatchNorm
            statistics over the global batch (`synchronized=True`); JAX's
            are the global batch's anyway.
        jit_compile: "auto" (Keras': XLA on JAX, on TensorFlow with a GPU),
            "on" (XLA on TensorFlow's CPU too) or "off".
        smoke: already applied; recorded for the report.
    """

    dataset: str = "elpv"
    backbone: str = "tiny_cnn"
    backbone_options: dict = dataclasses.field(default_factory=dict)
    teacher: str | None = None
    backbone_weights: str | None = None
    factors: tuple[int, ...] = (2,)
    image_size: int = 64
    channels: int | None = None
    teacher_epochs: int = 10
    fm_epochs: int = 2
    joint_epochs: int = 8
    batch_size: int = 32
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    learning_rate: float = 1e-3
    teacher_learning_rate: float | None = None
    fm_learning_rate: float | None = None
    joint_learning_rate: float | None = None
    baseline_learning_rate: float | None = None
    temperature: float = 4.0
    cl_weight: float = 1.0
    kd_weight: float = 1.0
    fm_weight: float = 1.0
    mm_weight: float = 1.0
    downscaler_width: int | None = None
    downscaler_depth: int = 2
    downscaler_variant: str = "space_to_depth"
    bn_batches: int = 100
    limit_per_class: int | None = None
    seed: int = 0
    deterministic: bool = True
    on_nonfinite: str = "fail"
    run_name: str | None = None
    runs_dir: str = "runs"
    data_dir: str | None = None
    export_formats: tuple[str, ...] = ()
    throughput_batches: int = 10
    precision: str = "float32"
    distribution: str = "none"
    sync_batchnorm: bool = False
    jit_compile: str = "auto"
    smoke: bool = False

    @property
    def baseline_epochs(self) -> int:
        """Epochs of each bicubic baseline: ThumbNet's whole budget."""
        return self.fm_epochs + self.joint_epochs

    def stage_learning_rate(self, stage: str) -> float:
        """The peak learning rate of a stage ("teacher", "fm_pretrain",
        "joint", or a baseline), falling back to `learning_rate`."""
        field = {"teacher": "teacher", "fm_pretrain": "fm", "joint": "joint"}.get(
            stage, "baseline"
        )
        rate = getattr(self, f"{field}_learning_rate")
        return self.learning_rate if rate is None else rate

    def to_json(self) -> dict:
        """A JSON-able dict (tuples become lists)."""
        return dataclasses.asdict(self) | {
            "factors": list(self.factors),
            "export_formats": list(self.export_formats),
        }

    @classmethod
    def from_json(cls, obj: dict) -> RunConfig:
        """Inverse of `to_json`."""
        obj = dict(obj)
        obj["factors"] = tuple(obj["factors"])
        obj["export_formats"] = tuple(obj.get("export_formats", ()))
        # Runs saved before E had variants used the strided E.
        obj.setdefault("downscaler_variant", "strided")
        return cls(**obj)


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
EXPORT_FORMATS = ("saved_model", "onnx", "litert", "litert_int8")


class ThumbNetParams(BaseModel):
    """Parameters of the `thumbnet` flow (see `RunConfig` for their meaning)."""

    # NaN and infinities are refused (a NaN passes no bound check's message).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dataset: str = Field("elpv", description="Manifest name or YAML path.")
    backbone: str = Field("tiny_cnn", description="Teacher architecture.")
    backbone_options: dict[str, Any] = Field(
        default_factory=dict, description="Options of backbones.build."
    )
    teacher: str | None = Field(
        None,
        description="A trained teacher .keras file, or 'pretrained:elpv' (shipped).",
    )
    backbone_weights: str | None = Field(
        None, description="Local weights file or 'imagenet' for the backbone."
    )
    factors: list[int] = Field(
        [2], min_length=1, max_length=4, description="Downscaling factors (>= 2)."
    )
    image_size: int = Field(64, ge=8, le=1024, description="Full image side.")
    channels: int | None = Field(None, ge=1, le=3, description="1 or 3.")
    teacher_epochs: int = Field(10, ge=0, le=1000, description="Stage 0 epochs.")
    fm_epochs: int = Field(2, ge=0, le=1000, description="fm_pretrain epochs.")
    joint_epochs: int = Field(8, ge=1, le=1000, description="joint epochs.")
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw, or sgd (Nesterov momentum 0.9)."
    )
    weight_decay: float = Field(
        1e-4, ge=0, le=1.0, description="Decoupled weight decay."
    )
    warmup_epochs: float = Field(
        1.0, ge=0, le=1000, description="Linear warm-up epochs before cosine decay."
    )
    label_smoothing: float = Field(
        0.1, ge=0, lt=1.0, description="Label smoothing of the CL loss."
    )
    learning_rate: float = Field(
        1e-3, gt=0, le=10.0, description="Peak rate of every stage without its own."
    )
    teacher_learning_rate: float | None = Field(
        None, gt=0, le=10.0, description="Teacher stage rate (None: learning_rate)."
    )
    fm_learning_rate: float | None = Field(
        None, gt=0, le=10.0, description="fm_pretrain rate (None: learning_rate)."
    )
    joint_learning_rate: float | None = Field(
        None, gt=0, le=10.0, description="joint rate (None: learning_rate)."
    )
    baseline_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10.0,
        description="Bicubic baselines' rate (None: learning_rate).",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="KD temperature.")
    cl_weight: float = Field(1.0, ge=0, description="CL loss weight.")
    kd_weight: float = Field(1.0, ge=0, description="KD loss weight.")
    fm_weight: float = Field(1.0, ge=0, description="FM loss weight.")
    mm_weight: float = Field(1.0, ge=0, description="MM loss weight.")
    downscaler_width: int | None = Field(
        None, ge=1, le=512, description="E's width (None: sized from S's cost)."
    )
    downscaler_depth: int = Field(2, ge=0, le=16, description="E's depth.")
    downscaler_variant: Literal["space_to_depth", "strided"] = Field(
        "space_to_depth",
        description="E's design: space_to_depth (no full-resolution conv) or "
        "strided (the earlier E).",
    )
    bn_batches: int = Field(
        100, ge=0, le=100_000, description="Batches to re-estimate S's BatchNorm on."
    )
    limit_per_class: int | None = Field(None, ge=1, description="Cap per class.")
    seed: int = Field(
        0, ge=0, description="Seed of data order, augmentation, init and dropout."
    )
    deterministic: bool = Field(
        True,
        description="Deterministic kernels: a seed reproduces a run bit for bit.",
    )
    on_nonfinite: Literal["fail", "continue"] = Field(
        "fail",
        description="A non-finite loss: fail the run (restoring the last good "
        "epoch), or continue training.",
    )
    run_name: str | None = Field(
        None, pattern=_NAME_PATTERN, description="Run folder name (default: dated)."
    )
    runs_dir: str = Field("runs", description="Parent folder of run folders.")
    data_dir: str | None = Field(None, description="Prepared-data cache folder.")
    export_formats: list[str] = Field(
        [], description=f"Extra exports, any of {EXPORT_FORMATS}."
    )
    throughput_batches: int = Field(10, ge=1, le=1000, description="Timed batches.")
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "float32",
        description="Dtype policy of every stage (mixed_float16: loss scaling).",
    )
    distribution: Literal["none", "data_parallel"] = Field(
        "none",
        description="data_parallel: every local GPU/TPU (JAX or TensorFlow); "
        "batch_size is global.",
    )
    sync_batchnorm: bool = Field(
        False, description="Synchronized BatchNorm under data_parallel (TF)."
    )
    jit_compile: Literal["auto", "on", "off"] = Field(
        "auto", description="XLA: auto (Keras' choice), on, or off."
    )
    smoke: bool = Field(False, description="Shrink the run to seconds (tests).")

    def to_config(self) -> RunConfig:
        """The frozen `RunConfig`, with `smoke` applied."""
        values = self.model_dump()
        if self.smoke:
            kept = {"backbone_options"}
            if self.teacher is not None:  # A given teacher fixes the image size.
                kept.add("image_size")
            values.update({k: v for k, v in SMOKE.items() if k not in kept})
            if self.backbone == "tiny_cnn" and not self.backbone_options:
                values["backbone_options"] = dict(SMOKE["backbone_options"])
        values["factors"] = tuple(values["factors"])
        values["export_formats"] = tuple(values["export_formats"])
        return RunConfig(**values)


@dataclasses.dataclass(frozen=True)
class GeneralizeConfig(_RunFolder):
    """A `generalize` run: reuse a trained E, frozen, elsewhere.

    Attributes:
        source_run: a finished `thumbnet` run folder (holds `f<factor>/downscaler.keras`).
        factor: which of its downscalers to reuse.
        experiments: `(dataset, backbone)` pairs; for each, a fresh S of that
            backbone (random init) is trained on E's thumbnails and on bicubic
            thumbnails with the same budget. None for either: the source
            run's. The default, one pair of Nones, reruns the source run's
            dataset and backbone with a fresh S; pass (another dataset, None)
            and (None, another backbone) to test the paper's two
            generalization claims, as the `generalize` deployment does.
        epochs: training epochs of each fresh S (the epoch of best validation
            top-1 is kept).
        seeds: every experiment trains both arms once per seed (S's
            initialization, data order and augmentation); the report gives
            the mean and spread of the difference over seeds.
        optimizer, weight_decay, warmup_epochs, label_smoothing,
        learning_rate: the training recipe of `RunConfig` (same defaults;
        `learning_rate` is the fresh S's peak rate).
        batch_size, limit_per_class, run_name, runs_dir, data_dir,
        throughput_batches, smoke: as in `RunConfig`.
    """

    source_run: str
    factor: int = 2
    experiments: tuple[tuple[str | None, str | None], ...] = ((None, None),)
    epochs: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 32
    # The recipe's defaults are RunConfig's (one definition).
    optimizer: str = RunConfig.optimizer
    weight_decay: float = RunConfig.weight_decay
    warmup_epochs: float = RunConfig.warmup_epochs
    label_smoothing: float = RunConfig.label_smoothing
    learning_rate: float = RunConfig.learning_rate
    limit_per_class: int | None = None
    run_name: str | None = None
    runs_dir: str = "runs"
    data_dir: str | None = None
    throughput_batches: int = 5
    smoke: bool = False

    def stage_learning_rate(self, stage: str) -> float:
        """`learning_rate` (a generalize run has one stage: the fresh S), so
        that `pipeline.recipe.make_optimizer` takes this config too."""
        return self.learning_rate

    def to_json(self) -> dict:
        """A JSON-able dict."""
        return dataclasses.asdict(self) | {
            "experiments": [list(e) for e in self.experiments],
            "seeds": list(self.seeds),
        }

    @classmethod
    def from_json(cls, obj: dict) -> GeneralizeConfig:
        """Inverse of `to_json`."""
        obj = dict(obj)
        obj["experiments"] = tuple(tuple(e) for e in obj["experiments"])
        obj["seeds"] = tuple(obj["seeds"])
        return cls(**obj)


class Experiment(BaseModel):
    """One generalization experiment: a dataset and a backbone for a fresh S."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field(None, description="None: the source run's dataset.")
    backbone: str | None = Field(None, description="None: the source run's backbone.")


def _run_field(name: str):
    """A copy of `ThumbNetParams`' field `name` (default, bounds, description)."""
    import copy

    return copy.deepcopy(ThumbNetParams.model_fields[name])


class GeneralizeParams(BaseModel):
    """Parameters of the `generalize` flow (see `GeneralizeConfig`).

    The recipe fields (`RECIPE_FIELDS`) are `ThumbNetParams`' own, so their
    defaults, bounds and help cannot drift apart.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "optimizer",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "learning_rate",
    )

    source_run: str = Field(..., description="A finished thumbnet run folder.")
    factor: int = Field(2, ge=2, le=32, description="Which E of the run to reuse.")
    experiments: list[Experiment] = Field(
        default_factory=lambda: [Experiment()],
        min_length=1,
        description="(dataset, backbone) pairs to train a fresh S on.",
    )
    epochs: int = Field(5, ge=1, le=1000, description="Epochs per fresh S.")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        [0, 1, 2],
        min_length=1,
        max_length=20,
        description="Both arms of every experiment are trained once per seed.",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Batch size.")
    optimizer: Literal["adamw", "sgd"] = _run_field("optimizer")
    weight_decay: float = _run_field("weight_decay")
    warmup_epochs: float = _run_field("warmup_epochs")
    label_smoothing: float = _run_field("label_smoothing")
    learning_rate: float = _run_field("learning_rate")
    limit_per_class: int | None = Field(None, ge=1, description="Cap per class.")
    run_name: str | None = Field(None, pattern=_NAME_PATTERN, description="Run name.")
    runs_dir: str = Field("runs", description="Parent folder of run folders.")
    data_dir: str | None = Field(None, description="Prepared-data cache folder.")
    throughput_batches: int = Field(5, ge=1, le=1000, description="Timed batches.")
    smoke: bool = Field(False, description="Shrink to seconds (tests).")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, received {seeds}")
        return seeds

    def to_config(self) -> GeneralizeConfig:
        """The frozen `GeneralizeConfig`, with `smoke` applied."""
        values = self.model_dump()
        values["experiments"] = tuple(
            (e["dataset"], e["backbone"]) for e in values["experiments"]
        )
        values["seeds"] = tuple(values["seeds"])
        if self.smoke:
            values.update(epochs=1, limit_per_class=8, batch_size=8)
            values["throughput_batches"] = 2
        return GeneralizeConfig(**values)
