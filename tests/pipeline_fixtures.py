"""Tiny real image datasets for the pipeline, flow and CLI tests (no tests here).

`tiny_dataset` writes 40x40 PNGs (gray, or RGB: the gray pattern tinted
with a random colour per image) of two classes that a small CNN can tell
apart (bright vs dark noise, or horizontal vs vertical stripes) and an
`image_folder` manifest for them; `prefect_env` gives every test process a
temporary PREFECT_HOME with analytics off (nox sets them too).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

# Set before anything imports prefect (nox sets its own; keep those).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="thumbnet-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

REPO = Path(__file__).resolve().parents[1]


def _image(kind: str, label: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "brightness":
        base = 170 if label == 0 else 60
        return (rng.random((40, 40)) * 60 + base).astype(np.uint8)
    y, x = np.mgrid[0:40, 0:40]
    wave = np.sin((y if label == 0 else x) * 0.8 + rng.random() * 6)
    return np.clip(128 + 90 * wave + rng.normal(0, 20, (40, 40)), 0, 255).astype(
        np.uint8
    )


def tiny_dataset(
    root: Path, kind: str = "brightness", per_class: int = 12, channels: int = 1
) -> str:
    """Writes `root/<kind>/...` and `root/<kind>.yaml`; returns the manifest path.
    `channels=3`: RGB images, each the gray pattern times a random colour
    (every channel in [0.5, 1]), so the channels differ but the class
    pattern is in each of them."""
    classes = {"brightness": ["bright", "dark"], "stripes": ["horizontal", "vertical"]}[
        kind
    ]
    folder = root / kind
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = _image(kind, label, seed=1000 * label + i)
            if channels == 3:
                tint = np.random.default_rng(7000 + 1000 * label + i).uniform(0.5, 1, 3)
                image = (image[..., None] * tint).astype(np.uint8)
            Image.fromarray(image).save(folder / name / f"{i:03d}.png")
    manifest = root / f"{kind}.yaml"
    manifest.write_text(
        f"name: tiny_{kind}\n"
        "description: two-class synthetic test images\n"
        "license: CC0 (generated)\n"
        f"source: {{type: image_folder, root: '{folder}'}}\n"
        f"classes: {classes}\n"
        f"image: {{height: 40, width: 40, channels: {channels}}}\n"
        "split: {test_fraction: 0.25, seed: 0}\n"
    )
    return str(manifest)


def snapshot(folder: Path) -> dict:
    """{relative path: (size, mtime_ns, bytes)} of every file under `folder`."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_size,
            p.stat().st_mtime_ns,
            p.read_bytes(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def subprocess_env() -> dict:
    """Environment for subprocesses: this backend, the repo importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), env.get("PYTHONPATH")])
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def loud_env() -> dict:
    """`subprocess_env()` without the switches that quiet the frameworks
    (an earlier test's `quiet_frameworks` may have set them in this
    process): for tests that check no start-up line gets through."""
    from thumbnet_keras.pipeline.environment import quiet_env

    env = subprocess_env()
    for name in quiet_env():
        env.pop(name, None)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_server_env(tmp_path: Path) -> tuple[int, dict]:
    """`(port, env)` for a temporary local Prefect server and its clients:
    its own PREFECT_HOME under `tmp_path`, analytics off, the API URL set."""
    port = free_port()
    return port, subprocess_env() | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
    }
