"""Checks a command's inputs before Prefect, Keras or a backend start.

Everything here reads files and validates parameters with pydantic, numpy
and PyYAML only (no Keras, TensorFlow or Prefect import), so a user error is
reported in well under a second, and nothing is written:

* the parameters (`ThumbNetParams`, `GeneralizeParams`), with the model's
  own messages mapped back to the command line's option names (`--epochs`,
  not `joint_epochs`; `pipeline.options`, which makes the options);
* the dataset manifest and its source (an image folder that is missing or
  holds no image, a Parquet file, the ELPV package);
* the backbone name, the factors against the image size, the export
  formats and their packages;
* the teacher file (a `.keras` archive, its input shape and classes read from
  the archive's `config.json`) and the backbone weights file;
* the output folders (`--runs-dir`, `--data-dir`) and the run folder (a
  different run, another live process holding its lock);
* for `evaluate`, `report`, `export` and `generalize`: a finished run folder,
  and the factor asked for.

Each check raises `ConfigError` with a message that names the problem and
the fix. The flows and `resolve_run` repeat the checks that need Keras (a
teacher is loaded once, there).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import os
import tempfile
import warnings
import zipfile
from functools import cache
from pathlib import Path

from pydantic import BaseModel, ValidationError

from thumbnet_keras.pipeline.config import (
    ConfigError,
    GeneralizeParams,
    ThumbNetParams,
    architecture_label,
    experiment_backbone,
    skipped_stages,
)
from thumbnet_keras.pipeline.options import option_name
from thumbnet_keras.pipeline.resolve import run_inputs
from thumbnet_keras.pipeline.rundir import (
    Run,
    RunLockedError,
    check_claimable,
    default_run_name,
    holder_text,
    lock_holder,
)

__all__ = [
    "check_backbone_options",
    "check_backend",
    "check_export",
    "check_finished_run",
    "check_generalize",
    "check_predict",
    "check_thumbnet",
    "option_name",
    "validate_params",
]

# Packages an export format needs beyond TensorFlow (thumbnet_keras.deploy).
_EXPORT_NEEDS = {"onnx": ("tf2onnx", "onnx")}
# Teacher specifications that are not files (`thumbnet_keras.models.teachers`).
_BUILT_TEACHERS = ("applications:", "keras_hub:")
EXPORT_FIX = (
    'pip install -e ".[export]" (from a clone) or pip install "thumbnet-keras[export]"'
)


def _message(error: dict) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    kind, ctx = error["type"], error.get("ctx", {})
    if field == "run_name" and kind == "string_pattern_mismatch":
        return (
            "a run name is a folder name: letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (no '/')"
        )
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "extra_forbidden":
        return "unknown parameter"
    if kind == "string_too_long":
        return f"at most {ctx.get('max_length')} characters"
    if kind == "value_error":  # A validator's own message, without pydantic's prefix.
        return str(ctx.get("error") or error["msg"].removeprefix("Value error, "))
    bounds = {
        "greater_than_equal": ">=",
        "greater_than": ">",
        "less_than_equal": "<=",
        "less_than": "<",
    }
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    msg = error["msg"]
    return msg[0].lower() + msg[1:]


def _shown(value) -> str:
    """A given value as a message quotes it (a long one shortened)."""
    text = repr(value)
    if len(text) <= 60:
        return text
    size = f", {len(value)} characters" if isinstance(value, str) else ""
    return f"{text[:40]}...{text[-10:]} ({type(value).__name__}{size})"


def validate_params(model: type[BaseModel], values: dict) -> BaseModel:
    """`model.model_validate(values)`, as `ConfigError` naming the options."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        problems = []
        for error in err.errors():
            field = str(error["loc"][0]) if error["loc"] else "parameters"
            given = error.get("input")
            shown = "" if isinstance(given, dict) else f" {_shown(given)}"
            if len(error["loc"]) > 1 and field in values:  # An item of a list.
                shown = f" {_shown(values[field])}"
            problems.append(f"{option_name(field)}{shown}: {_message(error)}")
        raise ConfigError("; ".join(problems) + ".") from None


def _check_manifest(dataset: str, option: str = "--dataset"):
    from thumbnet_keras.pipeline.resolve import load_manifest_checked

    try:
        return load_manifest_checked(dataset)
    except ConfigError as err:
        if "no manifest named" not in str(err):
            raise
        names = (
            "the name of a YAML file in data_manifests/ (e.g. elpv, "
            "fashion_mnist) or a manifest's path"
        )
        what = names if option == "--dataset" else f"DATASET:BACKBONE, DATASET {names}"
        hint = ""
        if option == "--experiment" and dataset in known_backbones():
            hint = f" For the source run's dataset with {dataset}: --experiment :{dataset}."
        raise ConfigError(f"{err}. {option} takes {what}.{hint}") from None


def _has_image(folder: Path, extensions: tuple[str, ...]) -> bool:
    """Whether `folder` holds an image file at any depth (hidden ones aside,
    as `data.sources` skips them); stops at the first."""
    for _, folders, files in os.walk(folder):
        folders[:] = [d for d in folders if not d.startswith(".")]
        if any(f.lower().endswith(extensions) and f[0] != "." for f in files):
            return True
    return False


