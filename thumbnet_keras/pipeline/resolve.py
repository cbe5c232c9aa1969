"""`resolve_run`: validate a run's inputs, then claim its folder.

This is the first step of every `thumbnet` run. It reads but never writes
until every check passed, so a bad input fails here with a message that names
the problem, and no other run's outputs are touched:

* unknown dataset (no such manifest) or unknown backbone;
* a factor that does not divide the image size;
* a missing teacher or weights file, a teacher whose input shape or number of
  classes differs from the dataset's;
* an output folder that cannot be written, or a run name that already holds a
  run with different settings.
"""

from __future__ import annotations

import json
import os

from thumbnet_keras.pipeline.config import (
    EXPORT_FORMATS,
    ConfigError,
    RunConfig,
    ThumbNetParams,
    architecture_label,
)
from thumbnet_keras.pipeline.rundir import check_writable, claim, default_run_name

__all__ = ["resolve_run", "dataset_classes", "load_manifest_checked", "run_inputs"]


def generalize_inputs(source, factor: int) -> dict:
    """What a generalize run reads besides its config, hashed: the source
    run's E. A source run replaced or retrained since holds another E, and a
    resumed run pooled seeds of two Es in one row (a trial). `source`: the
    source's `Run`. Here, not in `generalize` (which imports Keras), so the
    command line's preflight checks it before any framework starts (its
    start-up lines were printed before a one-line refusal: a trial)."""
    from thumbnet_keras.deploy.metadata import model_sha256

    path = source.factor_dir(factor) / "downscaler.keras"
    return {"downscaler_sha256": model_sha256(path)}


def run_inputs(config, manifest) -> dict:
    """Content hashes of what a run reads besides its settings, saved in its
    `config.json` and compared when it resumes (`rundir.claim`): the dataset
    manifest, and the teacher's file (a `.keras` file, the shipped teacher,
    an `applications:` weights file) or `backbone_weights` file, and a local
    keras-hub preset folder (`data.index.folder_sha256`), so that a file
    replaced under the same name is not silently mixed with stages trained
    from the old one. (A Kaggle preset name is not hashed: it names one
    published version.)"""
    from thumbnet_keras.data.index import file_sha256, folder_sha256

    inputs = {"manifest_sha256": manifest.content_hash()}
    preset = _hub_folder(config.teacher)
    if preset is not None:
        inputs["teacher_preset_sha256"] = folder_sha256(preset)
    files = {"teacher_sha256": _teacher_file(config.teacher)}
    if config.backbone_weights not in (None, "imagenet"):
        files["backbone_weights_sha256"] = config.backbone_weights
    for key, path in files.items():
        if path is not None and os.path.isfile(path):
            inputs[key] = file_sha256(path)
    return inputs


def _hub_folder(spec: str | None) -> str | None:
    """The local folder of a `keras_hub:<folder>` teacher, else None."""
    from thumbnet_keras.models.teacher_spec import HUB_PREFIX

    if spec is None or not spec.startswith(HUB_PREFIX):
        return None
    folder = spec.removeprefix(HUB_PREFIX)
    return folder if os.path.isdir(folder) else None


def _teacher_file(spec: str | None) -> str | None:
    from thumbnet_keras.models.teacher_spec import APPLICATIONS_PREFIX, HUB_PREFIX

    if spec is None or spec.startswith(HUB_PREFIX):
        return None
    if spec.startswith(APPLICATIONS_PREFIX):
        weights = spec.removeprefix(APPLICATIONS_PREFIX).partition(":")[2]
        return weights or None
    from thumbnet_keras.pretrained import resolve_teacher

    try:
        return resolve_teacher(spec)
    except (ValueError, FileNotFoundError):  # Reported by the teacher check.
        return None


def load_manifest_checked(dataset: str):
    """`data.load_manifest`, raising `ConfigError` naming the dataset."""
    from thumbnet_keras import data

    try:
        return data.load_manifest(dataset)
    except data.ManifestError as err:
        raise ConfigError(f"Unknown or invalid dataset {dataset!r}: {err}") from err


def dataset_classes(manifest) -> int | None:
    """The number of classes a manifest declares, or TFDS's ClassLabel size
    when the builder's metadata is available offline; None if unknown."""
    count = manifest.class_count()
    if count is not None:
        return count
    if manifest.source.type == "tfds":
        try:
            import tensorflow_datasets as tfds

            from thumbnet_keras.data.tfds_source import data_dir

            builder = tfds.builder(
                manifest.source.name, data_dir=data_dir(manifest.source)
            )
            return int(builder.info.features[manifest.source.label_key].num_classes)
        except Exception:  # Metadata unavailable offline: checked after prepare.
            return None
    return None


def check_backbone(name: str) -> None:
    """Raises `ConfigError` for an unknown backbone name."""
    from thumbnet_keras.models.backbones import KNOWN_BACKBONES

    if name not in KNOWN_BACKBONES:
        raise ConfigError(
            f"Unknown backbone {name!r}. Known backbones: {', '.join(KNOWN_BACKBONES)}."
        )


def check_backbone_builds(name: str, image_shape: tuple, options: dict) -> None:
    """Raises `ConfigError` unless the backbone builds with `options` (the
    builder checks their values; `preflight` checked their names and types
    without Keras). Builds it once, on the run's image shape, and drops it."""
    from thumbnet_keras.models import backbones

    try:
        backbones.build(name, image_shape, num_classes=2, **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"Backbone options {json.dumps(options)} (--backbone-options): {err}"
        ) from err


