"""Run configuration: one pydantic model of a run's parameters, and the
frozen dataclass of a `generalize` run.

`ThumbNetParams` is the one definition of a `thumbnet` run's parameters: the
CLI's options and help (`pipeline.options`), the flows, the deployments and
the benchmarks all read it, and every field has bounds and a description, so a
bad value fails with a message that names it. `ThumbNetParams.to_config()`
applies the `smoke` switch (a run shrunk to a plumbing check, for tests) and gives a
`RunConfig`: the same model, no field of its own, that the rest of
`thumbnet_keras.pipeline` reads and each run folder saves as `config.json`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "ConfigError",
    "GeneralizeConfig",
    "GeneralizeParams",
    "RunConfig",
    "ThumbNetParams",
    "SMOKE",
    "skipped_stages",
    "smoke_overrides",
]


# Fields added since runs were first saved, with the value that means what
# a run saved without them did: runs from before E had variants used the
# strided E, and runs from before the e_pretrain stage had none.
LEGACY_VALUES: dict[str, Any] = {
    "downscaler_variant": "strided",
    "e_pretrain_epochs": 0,
}


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
    "e_pretrain_epochs": 1,
    "fm_epochs": 1,
    "joint_epochs": 1,
    # Every loss and stage runs in a smoke run (a plumbing check), so FM and
    # MM are on here though the defaults leave them off.
    "fm_weight": 1.0,
    "mm_weight": 1.0,
    "batch_size": 8,
    "downscaler_width": 8,
    "backbone_options": {"widths": [8, 16]},
    "throughput_batches": 2,
    "bn_batches": 2,
}


def default_backbone(teacher: str | None) -> tuple[str | None, dict]:
    """`(backbone, backbone_options)` a run records when no backbone was
    given: tiny_cnn, which stage 0 trains, without a teacher; the shipped
    teacher's own (MobileNetV2, alpha 0.35) for `pretrained:elpv`; None
    (unknown) for any other teacher. Runs saved before 2026-11-29 recorded
    tiny_cnn with every teacher (`legacy_backbone`)."""
    if teacher is None:
        return "tiny_cnn", {}
    if teacher == "pretrained:elpv":
        from thumbnet_keras.pretrained import elpv_teacher_info

        info = elpv_teacher_info()
        return info["backbone"], dict(info.get("backbone_options", {}))
    return None, {}


def _with_default_backbone(values: dict) -> dict:
    """`values` (a run's fields) with `default_backbone` filled in when no
    backbone is given (its options only where none are given)."""
    if values.get("backbone") is not None:
        return values
    name, options = default_backbone(values.get("teacher"))
    return {
        **values,
        "backbone": name,
        "backbone_options": values.get("backbone_options") or options,
    }


def architecture_label(config) -> str:
    """What a default run name calls the teacher's architecture: `backbone`
    when known, else the teacher's name (a file's stem, an
    `applications:` model name, a keras-hub preset's last part)."""
    if config.backbone:
        return config.backbone
    kind, _, rest = config.teacher.partition(":")
    if kind == "applications":
        return rest.partition(":")[0]
    name = rest if kind == "keras_hub" else config.teacher
    # The last part that is not a version (kaggle://.../resnet_50_imagenet/2).
    parts = [p for p in re.split(r"[/\\]", name) if p and not p.isdigit()]
    return os.path.splitext(parts[-1])[0] if parts else "teacher"


def experiment_backbone(backbone: str | None, saved: dict) -> str:
    """The backbone of a `generalize` experiment: the given one, else the
    source run's (`saved`, its config), which is unknown when the source's
    teacher came as a file without `backbone`."""
    backbone = backbone or saved.get("backbone")
    if backbone is None:
        raise ConfigError(
            f"The source run's teacher ({saved.get('teacher')!r}) was given "
            "without --backbone, so its architecture has no name to build a "
            "fresh S from. Name one for each experiment (--experiment "
            "DATASET:BACKBONE, e.g. fashion_mnist:resnet18)."
        )
    return backbone


def legacy_backbone(saved: dict, new: dict) -> dict:
    """A saved `thumbnet` config as it is recorded now: before 2026-11-29 a
    run with a teacher and no backbone recorded the field's default,
    tiny_cnn (with the smoke widths in a smoke run), where it now records
    `default_backbone(teacher)`; the same run, so its resume is not refused
    for it."""
    teacher = saved.get("teacher")
    if teacher is None or saved.get("backbone") != "tiny_cnn":
        return saved
    name, options = default_backbone(teacher)
    old_options = ({}, SMOKE["backbone_options"] if saved.get("smoke") else {})
    if (new.get("backbone"), new.get("backbone_options")) == (name, options) and (
        saved.get("backbone_options") in old_options
    ):
        return {**saved, "backbone": name, "backbone_options": options}
    return saved


# What `GeneralizeParams(smoke=True)` sets.
GENERALIZE_SMOKE: dict[str, Any] = {
    "epochs": 1,
    "limit_per_class": 8,
    "batch_size": 8,
    "throughput_batches": 2,
}


def smoke_replaced(params) -> list[str]:
    """`field given -> smoke's` for each field of `params` (a
    `ThumbNetParams` or `GeneralizeParams` with `smoke` on) that was set and
    that smoke replaces: the command line refuses those together, a flow
    called with them (a deployment's parameters) says what it ran with."""
    if not params.smoke:
        return []
    generalize = isinstance(params, GeneralizeParams)
    smoke = smoke_values(params.model_dump(), generalize=generalize)
    return [
        f"{k} {getattr(params, k)!r} -> {smoke[k]!r}"
        for k in sorted(params.model_fields_set & set(smoke))
        if getattr(params, k) != smoke[k]
    ]


def smoke_values(given: dict, generalize: bool = False) -> dict[str, Any]:
    """The fields, with their values, that `smoke=True` sets over the `given`
    ones: `GENERALIZE_SMOKE` for a generalize run, else `SMOKE` less
    `smoke_overrides`' exceptions."""
    if generalize:
        return dict(GENERALIZE_SMOKE)
    return {k: SMOKE[k] for k in smoke_overrides(given)}


def smoke_overrides(given: dict) -> list[str]:
    """The fields of `SMOKE` that `smoke=True` sets over the `given` values:
    all but `backbone_options` (a given one is kept), and `image_size` when
    a given teacher fixes it."""
    kept = {"backbone_options"} | ({"image_size"} if given.get("teacher") else set())
    return [k for k in SMOKE if k not in kept]


class _RunFolder:
    """Where a run's folder and its prepared-data cache live (both configs;
    reads `runs_dir`, `run_name` and `data_dir`)."""

    @property
    def run_path(self) -> str:
        """`<runs_dir>/<run_name>` (run_name must be resolved)."""
        return os.path.join(self.runs_dir, self.run_name or "")

    @property
    def resolved_data_dir(self) -> str:
        """The prepared-data cache folder."""
        return self.data_dir or os.path.join(self.runs_dir, "_data")


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME_MAX = 128  # A folder name (file systems allow 255 bytes).
ExportFormat = Literal["saved_model", "onnx", "litert", "litert_int8"]
EXPORT_FORMATS: tuple[str, ...] = typing.get_args(ExportFormat)


class ThumbNetParams(BaseModel):
    """Everything a `thumbnet` run depends on; defaults are the ELPV demo's.

    A frozen pydantic model, the one definition of a run's parameters: each
    field's description is its documentation (`thumbnet train --help` and the
    Prefect UI show it), its bounds are checked on construction, and the CLI's
    options are made from the fields (`pipeline.options`). A flow or a
    deployment receives it; `to_config()` gives the run's `RunConfig`.

    Example:

    >>> params = ThumbNetParams(dataset="elpv", factors=[2, 4], smoke=True)
    >>> params.to_config().image_size  # smoke shrinks the run
    32
    """

    # NaN and infinities are refused (a NaN passes no bound check's message).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    dataset: str = Field(
        "elpv",
        description="A manifest name (elpv, imagenet2012, ...; the YAML files "
        "in data_manifests/) or a manifest's path.",
    )
    backbone: str | None = Field(
        None,
        description="The teacher's architecture (thumbnet_keras.backbones), "
        "built and trained as stage 0 when no `teacher` is given (default then: "
        "tiny_cnn). With a `teacher`, the name of its architecture, which "
        "`generalize` builds as a fresh S (unset: unknown; the shipped "
        "pretrained:elpv names its own).",
    )
    backbone_options: dict[str, Any] = Field(
        default_factory=dict,
        description='Keyword options of backbones.build, e.g. {"widths": [32, 64, '
        "128]} for tiny_cnn.",
    )
    teacher: str | None = Field(
        None,
        description="A trained teacher: a .keras file, 'pretrained:elpv' (shipped), "
        "'applications:<Name>[:imagenet|<weights file>]' or 'keras_hub:<preset "
        "or saved folder>' (preprocessing inside). Default: `backbone` with "
        "`backbone_weights`, or trained on the dataset as stage 0.",
    )
    backbone_weights: str | None = Field(
        None,
        description="A local .weights.h5/.keras file or 'imagenet' for the "
        "backbone, used as a trained teacher. Default: train it.",
    )
    factors: tuple[int, ...] = Field(
        (2,),
        min_length=1,
        max_length=4,
        description="Downscaling factors (>= 2, each dividing the image size); "
        "one ThumbNet (E, S) per factor. The first is the run's primary "
        "factor (runs/<run>/thumbnet.keras).",
    )
    image_size: int = Field(
        64,
        ge=8,
        le=1024,
        description="Full image side (each image's central square is resized to it).",
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Image channels, 1 or 3. Default: the manifest's."
    )
    teacher_epochs: int = Field(
        10, ge=0, le=1000, description="Stage 0 epochs (when the teacher is trained)."
    )
    e_pretrain_epochs: int = Field(
        2,
        ge=0,
        le=1000,
        description="e_pretrain epochs: E alone, trained so that the frozen "
        "teacher reads its thumbnails, scaled back up, as it reads the full "
        "image (CL + KD); then S trains on E's thumbnails. 0: off "
        "(docs/design.md).",
    )
    fm_epochs: int = Field(
        0,
        ge=0,
        le=1000,
        description="fm_pretrain epochs (FM + MM, no labels; needs fm_weight or "
        "mm_weight > 0). Default 0: chosen on validation (docs/design.md).",
    )
    joint_epochs: int = Field(
        10,
        ge=1,
        le=1000,
        description="joint epochs (CL + KD + FM + MM). The bicubic baselines "
        "train for `fm_epochs` + `joint_epochs`, the same budget.",
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Examples per step.")
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw, or sgd (Nesterov momentum 0.9)."
    )
    weight_decay: float = Field(
        1e-4,
        ge=0,
        le=1.0,
        description="Decoupled weight decay (biases and BatchNorm scales and "
        "offsets are left undecayed).",
    )
    warmup_epochs: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="Linear warm-up epochs, then cosine decay to 0 at the stage's "
        "last step (capped at half the stage).",
    )
    label_smoothing: float = Field(
        0.1,
        ge=0,
        lt=1.0,
        description="Label smoothing of the CL (cross-entropy) loss.",
    )
    learning_rate: float = Field(
        1e-3,
        gt=0,
        le=10.0,
        description="Peak learning rate of every stage without its own rate.",
    )
    teacher_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10.0,
        description="Stage 0's peak rate. Default: `learning_rate`.",
    )
    e_pretrain_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10.0,
        description="e_pretrain's peak rate. Default: `learning_rate`.",
    )
    fm_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10.0,
        description="fm_pretrain's peak rate. Default: `learning_rate`.",
    )
    joint_learning_rate: float | None = Field(
        None, gt=0, le=10.0, description="joint's peak rate. Default: `learning_rate`."
    )
    baseline_learning_rate: float | None = Field(
        None,
        gt=0,
        le=10.0,
        description="The bicubic baselines' peak rate. Default: `learning_rate`.",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="KD temperature.")
    cl_weight: float = Field(1.0, ge=0, description="CL (cross-entropy) loss weight.")
    kd_weight: float = Field(1.0, ge=0, description="KD loss weight.")
    # The recipe validation chose: CL + KD (docs/design.md, "Defaults");
    # the paper's recipe is fm_epochs > 0 with fm_weight = mm_weight = 1.
    fm_weight: float = Field(
        0.0, ge=0, description="FM (feature map) loss weight (paper: 1)."
    )
    mm_weight: float = Field(
        0.0, ge=0, description="MM (moment matching) loss weight (paper: 1)."
    )
    downscaler_width: int | None = Field(
        None,
        ge=1,
        le=512,
        description="Width of E's learned branch. Default: sized from S's cost "
        "(E a small share of E + S's MACs).",
    )
    downscaler_depth: int = Field(
        2, ge=0, le=16, description="Depth of E's learned branch."
    )
    downscaler_variant: Literal["space_to_depth", "strided"] = Field(
        "space_to_depth",
        description="E's design: space_to_depth (no full-resolution conv) or "
        "strided (the earlier E).",
    )
    bn_batches: int = Field(
        100,
        ge=0,
        le=100_000,
        description="Batches of bicubic thumbnails to re-estimate S's BatchNorm "
        "statistics on before S (initialized from T) trains; 0: keep T's.",
    )
    limit_per_class: int | None = Field(
        None,
        ge=1,
        description="Keep the first N examples of each class in each split the "
        "source gives (its own train and test each keep N). Default: all.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seed of data order, augmentation, initialization and dropout.",
    )
    deterministic: bool = Field(
        True,
        description="Deterministic kernels (TensorFlow op determinism, torch's "
        "deterministic algorithms): a seed reproduces a run bit for bit.",
    )
    on_nonfinite: Literal["fail", "continue"] = Field(
        "fail",
        description="A non-finite loss: fail the run (restoring the last good "
        "epoch), or continue training.",
    )
    run_name: str | None = Field(
        None,
        pattern=_NAME_PATTERN,
        max_length=_NAME_MAX,
        description="Run folder name; rerun the same name to resume. Default: "
        "<dataset>-<backbone>-<date>.",
    )
    runs_dir: str = Field("runs", description="Parent folder of run folders.")
    data_dir: str | None = Field(
        None, description="Prepared-data cache folder. Default: _data in `runs_dir`."
    )
    export_formats: tuple[ExportFormat, ...] = Field(
        (), description="Extra exports of thumbnet.keras (docs/deploy.md)."
    )
    throughput_batches: int = Field(
        10, ge=1, le=1000, description="Timed batches per model for images/s."
    )
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = Field(
        "float32",
        description="Dtype policy of every training stage (mixed_float16: dynamic "
        "loss scaling); variables, losses and saved models stay float32.",
    )
    distribution: Literal["none", "data_parallel"] = Field(
        "none",
        description="data_parallel: every local GPU/TPU (JAX or TensorFlow); the "
        "`batch_size` is the global batch.",
    )
    sync_batchnorm: bool = Field(
        False,
        description="BatchNorm statistics over the global batch under "
        "data_parallel on TensorFlow.",
    )
    jit_compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="XLA: auto (Keras' choice: JAX, TensorFlow with a GPU), on "
        "(TensorFlow's CPU too) or off.",
    )
    smoke: bool = Field(
        False,
        description="Shrink the run to a plumbing check (tests, CI; about a "
        "minute of training on a 2-core CPU, several minutes with a teacher "
        "whose input fixes a large size, e.g. the demo's 128x128): it sets the image "
        "size (not with a teacher: then --image-size must be the teacher's input "
        "size, and is accepted beside --smoke), data limit, epochs, batch size and "
        "E width (the command line refuses those options beside it).",
    )

    def to_config(self) -> RunConfig:
        """The run's `RunConfig`, with `smoke` applied and `backbone` filled
        in where it is known (`default_backbone`)."""
        values = _with_default_backbone(self.model_dump())
        if self.smoke:
            values.update(smoke_values(values))
            if values["backbone"] == "tiny_cnn" and not self.backbone_options:
                values["backbone_options"] = dict(SMOKE["backbone_options"])
        return RunConfig.model_validate(values)

    def check_fm_pretrain(self, name=lambda field: f"`{field}`") -> None:
        """Refuses `fm_epochs > 0` with both FM and MM weights 0 (that stage
        trains on FM + MM only, so it would learn nothing), and
        `e_pretrain_epochs > 0` with both CL and KD weights 0 (likewise). `name` spells a
        field in the message (the CLI passes its option names)."""
        if self.fm_epochs and not (self.fm_weight or self.mm_weight):
            fm, mm = name("fm_weight"), name("mm_weight")
            raise ConfigError(
                f"{name('fm_epochs')} {self.fm_epochs}: the FM pre-training stage "
                f"trains E + S on the FM and MM losses only, and {fm} and {mm} are "
                "both 0 (the defaults: validation chose CL + KD, docs/design.md), "
                f"so it would learn nothing. Set {fm} and {mm} to 1 (the paper's "
                f"recipe), or {name('fm_epochs')} to 0."
            )
        if self.e_pretrain_epochs and not (self.cl_weight or self.kd_weight):
            cl, kd = name("cl_weight"), name("kd_weight")
            raise ConfigError(
                f"{name('e_pretrain_epochs')} {self.e_pretrain_epochs}: the E "
                f"pre-training stage trains on the CL and KD losses only, and {cl} "
                f"and {kd} are both 0, so it would learn nothing. Set one of them "
                f"above 0, or {name('e_pretrain_epochs')} to 0."
            )