def _check_image_folder(manifest, root: Path, name: str) -> None:
    """An image folder holds images, its split folders exist, and each class
    the manifest declares has a folder with an image (preparing would fail
    on any of them, after Prefect and TensorFlow started)."""
    source = manifest.source
    extensions = tuple(e.lower() for e in source.extensions)
    if not _has_image(root, extensions):
        raise ConfigError(
            f"{name}: image folder {str(root)!r} holds no image "
            f"({', '.join(extensions)}); expected <root>/<class_name>/<image>."
        )
    folders = [root] if source.split_dirs is None else []
    for split, folder in (source.split_dirs or {}).items():
        folders.append(root / folder)
        if not folders[-1].is_dir():
            raise ConfigError(
                f"{name}: split folder {str(folders[-1])!r} ({split}) not found. "
                "Fix `source.split_dirs` in the manifest."
            )
    if not manifest.classes:  # The class folders are the classes.
        found = sorted(
            {
                d.name
                for folder in folders
                for d in folder.iterdir()
                if d.is_dir() and d.name[0] != "." and _has_image(d, extensions)
            }
        )
        if len(found) < 2:
            raise ConfigError(
                f"{name}: a classifier needs at least 2 classes; image folder "
                f"{str(root)!r} has {len(found)} class folder(s) with images "
                f"({', '.join(map(repr, found)) or 'none'}). Expected one "
                "sub-folder per class: <root>/<class_name>/<image>."
            )
    missing = [
        c
        for c in manifest.classes or ()
        if not any(_has_image(folder / c, extensions) for folder in folders)
    ]
    if missing:
        shown = ", ".join(map(repr, missing[:10]))
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ConfigError(
            f"{name}: no image for class {shown}{more}; each class in the "
            "manifest's `classes` needs a folder <root>/<class_name> holding its "
            "images. Fix the class names or the folders."
            + _unicode_twins(missing, folders)
        )


def _unicode_twins(missing: list[str], folders: list[Path]) -> str:
    """What to add when a missing class has a folder that looks the same but
    is spelled with other code points (macOS writes names decomposed, NFD:
    'ü' as 'u' + a combining mark; a YAML file typed by hand has 'ü'): the
    message said "no image for class 'dreieck_ü'" beside such a folder (a
    trial)."""
    import unicodedata

    def nfc(text: str) -> str:
        return unicodedata.normalize("NFC", text)

    names = {d.name for f in folders if f.is_dir() for d in f.iterdir() if d.is_dir()}
    twins = [
        (c, d) for c in missing for d in sorted(names) if d != c and nfc(d) == nfc(c)
    ]
    if not twins:
        return ""
    said = "; ".join(f"{c!r} is {ascii(c)}, the folder {ascii(d)}" for c, d in twins)
    return (
        " A folder looks the same but is spelled with other Unicode code "
        f"points ({said}): write the class as the folder spells it, or rename "
        "the folder."
    )


def _check_source(manifest) -> None:
    """The data a manifest points at is there (cheap: no image is decoded)."""
    source = manifest.source
    name = f"Dataset {manifest.name!r} ({manifest.path})"
    if source.type == "image_folder":
        root = Path(source.root).expanduser()
        if not root.is_dir():
            where = ""
            if not root.is_absolute():  # Read from the working folder.
                where = (
                    f" (a relative root is read from the folder thumbnet runs "
                    f"in, not the manifest's: here {str(root.absolute())!r})"
                )
            found = "is a file, not a folder" if root.is_file() else "not found"
            raise ConfigError(
                f"{name}: image folder {str(root)!r} {found}{where}. Fix "
                "`source.root` in the manifest (an absolute path reads the same "
                "from anywhere), or put the class folders there."
            )
        _check_image_folder(manifest, root, name)
    if source.type == "parquet" and not Path(source.path).expanduser().is_file():
        raise ConfigError(f"{name}: Parquet file {source.path!r} not found.")
    base = getattr(source, "base_dir", None)
    if (
        source.type == "parquet"
        and base
        and not Path(base).expanduser().is_dir()
        and _parquet_holds_paths(source)
    ):
        # Every path row would be quarantined `missing`, and prepare would
        # stop at an empty split without naming the folder (a trial).
        found = (
            "is a file, not a folder"
            if Path(base).expanduser().is_file()
            else "not found"
        )
        raise ConfigError(
            f"{name}: base_dir {base!r} {found}; the table's relative image "
            "paths are read from it. Fix `source.base_dir` (or leave it out: "
            "paths are then relative to the table's folder)."
        )
    if source.type == "elpv" and importlib.util.find_spec("elpv_dataset") is None:
        raise ConfigError(
            f"{name} needs the elpv-dataset package: pip install elpv-dataset."
        )
    if source.type == "tfds":
        _check_tfds(source, name)
    if source.type == "fashion_mnist" and not Path(source.directory).is_dir():
        raise ConfigError(
            f"{name}: folder {source.directory!r} not found (Debian: "
            "apt-get install dataset-fashion-mnist)."
        )


def _parquet_holds_paths(source) -> bool:
    """Whether the table's image column can hold file paths (strings, or a
    struct's `path`), which `base_dir` is for; a bytes column never reads it."""
    import pyarrow.parquet as pq

    from thumbnet_keras.data.sources import _arrow_kind

    if source.image_kind == "bytes":
        return False
    try:
        column = pq.read_schema(Path(source.path).expanduser()).field(
            source.image_column
        )
    except Exception:  # noqa: BLE001 - prepare names an unreadable table or column
        return False
    # A Hugging Face struct<bytes, path> reads `path` where a row has no bytes.
    return _arrow_kind(column.type) in ("string", "struct")


