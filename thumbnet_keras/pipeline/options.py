"""Command-line options made from a parameter model's fields.

`thumbnet train` has one option per field of `ThumbNetParams`, `thumbnet
generalize` one per field of `GeneralizeParams`, made here from the field:

* the option is the field's name in kebab case (`batch_size` ->
  `--batch-size`), except for the few spellings in `SPELLINGS`
  (`joint_epochs` -> `--epochs`, a list field takes one item per use:
  `--factor 2 --factor 4`);
* its help is the field's description (a field named in backquotes becomes
  its option) and default;
* its type, choices and form come from the annotation: a number, a string, a
  `Literal`'s choices, a flag for a bool (`--no-x` too when it defaults to
  True), a repeatable option for a tuple or a list, JSON for a dict.

An option left out is left out of the values (argparse's `SUPPRESS`), so the
model's default applies and a preset's values are not overwritten; the values
given are passed to the model unchanged, so its bounds check them and
`preflight.validate_params` names the option in the message
(`--epochs -1: must be >= 1`).

argparse, json and pydantic only: `thumbnet --help` imports no framework.
"""

from __future__ import annotations

import argparse
import json
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

from thumbnet_keras.pipeline.config import ConfigError

__all__ = [
    "SPELLINGS",
    "add_options",
    "option_name",
    "option_values",
    "parse_json_option",
    "shown_default",
]

# Field -> command-line option, where the option is not the field's name.
SPELLINGS = {
    "joint_epochs": "--epochs",  # The stage a user means by "epochs".
    "factors": "--factor",  # One item per use, repeatable.
    "export_formats": "--export-format",
    "seeds": "--seed",
    "experiments": "--experiment",
}


def option_name(field: str) -> str:
    """The command-line option of a parameter (`joint_epochs` -> `--epochs`)."""
    return SPELLINGS.get(field, "--" + field.replace("_", "-"))


def _unwrap(annotation: Any) -> Any:
    """`X | None` and `Annotated[X, ...]` -> `X`."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            kept = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(kept) != 1:
                raise TypeError(f"no command-line form for {annotation!r}")
            annotation = kept[0]
        else:
            return annotation


def _value_kind(annotation: Any) -> dict:
    """argparse's `type`/`choices` for one value."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return {"type": type(choices[0]), "choices": choices}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"type": str}  # Parsed by the command (`parse=` of option_values).
    if annotation in (int, float, str):
        return {"type": annotation}
    raise TypeError(f"no command-line form for {annotation!r}")


def _is_sequence(annotation: Any) -> bool:
    return typing.get_origin(_unwrap(annotation)) in (tuple, list)


def _is_dict(annotation: Any) -> bool:
    annotation = _unwrap(annotation)
    return annotation is dict or typing.get_origin(annotation) is dict


def _cli_text(description: str, model: type[BaseModel]) -> str:
    """A field's description as the command line says it: a field named in
    backquotes becomes its option (`` `learning_rate` `` -> --learning-rate)."""

    def option(match: re.Match) -> str:
        word = match.group(1)
        return option_name(word) if word in model.model_fields else word

    return re.sub(r"`([^`]+)`", option, description)


def shown_default(value: Any) -> str | None:
    """A default as the help shows it; None: nothing to show."""
    if value is None or value in ((), [], {}) or value is False:
        return None
    if value is True:
        return "on"
    if isinstance(value, (tuple, list)):
        if any(isinstance(v, BaseModel) for v in value):
            return None  # The description says what the default means.
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _argument(
    model: type[BaseModel],
    name: str,
    shown: Mapping[str, Any],
    forms: Mapping[str, tuple[str, str]],
) -> tuple[str, dict]:
    field = model.model_fields[name]
    option = option_name(name)
    annotation = field.annotation
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    if field.is_required():
        kwargs["required"] = True
        default = None
    else:
        default = shown.get(name, field.get_default(call_default_factory=True))
    help_text = _cli_text(field.description or "", model)
    if name in shown:  # A preset's value: the model's default is not the one.
        help_text = help_text.split(" Default: ")[0]
    metavar = option.lstrip("-").upper().replace("-", "_")
    if _unwrap(annotation) is bool:
        if field.get_default() is True:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_true"
    elif _is_sequence(annotation):
        (item,) = {a for a in typing.get_args(_unwrap(annotation)) if a is not ...}
        kwargs |= {"action": "append", **_value_kind(item)}
        help_text += " Repeatable."
    elif _is_dict(annotation):
        kwargs["type"] = str
        metavar = "JSON"
        help_text += " A JSON object."
    else:
        kwargs |= _value_kind(annotation)
    if name in forms:
        metavar, note = forms[name]
        help_text += f" {note}"
    flag = kwargs.get("action") in ("store_true", argparse.BooleanOptionalAction)
    if not flag and "choices" not in kwargs:
        kwargs["metavar"] = metavar
    text = shown_default(default)
    if text is not None:
        help_text += f" (default: {text})"
    kwargs["help"] = help_text.replace("%", "%%")
    return option, kwargs


def add_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    names: Iterable[str] | None = None,
    *,
    shown: Mapping[str, Any] | None = None,
    forms: Mapping[str, tuple[str, str]] | None = None,
) -> None:
    """Adds an option to `parser` for each field `names` of `model` (default:
    every field, in the model's order).

    Args:
        shown: defaults to show in the help instead of the model's (a preset's).
        forms: `{field: (metavar, note)}` for an option whose text the
            command parses itself (`--experiment DATASET:BACKBONE`); the note
            follows the description in the help.
    """
    for name in names or model.model_fields:
        option, kwargs = _argument(model, name, shown or {}, forms or {})
        parser.add_argument(option, **kwargs)


def option_values(
    args: argparse.Namespace,
    model: type[BaseModel],
    names: Iterable[str] | None = None,
    *,
    parse: Mapping[str, Callable[[Any], Any]] | None = None,
) -> dict:
    """The fields given on the command line, as `model`'s values: a JSON
    option parsed (`ConfigError` naming the option if it is not a JSON
    object), a field in `parse` converted by its function, the rest as given.
    """
    values = {}
    for name in names or model.model_fields:
        if not hasattr(args, name):  # Not given: the model's default applies.
            continue
        value = getattr(args, name)
        if parse and name in parse:
            value = parse[name](value)
        elif _is_dict(model.model_fields[name].annotation):
            value = parse_json_option(value, option_name(name))
        values[name] = value
    return values


def parse_json_option(text: str, option: str) -> dict:
    """A JSON object given on the command line, or `ConfigError` naming it."""
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ConfigError(
            f"{option} is not valid JSON ({err}): {text!r}. Example: "
            f"{option} '{{\"widths\": [32, 64]}}'."
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object ({{...}}), got {text!r}.")
    return value