class RunConfig(ThumbNetParams, _RunFolder):
    """A run's resolved parameters: `ThumbNetParams` with `smoke` applied
    (`smoke` stays True, for the report) and, once `resolve_run` claimed the
    run folder, `channels` and `run_name` filled in. Saved as the run
    folder's `config.json` (`to_json`); adds no field, so the two cannot
    drift apart.
    """

    @model_validator(mode="before")
    @classmethod
    def _backbone_known(cls, values):
        """Built directly (not by `to_config`): the default backbone too."""
        return _with_default_backbone(values) if isinstance(values, dict) else values

    def to_config(self) -> RunConfig:
        """Itself: `smoke` is already applied."""
        return self

    @property
    def baseline_epochs(self) -> int:
        """Epochs of each bicubic baseline: ThumbNet's whole budget."""
        return self.fm_epochs + self.joint_epochs

    def stage_learning_rate(self, stage: str) -> float:
        """The peak learning rate of a stage ("teacher", "e_pretrain", "fm_pretrain",
        "joint", or a baseline), falling back to `learning_rate`."""
        field = {
            "teacher": "teacher",
            "e_pretrain": "e_pretrain",
            "fm_pretrain": "fm",
            "joint": "joint",
        }.get(stage, "baseline")
        rate = getattr(self, f"{field}_learning_rate")
        return self.learning_rate if rate is None else rate

    def to_json(self) -> dict:
        """A JSON-able dict (tuples become lists): `config.json`'s `config`."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, obj: dict) -> RunConfig:
        """Inverse of `to_json` (validated)."""
        obj = dict(obj)
        for key, value in LEGACY_VALUES.items():
            obj.setdefault(key, value)
        return cls.model_validate(obj)


def skipped_stages(config) -> frozenset[str]:
    """The stages of `STAGES` a run does not have: `e_pretrain` when
    `e_pretrain_epochs` is 0, `fm_pretrain` when `fm_epochs` is 0.

    Args:
        config: a `RunConfig`, or a run's saved config as a dict (runs saved
            before `e_pretrain` existed have no such field: no e_pretrain).
    """
    if isinstance(config, Mapping):
        get = config.get
    else:

        def get(key, default):
            return getattr(config, key, default)

    skip = set()
    if not get("e_pretrain_epochs", 0):
        skip.add("e_pretrain")
    if not get("fm_epochs", 1):
        skip.add("fm_pretrain")
    return frozenset(skip)


def _default(name: str):
    """`ThumbNetParams`' default of field `name`."""
    return ThumbNetParams.model_fields[name].get_default(call_default_factory=True)


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
        learning_rate: the training recipe of `ThumbNetParams` (same defaults;
        `learning_rate` is the fresh S's peak rate).
        batch_size, limit_per_class, run_name, runs_dir, data_dir,
        throughput_batches, smoke: as in `ThumbNetParams`.
    """

    source_run: str
    factor: int = 2
    experiments: tuple[tuple[str | None, str | None], ...] = ((None, None),)
    epochs: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 32
    # The recipe's defaults are ThumbNetParams' (one definition).
    optimizer: str = _default("optimizer")
    weight_decay: float = _default("weight_decay")
    warmup_epochs: float = _default("warmup_epochs")
    label_smoothing: float = _default("label_smoothing")
    learning_rate: float = _default("learning_rate")
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

    The recipe fields (`RECIPE_FIELDS`), the batch size, the limit and the
    folders are `ThumbNetParams`' own fields, so their defaults, bounds and
    help cannot drift apart.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    RECIPE_FIELDS: ClassVar[tuple[str, ...]] = (
        "optimizer",
        "weight_decay",
        "warmup_epochs",
        "label_smoothing",
        "learning_rate",
    )

    # Required, checked by `check_generalize` rather than by the schema: a
    # deployment run's `params` without it then takes the deployment's
    # (`flows.thumbnet_flows._with_deployment_params`).
    source_run: str | None = Field(
        None, description="A finished thumbnet run folder (required)."
    )
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
    batch_size: int = _run_field("batch_size")
    optimizer: Literal["adamw", "sgd"] = _run_field("optimizer")
    weight_decay: float = _run_field("weight_decay")
    warmup_epochs: float = _run_field("warmup_epochs")
    label_smoothing: float = _run_field("label_smoothing")
    learning_rate: float = _run_field("learning_rate")
    limit_per_class: int | None = _run_field("limit_per_class")
    run_name: str | None = Field(
        None,
        pattern=_NAME_PATTERN,
        max_length=_NAME_MAX,
        description="Run folder name; rerun the same name to resume. Default: "
        "generalize-<source run>-<date>.",
    )
    runs_dir: str = _run_field("runs_dir")
    data_dir: str | None = _run_field("data_dir")
    throughput_batches: int = Field(
        5, ge=1, le=1000, description="Timed batches per model for images/s."
    )
    smoke: bool = _run_field("smoke")

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct, received {seeds}")
        return seeds

    def to_config(self) -> GeneralizeConfig:
        """The frozen `GeneralizeConfig`, with `smoke` applied.

        Raises:
            ConfigError: no `source_run` (optional in the schema only so that
                a deployment run's partial `params` can take the deployment's).
        """
        if not self.source_run:
            raise ConfigError(
                "--source-run is required: a finished run folder made by `thumbnet "
                "train` (runs/<run-name>)."
            )
        values = self.model_dump()
        values["experiments"] = tuple(
            (e["dataset"], e["backbone"]) for e in values["experiments"]
        )
        values["seeds"] = tuple(values["seeds"])
        if self.smoke:
            values.update(GENERALIZE_SMOKE)
        return GeneralizeConfig(**values)