def _check_tfds(source, name: str) -> None:
    """A TFDS dataset is prepared (a `dataset_info.json` under its folder), or
    can be built here: its manual files are in place, or download is on."""
    from thumbnet_keras.data.tfds_source import _missing_message, data_dir, manual_dir

    if source.download:
        return
    folder = Path(data_dir(source)) / source.name.split("/")[0].split(":")[0]
    if folder.is_dir() and next(folder.rglob("dataset_info.json"), None):
        return
    manual = Path(manual_dir(source))
    if source.manual_files and all((manual / f).is_file() for f in source.manual_files):
        return
    raise ConfigError(f"{name}: {_missing_message(source, 'no prepared data found')}")


@cache
def _module_constant(module: str, name: str):
    """A literal constant of a thumbnet_keras module, read from its source
    without importing it (those modules import Keras)."""
    path = Path(__file__).resolve().parents[1].joinpath(*module.split(".")[1:])
    tree = ast.parse(path.with_suffix(".py").read_text())
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", [None])[0])
        if isinstance(target, ast.Name) and target.id == name:
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not found in {module}")  # pragma: no cover


def known_backbones() -> tuple[str, ...]:
    return _module_constant("thumbnet_keras.models.backbones", "KNOWN_BACKBONES")


def stages() -> tuple[str, ...]:
    return _module_constant("thumbnet_keras.pipeline.stages", "STAGES")


def _check_backbone(name: str, option: str = "--backbone") -> None:
    if name not in known_backbones():
        raise ConfigError(
            f"{option} {name!r}: unknown backbone; choose from "
            f"{', '.join(known_backbones())}."
        )


def _check_architecture(config) -> None:
    """`backbone` names a known architecture and its options fit it; with a
    teacher, the backbone fields only name the teacher's architecture, so
    weights for it and options without a name are refused."""
    if config.backbone is not None:
        _check_backbone(config.backbone)
        check_backbone_options(config.backbone, config.backbone_options)
    if config.teacher is None:
        return
    if config.backbone_weights is not None:
        raise ConfigError(
            f"--backbone-weights {config.backbone_weights!r} with --teacher "
            f"{config.teacher!r}: the teacher is already trained, so the "
            "weights would be unused. Drop one of them."
        )
    if config.backbone is None and config.backbone_options:
        raise ConfigError(
            f"--backbone-options with --teacher {config.teacher!r} and no "
            "--backbone: they name no architecture. Name the teacher's with "
            "--backbone (generalize builds a fresh S of it), or drop them."
        )


def check_export_packages(fmt: str) -> None:
    """Raises `ConfigError` when `fmt` needs packages that are not installed."""
    missing = [m for m in _EXPORT_NEEDS.get(fmt, ()) if not importlib.util.find_spec(m)]
    if missing:
        raise ConfigError(
            f"Exporting as {fmt} needs {', '.join(missing)}, not installed: "
            f"{EXPORT_FIX}."
        )


