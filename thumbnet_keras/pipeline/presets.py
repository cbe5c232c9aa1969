"""Named run settings shared by the CLI, the deployments and the docs.

`demo()` is the README's main job (`thumbnet demo`): ThumbNet on the
embedded ELPV solar-cell images with the teacher that ships in the package
(`thumbnet_keras.pretrained`, MobileNetV2 alpha 0.35 at 128x128 gray, built
by `benchmarks/train_elpv_teacher.py`), so the demo trains only E and S:
f = 2 (64x64 thumbnails) and f = 4 (32x32), every bicubic baseline, report.
Sized for 15 minutes on a quiet 2-core CPU from a fresh clone (README,
"Measured results").
The presets live here, below both the CLI and `flows/`, so neither reaches
up into the other for them.
"""

from __future__ import annotations

__all__ = ["DEMO_RUN_NAME", "demo"]

DEMO_RUN_NAME = "elpv-demo"


def demo() -> dict:
    """The demo's `ThumbNetParams` fields (a new dict each call)."""
    from thumbnet_keras.pretrained import elpv_teacher_info

    info = elpv_teacher_info()
    return {
        "dataset": "elpv",
        "teacher": "pretrained:elpv",
        "backbone": info["backbone"],
        "backbone_options": dict(info.get("backbone_options", {})),
        "image_size": int(info["image_size"]),
        "channels": int(info["channels"]),
        "factors": [2, 4],
        # 4 epochs and 20 BatchNorm batches: 19 min measured with 7 and 100
        # (quiet 2-core CPU, fresh clone), ~30 s of each stage is fixed cost.
        "fm_epochs": 0,
        "joint_epochs": 4,
        "bn_batches": 20,
        "batch_size": 32,
        "run_name": DEMO_RUN_NAME,
    }
