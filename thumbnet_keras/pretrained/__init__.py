"""Pre-trained weights that ship inside the package.

`elpv_teacher.keras`: a teacher for the ELPV solar-cell set (4 classes of
defect probability 0, 1/3, 2/3, 1), trained by
`benchmarks/train_elpv_teacher.py` on the split of `data_manifests/elpv.yaml`.
It is a Functional model of built-in Keras layers (logits out), so it loads
with `keras.saving.load_model(path, safe_mode=True)` on every backend and
`make_student(teacher, 2)` / `(teacher, 4)` derive its students. Input: gray
1-channel images in [0, 1] (`make_dataset(..., channels=1,
normalization="unit")`) at the size `elpv_teacher_info()["input_shape"]`.

Data licence: the weights are trained on ELPV, CC BY-NC-SA 4.0 (Deitsch et
al.): non-commercial use only.

Example:

>>> import keras
>>> from thumbnet_keras.pretrained import elpv_teacher_info, elpv_teacher_path
>>> teacher = keras.saving.load_model(elpv_teacher_path(), safe_mode=True)
>>> teacher.input_shape[1:] == tuple(elpv_teacher_info()["input_shape"])
True
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["elpv_teacher_info", "elpv_teacher_path", "resolve_teacher"]

# `teacher="pretrained:<name>"` in a run's parameters names a shipped teacher,
# so deployments and prefect.yaml need no machine-specific path.
PREFIX = "pretrained:"

_HERE = Path(__file__).resolve().parent


def elpv_teacher_path() -> str:
    """The path of the shipped ELPV teacher (`.keras`)."""
    path = _HERE / "elpv_teacher.keras"
    if not path.is_file():
        raise FileNotFoundError(
            f"The ELPV teacher is missing from this installation: {path}. "
            "Reinstall thumbnet-keras or retrain it with "
            "benchmarks/train_elpv_teacher.py."
        )
    return str(path)


def elpv_teacher_info() -> dict:
    """The teacher's training summary: command, settings, input shape,
    normalization, split, licence, validation and test top-1."""
    with open(_HERE / "elpv_teacher.json", encoding="utf-8") as f:
        return json.load(f)


def resolve_teacher(teacher: str) -> str:
    """A run's `teacher` value as a file path: `"pretrained:elpv"` is the
    shipped ELPV teacher; anything else is returned unchanged."""
    if not teacher.startswith(PREFIX):
        return teacher
    name = teacher[len(PREFIX) :]
    if name != "elpv":
        raise ValueError(
            f"Unknown shipped teacher {teacher!r}; shipped: 'pretrained:elpv'."
        )
    return elpv_teacher_path()