def _archive_ends(path: str, option: str) -> tuple[list, list, dict]:
    """The configs of a `.keras` archive's input and output layers, read
    from its `config.json` (an entry is None where a reference does not
    resolve), and every layer's config by name. Raises `ConfigError` if it
    is not an archive."""
    if not zipfile.is_zipfile(path):
        raise ConfigError(
            f"{option} {path!r} is not a Keras archive (a .keras file is a zip holding "
            "config.json and the weights); give a model saved with model.save(...)."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
            names = set(archive.namelist())
    except (KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(
            f"{option} {path!r} is not a Keras archive (no readable config.json: "
            f"{err})."
        ) from None
    if not names & {"model.weights.h5", "model.weights.npz"}:  # What Keras reads.
        raise ConfigError(
            f"{option} {path!r} holds a model's config.json but no weights "
            "(model.weights.h5); give a model saved whole with model.save(...)."
        )
    layers = {
        layer.get("name") or layer.get("config", {}).get("name"): layer
        for layer in config.get("config", {}).get("layers", [])
        if isinstance(layer, dict)
    }

    def _named(key):
        refs = config.get("config", {}).get(key) or []
        if refs and isinstance(refs[0], str):  # One tensor: [name, 0, 0].
            refs = [refs]
        return [layers.get(r[0]) for r in refs if isinstance(r, list) and r]

    return _named("input_layers"), _named("output_layers"), layers


# Layers that keep the class axis as it is, between the layer that makes the
# logits and the model's output (MobileNetV3: 1x1 Conv2D -> Flatten -> Activation).
_PASS_THROUGH = {"Activation", "Flatten", "Reshape", "Dropout", "Identity"}


def _inbound(layer: dict) -> str | None:
    """The name of the layer feeding `layer` (its first input), from the
    archive's config; None when it does not say it plainly."""
    try:
        return layer["inbound_nodes"][0]["args"][0]["config"]["keras_history"][0]
    except (KeyError, IndexError, TypeError):
        return None


def _logit_count(layer: dict | None, layers: dict) -> int | None:
    """How many logits `layer` outputs: a `Dense` layer's units or a 1x1
    `Conv2D`'s filters, reached back through pass-through layers."""
    for _ in range(8):
        if not layer:
            return None
        kind, config = layer.get("class_name"), layer.get("config", {})
        if kind == "Dense":
            return config.get("units")
        if kind == "Conv2D" and config.get("kernel_size") in ([1, 1], (1, 1)):
            return config.get("filters")
        if kind not in _PASS_THROUGH:
            return None
        layer = layers.get(_inbound(layer))
    return None


def keras_archive_shape(
    path: str, option: str = "--teacher"
) -> tuple[tuple | None, int | None]:
    """(input shape without the batch axis, number of outputs) read from a
    `.keras` archive's `config.json`; either is None when the model's config
    does not say it plainly. Raises `ConfigError` if it is not an archive."""
    inputs, outputs, layers = _archive_ends(path, option)
    shape = classes = None
    if len(inputs) == 1 and inputs[0] and inputs[0].get("class_name") == "InputLayer":
        batch_shape = inputs[0]["config"].get("batch_shape")
        if batch_shape:
            shape = tuple(batch_shape[1:])
    if len(outputs) == 1:
        classes = _logit_count(outputs[0], layers)
    return shape, classes


def keras_archive_output_activation(path: str, option: str = "--teacher") -> str | None:
    """The activation the archive's one output layer ends in ("softmax" for
    a `Softmax` layer or a final `keras.ops.softmax`, "sigmoid" for
    `keras.ops.sigmoid`, a `Dense` or `Activation` layer's named
    activation), or None when its config does not say it plainly."""
    _, outputs, _ = _archive_ends(path, option)
    if len(outputs) != 1 or not outputs[0]:
        return None
    layer = outputs[0]
    if layer.get("class_name") in ("Softmax", "Sigmoid"):
        return layer["class_name"].lower()
    activation = layer.get("config", {}).get("activation")
    return activation if isinstance(activation, str) else None


def _check_applications_teacher(
    spec: str, shape: tuple, num_classes: int | None
) -> None:
    """`applications:<Name>[:imagenet|none|<weights file>]`, by the rules
    `models.teachers` builds it with (`models.teacher_spec`, no Keras)."""
    from thumbnet_keras.models.teacher_spec import (
        TeacherSpecError,
        check_applications_spec,
    )

    try:
        check_applications_spec(spec, shape[-1], num_classes, "add --channels 3")
    except TeacherSpecError as err:
        raise ConfigError(f"--teacher {str(err).removeprefix('Teacher ')}") from None


@cache
def _builder_options() -> dict[str, dict[str, object] | None]:
    """`{backbone: {option: default}}`: the keyword options of each builder
    in `models.backbones._BUILDERS`, read from its source (no Keras import);
    a default that is not a literal is `...`; None for a builder that takes
    any keyword (`**kwargs`)."""
    path = Path(__file__).resolve().parents[1] / "models" / "backbones.py"
    tree = ast.parse(path.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    builders = {}
    for node in tree.body:
        target = getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id == "_BUILDERS":
            builders = {
                k.value: v.id for k, v in zip(node.value.keys, node.value.values)
            }
    options = {}
    for backbone, function in builders.items():
        args = functions[function].args
        if args.kwarg is not None:
            options[backbone] = None
            continue
        defaults = [None] * (len(args.args) - len(args.defaults)) + args.defaults
        found = {}
        for arg, default in zip(args.args[3:], defaults[3:]):  # After the shape,
            if arg.arg == "weights":  # classes and name; weights is its own option.
                continue
            try:
                found[arg.arg] = ast.literal_eval(default)
            except ValueError:  # A module constant, e.g. BN_MOMENTUM.
                found[arg.arg] = ...
        options[backbone] = found
    return options


def _kind_of(default) -> tuple[str, object] | None:
    """(what an option takes, a check) from its default; None: unknown."""
    number = (int, float)
    if isinstance(default, bool):
        return "true or false", lambda v: isinstance(v, bool)
    if isinstance(default, int):
        return "an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)
    if isinstance(default, float):
        return "a number", lambda v: isinstance(v, number) and not isinstance(v, bool)
    if isinstance(default, str):
        return "a string", lambda v: isinstance(v, str)
    if isinstance(default, (tuple, list)) and default:
        item = _kind_of(default[0])
        if item is None:
            return None
        text, check = item
        return (
            f"a list of {text.removeprefix('an ').removeprefix('a ')}s, e.g. "
            f"{json.dumps(list(default))}",
            lambda v: isinstance(v, list) and all(map(check, v)),
        )
    return None


def check_backbone_options(
    backbone: str, options: dict, option: str = "--backbone-options"
) -> None:
    """The options' names, and the type of each value, are those the
    backbone's builder takes (its own checks of the values run when it is
    built)."""
    if not options:
        return
    takes = _builder_options().get(backbone, {})
    if takes is None:
        return
    unknown = [k for k in options if k not in takes]
    if unknown:
        accepted = f"its options: {', '.join(takes)}" if takes else "it takes none"
        raise ConfigError(
            f"{option}: {backbone} has no option {', '.join(map(repr, unknown))}; "
            f"{accepted}."
        )
    choices = _module_constant("thumbnet_keras.models.backbones", "OPTION_CHOICES")
    for name, value in options.items():
        kind = _kind_of(takes[name])
        if kind is not None and not kind[1](value):
            raise ConfigError(
                f"{option}: {backbone}'s {name!r} takes {kind[0]}; "
                f"received {json.dumps(value)}."
            )
        allowed = choices.get(backbone, {}).get(name)
        if allowed is not None and value not in allowed:
            raise ConfigError(
                f"{option}: {backbone}'s {name!r} is one of "
                f"{', '.join(map(json.dumps, allowed))}; received {json.dumps(value)}."
            )


def _check_teacher(path: str, shape: tuple, manifest) -> None:
    num_classes = manifest.class_count()
    from thumbnet_keras.pretrained import resolve_teacher

    if path.startswith("applications:"):
        _check_applications_teacher(path, shape, num_classes)
        return
    if path.startswith(_BUILT_TEACHERS):  # A keras_hub preset: checked in resolve_run.
        return
    try:
        path = resolve_teacher(path)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"--teacher: {err}") from None
    if os.path.isdir(path):
        raise ConfigError(
            f"--teacher {path!r} is a folder; give a .keras file (or "
            "pretrained:elpv, applications:<Name>, keras_hub:<preset>)."
        )
    if not os.path.isfile(path):
        raise ConfigError(f"--teacher {path!r}: file not found.")
    teacher_shape, classes = keras_archive_shape(path)
    if (
        teacher_shape is not None
        and None not in teacher_shape[:2]
        and (teacher_shape[0] != teacher_shape[1])
    ):
        side = max(teacher_shape[:2])
        raise ConfigError(
            f"--teacher {path!r} takes {teacher_shape[0]}x{teacher_shape[1]} "
            "images, which are not square; a run's images are (--image-size "
            "sets both sides). Rebuild the teacher with a square input (e.g. "
            f"{side}x{side}; a convolutional network's weights carry over) and "
            "save it again."
        )
    if teacher_shape is not None and teacher_shape[:2] == (None, None):
        # Any size: rebuilt at the run's when loaded (`teachers.at_run_size`).
        teacher_shape = (*shape[:2], *teacher_shape[2:])
    if teacher_shape is not None and teacher_shape != tuple(shape):
        fixes = []
        if tuple(teacher_shape[:2]) != tuple(shape[:2]):
            fixes.append(f"--image-size {teacher_shape[0]}")
        if teacher_shape[2:] != tuple(shape[2:]) and teacher_shape[2:]:
            fixes.append(f"--channels {teacher_shape[2]}")
        raise ConfigError(
            f"--teacher {path!r} takes {teacher_shape} images but the run uses "
            f"{tuple(shape)} (--image-size x --image-size x channels); set "
            f"{' and '.join(fixes) or '--image-size'}."
        )
    activation = keras_archive_output_activation(path)
    if activation in ("softmax", "sigmoid"):
        raise ConfigError(
            f"--teacher {path!r} ends in a {activation} activation, so it outputs "
            "probabilities, not logits. Rebuild it with "
            "`classifier_activation=None` (keras.applications), `activation=None` "
            f"on its last layer, or without its final {activation} layer "
            "(`Softmax`, `Activation`) and save it again; the weights are "
            "unchanged."
        )
    if None not in (classes, num_classes) and classes != num_classes:
        raise ConfigError(
            f"--teacher {path!r} outputs {classes} classes but the dataset has "
            f"{num_classes}{_class_list(manifest)}; they must agree."
        )


def _class_list(manifest) -> str:
    """` (a, b, c: class folders holding an image file)` for a message: the
    classes the count came from, so a stray or broken folder shows."""
    names = manifest.classes
    where = ""
    if not names and manifest.source.type == "image_folder":
        names = manifest.source.class_folders()
        where = ": class folders holding an image file, not yet decoded"
    if not names:
        return ""
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f" ({shown}{where})"


def _check_imagenet_weights(backbone: str, channels: int, classes: int | None) -> None:
    """`--backbone-weights imagenet`: Keras has them for this backbone, and
    they fit the run (RGB images, ImageNet's 1000 classes)."""
    known = _module_constant("thumbnet_keras.models.backbones", "_IMAGENET_BACKBONES")
    fix = "give a weights file, or leave --backbone-weights out to train the teacher"
    if backbone not in known:
        raise ConfigError(
            f"--backbone-weights imagenet: Keras has no ImageNet weights for "
            f"--backbone {backbone} (it has them for {', '.join(known)}); {fix}."
        )
    if channels != 3:
        raise ConfigError(
            f"--backbone-weights imagenet takes RGB images but the run's have "
            f"{channels} channel(s); add --channels 3."
        )
    if classes not in (None, 1000):
        raise ConfigError(
            f"--backbone-weights imagenet gives ImageNet's 1000 classes but the "
            f"dataset has {classes}; {fix}."
        )


def _check_writable(path: str, option: str) -> None:
    """`path` (made later if missing) can be created and written; creates
    nothing."""
    target = Path(path).expanduser().absolute()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"{option} {path!r} cannot be created: {str(probe)!r} is a file, "
            "not a folder. Choose another location."
        )
    try:  # A file made and removed at once (os.access misses a read-only
        # file system, an immutable folder, /proc, and root's permissions).
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".thumbnet-write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{option} {path!r} is not writable ({str(probe)!r} does not accept "
            f"new files: {err.strerror or err}). Choose another location, or fix "
            "its permissions."
        ) from None