def check_teacher_file(path: str, image_shape: tuple, num_classes: int | None):
    """The teacher `path` (a `.keras` file or a `models.teachers`
    specification), loaded; raises `ConfigError` unless it takes
    `image_shape` and gives `num_classes` logits."""
    from thumbnet_keras.models.teachers import TeacherSpecError, load_teacher
    from thumbnet_keras.models.trainer import check_logits_model, find_feature_layer

    try:
        teacher = load_teacher(path, tuple(image_shape), num_classes)
        check_logits_model(teacher, "teacher")  # Before any stage trains.
    except (TeacherSpecError, ValueError) as err:
        raise ConfigError(str(err)) from err
    shape = tuple(teacher.inputs[0].shape[1:])
    if shape != tuple(image_shape):
        raise ConfigError(
            f"Teacher {path!r} takes {shape} images but the run uses "
            f"{tuple(image_shape)} (image_size x image_size x channels: "
            "--image-size and --channels, `image_size` and `channels` in params)."
        )
    classes = teacher.outputs[0].shape[-1]
    if num_classes is not None and classes != num_classes:
        raise ConfigError(
            f"Teacher {path!r} outputs {classes} classes but the dataset has "
            f"{num_classes}; they must agree."
        )
    try:  # The joint stage reads T's and S's last feature maps.
        find_feature_layer(teacher, None, "teacher")
    except ValueError as err:
        raise ConfigError(
            f"Teacher {path!r}: {err} ThumbNet's student is the teacher's "
            "convolutional network run on thumbnails; give a CNN classifier."
        ) from err
    return teacher


def check_students(teacher, factors) -> None:
    """Raises `ConfigError` unless S derives from `teacher` at every factor
    (`make_student`), before any stage trains: an architecture that does not
    build at a factor's thumbnail size used to fail that factor's first
    stage, after every earlier factor had trained."""
    from thumbnet_keras.models.student import StudentDerivationError, make_student

    for factor in factors:
        try:
            make_student(teacher, factor)
        except StudentDerivationError as err:
            raise ConfigError(
                f"Factor {factor} (--factor): {err.reason} {err.cli_advice}"
            ) from err
        except ValueError as err:
            raise ConfigError(f"Factor {factor} (--factor): {err}") from err


def _check(config: RunConfig, manifest) -> int | None:
    from thumbnet_keras.layers.downscaler import validate_image_shape

    if config.backbone is not None:
        check_backbone(config.backbone)
    config.check_fm_pretrain()
    channels = config.channels or manifest.image.channels
    if channels not in (1, 3):
        raise ConfigError(f"`channels` must be 1 or 3, received {channels}.")
    if len(set(config.factors)) != len(config.factors):
        raise ConfigError(f"`factors` has duplicates: {list(config.factors)}.")
    for factor in config.factors:
        try:
            validate_image_shape(
                (config.image_size, config.image_size, channels), factor
            )
        except ValueError as err:
            raise ConfigError(
                f"Factor {factor} does not fit the image size: {err}"
            ) from err
    for fmt in config.export_formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(
                f"Unknown export format {fmt!r}; choose from {', '.join(EXPORT_FORMATS)}."
            )
    num_classes = dataset_classes(manifest)
    shape = (config.image_size, config.image_size, channels)
    if config.backbone_options and config.teacher is None:  # Unused with a teacher.
        check_backbone_builds(config.backbone, shape, config.backbone_options)
    if config.teacher is not None:
        teacher = check_teacher_file(config.teacher, shape, num_classes)
        check_students(teacher, config.factors)
    if config.backbone_weights not in (None, "imagenet"):
        if not os.path.isfile(config.backbone_weights):
            raise ConfigError(
                f"Backbone weights file not found: {config.backbone_weights!r}."
            )
        if num_classes is not None:  # (Else once prepared: `get_teacher`.)
            build_with_weights(config, shape, num_classes)
    return num_classes


def build_with_weights(config, shape: tuple[int, int, int], num_classes: int):
    """`config.backbone` built with `config.backbone_weights`; `ConfigError`
    when the file does not fit it (it failed inside the teacher stage, three
    tracebacks, after the run had started: a trial)."""
    from thumbnet_keras.models import backbones

    try:
        return backbones.build(
            config.backbone,
            shape,
            num_classes,
            weights=config.backbone_weights,
            **config.backbone_options,
        )
    except ValueError as err:
        raise ConfigError(
            f"--backbone-weights {config.backbone_weights!r}: {err}"
        ) from None


def resolve_run(params: ThumbNetParams | RunConfig | dict) -> dict:
    """Validates a run's inputs and claims `runs/<run-name>/`.

    Args:
        params: `ThumbNetParams` (or its dict form) or a `RunConfig`.

    Returns:
        `{"run_dir", "run_name", "resumed", "config"}`; `config` is the
        resolved `RunConfig` as JSON (also in `<run_dir>/config.json`).

    Raises:
        ConfigError: the message names the problem; nothing was written
            (except creating the empty `runs_dir` when missing).
    """
    if isinstance(params, dict):
        params = ThumbNetParams.model_validate(params)
    config = params.to_config() if isinstance(params, ThumbNetParams) else params
    manifest = load_manifest_checked(config.dataset)
    _check(config, manifest)
    if config.channels is None:
        config = config.model_copy(update={"channels": manifest.image.channels})
    if config.run_name is None:
        run_name = default_run_name(f"{manifest.name}-{architecture_label(config)}")
        config = config.model_copy(update={"run_name": run_name})
    check_writable(config.runs_dir)
    run, resumed = claim(
        config.run_path,
        config.to_json(),
        kind="thumbnet",
        inputs=run_inputs(config, manifest),
    )
    return {
        "run_dir": str(run.path),
        "run_name": run.name,
        "resumed": resumed,
        "config": config.to_json(),
    }