def _check_outside_runs(path: str, option: str) -> None:
    """--data-dir or --runs-dir is not inside a run folder (a folder with a
    run's config.json): prepared data or a new run written there mixed with
    that run's outputs (a platform trial wrote an index into a finished run;
    a Prefect trial, `runs_dir: runs/s1/stages`, a whole run)."""
    from thumbnet_keras.pipeline.rundir import holds_run

    folder = Path(path).expanduser().absolute()
    what = {
        "--data-dir": "prepared data would be written among that run's outputs. "
        "Choose a folder outside any run (the default is <runs-dir>/_data).",
        "--runs-dir": "a new run would be written among that run's outputs. "
        "Choose a runs folder outside any run (the default is ./runs).",
    }[option]
    for candidate in (folder, *folder.parents):
        if holds_run(candidate):
            raise ConfigError(
                f"{option} {path!r} is inside the run folder {str(candidate)!r}: "
                + what
            )


def _check_one_process() -> None:
    """A run (`thumbnet`, `generalize`) trains in one process: started as
    several (`KERAS_DISTRIBUTION_NUM_PROCESSES`), each process ran every step
    and wrote the run folder, and Keras refused the pipeline's datasets (a
    trial: "The batch size of the input dataset is unknown", a traceback in
    every process)."""
    processes = os.environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", "").strip()
    if processes not in ("", "0", "1"):
        raise ConfigError(
            f"KERAS_DISTRIBUTION_NUM_PROCESSES={processes}: a thumbnet run "
            "trains in one process (several devices of one machine: "
            "--distribution data_parallel). For several processes or machines, "
            "train with the library as docs/flows.md, 'Several machines', "
            "shows, or unset it."
        )


def _check_distribution(
    distribution: str, sync_batchnorm: bool = False, batch_size: int | None = None
) -> None:
    """data_parallel on a backend that has it (`compute.distribution_scope`),
    refused here before any data is prepared; so is --sync-batchnorm without
    it (it was accepted and recorded, and did nothing), a multi-process
    run (`KERAS_DISTRIBUTION_NUM_PROCESSES`), which the run steps do not
    support, and on JAX a `batch_size` that does not split over the local
    devices (`compute.check_batch_size`; found after data preparation
    before). Only that last check imports a framework (JAX, to count them)."""
    from thumbnet_keras.pipeline.environment import planned_backend

    _check_one_process()
    if sync_batchnorm and distribution != "data_parallel":
        raise ConfigError(
            "--sync-batchnorm synchronizes BatchNorm statistics across the "
            "replicas of --distribution data_parallel; this run has none "
            f"(--distribution {distribution}). Add --distribution data_parallel, "
            "or leave --sync-batchnorm out."
        )
    backend = planned_backend()
    if distribution == "data_parallel" and backend not in ("jax", "tensorflow"):
        raise ConfigError(
            f"--distribution data_parallel needs the jax or tensorflow backend "
            f"(KERAS_BACKEND); this process runs {backend!r}."
        )
    if distribution == "data_parallel" and backend == "jax" and batch_size:
        from thumbnet_keras.pipeline.compute import check_batch_size, local_devices

        check_batch_size(batch_size, len(local_devices()))


def _warn_torch_jit(jit_compile: str) -> None:
    """jit_compile "on" under torch is `torch.compile`: it runs, many times
    slower on a CPU (docs/design.md, "XLA")."""
    from thumbnet_keras.pipeline.environment import planned_backend

    if jit_compile == "on" and planned_backend() == "torch":
        warnings.warn(
            "--jit-compile on under the torch backend means torch.compile, "
            "which recompiles for every new input shape: a one-epoch CPU run "
            "took 9x as long as eager. Leave it at auto (eager on torch), or "
            "use KERAS_BACKEND=jax for XLA.",
            UserWarning,
            stacklevel=2,
        )


def check_thumbnet(values: dict) -> ThumbNetParams:
    """Every check of a `thumbnet` run that needs no framework.

    Returns:
        The validated `ThumbNetParams`, with `run_name` resolved (the dated
        default when none was given), so the run's folder is known.
    """
    params = validate_params(ThumbNetParams, values)
    config = params.to_config()
    manifest = _check_manifest(config.dataset)
    _check_architecture(config)
    channels = config.channels or manifest.image.channels
    if channels not in (1, 3):
        raise ConfigError(f"--channels must be 1 or 3, received {channels}.")
    config.check_fm_pretrain(option_name)
    _check_distribution(config.distribution, config.sync_batchnorm, config.batch_size)
    _warn_torch_jit(config.jit_compile)
    if len(set(config.factors)) != len(config.factors):
        raise ConfigError(f"--factor given twice: {list(config.factors)}.")
    for factor in config.factors:
        if factor < 2:
            raise ConfigError(
                f"--factor {factor}: a factor is an integer >= 2 (the thumbnail "
                "is 1/factor of the image's side)."
            )
        if config.image_size % factor:
            raise ConfigError(
                f"--factor {factor} does not fit --image-size {config.image_size}: "
                "a factor is an integer >= 2 that divides the image size "
                f"(the thumbnail would be {config.image_size / factor:g} pixels)."
            )
    for fmt in config.export_formats:  # Their names were checked by the model.
        check_export_packages(fmt)
    if config.teacher is not None:
        _check_teacher(
            config.teacher,
            (config.image_size, config.image_size, channels),
            manifest,
        )
    weights = config.backbone_weights
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise ConfigError(f"--backbone-weights {weights!r}: file not found.")
    if weights == "imagenet" and config.teacher is None:
        _check_imagenet_weights(config.backbone, channels, manifest.class_count())
    _check_writable(config.runs_dir, "--runs-dir")
    _check_outside_runs(config.runs_dir, "--runs-dir")
    if config.data_dir:
        _check_writable(config.data_dir, "--data-dir")
        _check_outside_runs(config.data_dir, "--data-dir")
    from thumbnet_keras.pipeline.datasets import is_prepared

    if not is_prepared(
        config.dataset, config.resolved_data_dir, config.limit_per_class
    ):
        _check_source(manifest)
    run_name = config.run_name or default_run_name(
        f"{manifest.name}-{architecture_label(config)}"
    )
    resolved = config.model_copy(update={"channels": channels, "run_name": run_name})
    check_claimable(
        resolved.run_path,
        resolved.to_json(),
        kind="thumbnet",
        inputs=run_inputs(resolved, manifest),
    )
    return params.model_copy(update={"run_name": run_name})


def _run_config(
    run_dir: str, kind: str = "thumbnet", option: str = "--run"
) -> tuple[Run, dict]:
    run = Run(run_dir)
    if not run.path.is_dir():
        raise ConfigError(
            f"{option} {run_dir!r}: no such folder. Give a run folder made by "
            "`thumbnet train` (runs/<run-name>)."
        )
    try:
        saved = run.config()
    except (OSError, ValueError):
        raise ConfigError(
            f"{option} {run_dir!r} is not a thumbnet run folder (no readable "
            "config.json). Give a run folder made by `thumbnet train`."
        ) from None
    if saved.get("kind") != kind:
        raise ConfigError(
            f"{option} {run_dir!r} holds a {saved.get('kind')!r} run, not a "
            f"{kind!r} run."
        )
    holder = lock_holder(run.path)
    if holder is not None:  # Not "unfinished": another process works in it.
        raise RunLockedError(
            f"{option} {run_dir!r} is in use by another thumbnet process "
            f"({holder_text(holder)}). Wait for it to finish, then rerun this command."
        )
    return run, saved["config"]


def check_finished_run(run_dir: str, exported: bool = False) -> Run:
    """A `thumbnet` run folder whose every stage finished (`evaluate`), and
    with `exported` also its export step (`report`: a report of a run
    stopped before export wrote a metrics.json that listed no thumbnet.keras
    and exited 0, as if the run had finished)."""
    run, config = _run_config(run_dir)
    # A stage a run does not have (fm_epochs 0, the default) writes no record.
    skip = skipped_stages(config)
    kept = [s for s in stages() if s not in skip]
    wanted = ["teacher"] + [f"f{f}-{s}" for f in config["factors"] for s in kept]
    missing = [sid for sid in wanted if not run.is_done(sid)]
    if missing or not run.data_json.is_file():
        raise ConfigError(
            f"--run {run_dir!r} is unfinished ({len(wanted) - len(missing)} of "
            f"{len(wanted)} stages done; next: {missing[0] if missing else 'data'}). "
            + _finish_advice(run)
        )
    if exported and not _health_failed(run):  # a failed run exports nothing
        gone = [
            n for n in ("thumbnet.keras", "export.json") if not run.file(n).is_file()
        ]
        if gone:
            raise ConfigError(
                f"--run {run_dir!r} is unfinished: every stage trained, but its "
                f"export step did not finish (no {' and no '.join(gone)}). "
                + _finish_advice(run)
            )
    return run


def _health_failed(run: Run) -> bool:
    """Whether the run's health step failed it (`health.json`): the flow
    then writes the report and exports nothing, by design."""
    try:
        return json.loads(run.file("health.json").read_text()).get("status") == "failed"
    except (OSError, ValueError, AttributeError):
        return False


def _finish_advice(run: Run) -> str:
    """How to finish an unfinished run: rerun it, unless its teacher failed
    its health checks, where a rerun stops at the same place."""
    try:
        record = json.loads(run.file("stages/teacher.json").read_text())
    except (OSError, ValueError):
        record = {}
    if (record.get("health") or {}).get("status") == "failed":
        fix = (
            "Train it with a lower --teacher-learning-rate or more --teacher-epochs"
            if record.get("source") == "trained"
            else "Fix the teacher or the manifest's `normalization`"
        )
        return (
            "It stopped at its teacher, which failed its health checks "
            f"({str(run.file('stages/teacher.json'))}: 'health'); a rerun stops "
            f"there again. {fix} and start a new run (another --run-name)."
        )
    return (
        "Rerun the `thumbnet train` command that started it (same options) to "
        "finish it."
    )


def check_export(
    run_dir: str, factor: int | None, fmt: str, output: str | None = None
) -> str:
    """The `.keras` file `thumbnet export` converts; checks the packages and
    the output path (`--output`: its name ends as the format's files do, and
    its folder can be written)."""
    run, config = _run_config(run_dir)
    factors = config["factors"]
    if factor is not None and factor not in factors:
        raise ConfigError(
            f"--factor {factor}: run {run_dir!r} has factors "
            f"{', '.join(map(str, factors))}; choose one of them."
        )
    source = run.factor_dir(factor) / "thumbnet.keras" if factor else None
    source = source or run.file("thumbnet.keras")
    if not source.is_file():
        raise ConfigError(
            f"{source} not found: run {run_dir!r} is unfinished. " + _finish_advice(run)
        )
    check_export_packages(fmt)
    if output is not None:
        _check_export_output(output, fmt, str(source))
    else:  # beside the model: an earlier export there is replaced
        from thumbnet_keras.deploy import default_output

        _check_replaceable(default_output(str(source), fmt), fmt, str(source))
    return str(source)


# format -> how its file or folder name ends (`deploy.export.FORMATS`).
_EXPORT_ENDINGS = {
    "saved_model": "",
    "onnx": ".onnx",
    "litert": ".tflite",
    "litert_int8": ".tflite",
}


def _check_export_output(output: str, fmt: str, keras_path: str) -> None:
    """`--output` is named as `fmt`'s files are (`thumbnet predict` picks
    the runtime by the suffix), its folder can be written, and writing it
    destroys nothing but an earlier export (`deploy.convert.check_output`)."""
    ending = _EXPORT_ENDINGS[fmt]
    suffix = Path(output).suffix.lower()
    if ending and not output.lower().endswith(ending):
        raise ConfigError(
            f"--output {output!r}: {'an' if fmt[0] in 'aeiou' else 'a'} {fmt} "
            f"export is a {ending} file (`thumbnet "
            f"predict` reads a model by its suffix); end the name in {ending}, "
            "or leave --output out (beside thumbnet.keras)."
        )
    if not ending and suffix in (".onnx", ".tflite", ".keras", ".h5"):
        raise ConfigError(
            f"--output {output!r}: a saved_model export is a folder; give a "
            f"name without the {suffix} suffix, or leave --output out."
        )
    _check_writable(str(Path(output).parent), "--output's folder")
    _check_replaceable(output, fmt, keras_path, option="--output ")


def _check_replaceable(
    output: str, fmt: str, keras_path: str, option: str = ""
) -> None:
    """`deploy.convert.check_output` as a `ConfigError`."""
    from thumbnet_keras.deploy.convert import check_output

    try:
        check_output(output, fmt, keras_path)
    except ValueError as err:
        raise ConfigError(f"{option}{err}") from None


def check_generalize(values: dict) -> GeneralizeParams:
    """Every check of a `generalize` run that needs no framework; returns the
    validated `GeneralizeParams` with `run_name` resolved."""
    params = validate_params(GeneralizeParams, values)
    _check_one_process()
    config = params.to_config()  # Refuses a missing source_run.
    run, saved = _run_config(config.source_run, option="--source-run")
    if config.factor not in saved["factors"]:
        raise ConfigError(
            f"--factor {config.factor}: source run {config.source_run!r} has factors "
            f"{', '.join(map(str, saved['factors']))}; choose one of them."
        )
    if not (run.factor_dir(config.factor) / "downscaler.keras").is_file():
        raise ConfigError(
            f"--source-run {config.source_run!r} is unfinished (no "
            f"f{config.factor}/downscaler.keras). Rerun its `thumbnet train` "
            "command to finish it."
        )
    from thumbnet_keras.pipeline.datasets import is_prepared

    data_dir = config.data_dir or os.path.join(config.runs_dir, "_data")
    for dataset, backbone in config.experiments:
        name = dataset or saved["dataset"]
        manifest = _check_manifest(name, "--experiment")
        # The data is there, as `thumbnet train` checks it: a missing root
        # was found ~11 s in, after Prefect and TensorFlow started (a trial).
        if not is_prepared(name, data_dir, config.limit_per_class):
            _check_source(manifest)
        if backbone:
            _check_backbone(backbone, "--experiment")
    _check_writable(config.runs_dir, "--runs-dir")
    _check_outside_runs(config.runs_dir, "--runs-dir")
    if config.data_dir:
        _check_writable(config.data_dir, "--data-dir")
        _check_outside_runs(config.data_dir, "--data-dir")
    run_name = config.run_name or default_run_name(f"generalize-{run.name}")
    resolved = dataclasses.replace(  # As resolve_generalize saves it.
        config,
        run_name=run_name,
        experiments=tuple(
            (d or saved["dataset"], experiment_backbone(b, saved))
            for d, b in config.experiments
        ),
    )
    from thumbnet_keras.pipeline.resolve import generalize_inputs

    check_claimable(
        resolved.run_path,
        resolved.to_json(),
        kind="generalize",
        inputs=generalize_inputs(run, config.factor),
    )
    return params.model_copy(update={"run_name": run_name})


# Keras 3's backends; the three this project runs on first.
_BACKENDS = ("tensorflow", "jax", "torch", "numpy", "openvino")


def check_backend() -> None:
    """`KERAS_BACKEND`, when set, names a Keras backend that is installed
    (Keras itself would fail on import, with a traceback)."""
    backend = os.environ.get("KERAS_BACKEND")
    if backend is None:
        return
    if backend not in _BACKENDS:
        raise ConfigError(
            f"KERAS_BACKEND={backend!r} is not a Keras backend; set it to "
            "tensorflow, jax or torch, or unset it."
        )
    if backend != "numpy" and importlib.util.find_spec(backend) is None:
        raise ConfigError(
            f"KERAS_BACKEND={backend!r} but {backend} is not installed: install "
            "it, or choose another backend."
        )


def _check_output_file(path: str, option: str, suffixes: tuple[str, ...]) -> None:
    """`path` ends in one of `suffixes`, is not a folder, and its folder can
    be written (made later if missing)."""
    if not path.lower().endswith(suffixes):
        raise ConfigError(f"{option} {path!r}: must end in {' or '.join(suffixes)}.")
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{option} {path!r} is a folder; give a file name.")
    _check_writable(str(target.absolute().parent), f"{option}'s folder")


def check_predict(
    model: str,
    inputs: list[str],
    top_k: int = 5,
    output: str | None = None,
    sidecar: str | None = None,
) -> None:
    """`thumbnet predict`'s model file, inputs and output, before a model is
    loaded: the model is a format predict runs (a `.keras` one a Keras
    archive), a given `sidecar` is a file, the inputs name at least one
    file, and `output` is a `.csv` or `.json` file that can be written."""
    from thumbnet_keras.deploy.runtime import model_kind
    from thumbnet_keras.predict import check_overwrite, collect_files

    if not os.path.exists(model):
        raise ConfigError(f"--model {model!r}: not found.")
    try:
        model_kind(model)
    except ValueError as err:
        raise ConfigError(f"--model: {err}") from None
    if model.endswith(".keras") and os.path.isfile(model):
        keras_archive_shape(model, "--model")
    if sidecar is not None and not os.path.isfile(sidecar):
        raise ConfigError(
            f"--sidecar {sidecar!r}: no such file (a run's or an export's "
            "thumbnet_model.json)."
        )
    if top_k < 1:
        raise ConfigError(f"--top-k {top_k}: must be >= 1.")
    if output is not None:
        _check_output_file(output, "--output", (".csv", ".json"))
        try:
            check_overwrite(output)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    files, errors = collect_files(inputs)
    if not files:
        reasons = {"not_found": "not found", "no_images_in_folder": "no image in it"}
        shown = "; ".join(
            f"{e['file']!r}: {reasons.get(e['reason'], e['reason'])}"
            for e in errors[:5]
        )
        raise ConfigError(
            f"Nothing to classify ({shown}). Give image files or folders "
            "holding images."
        )
