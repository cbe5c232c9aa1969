"""Real image files for the data-layer tests: good ones and planted bad ones.

Every bad file is a real file on disk (no mocks): a truncated JPEG, a zero-byte
file, a text file named .png, a 16-bit PNG, a CMYK JPEG, a palette PNG, a
directory named like an image, and a few more.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> (expected status, expected reason)
BAD_FILES: dict[str, tuple[str, str]] = {
    "truncated.jpg": ("quarantined", "truncated"),
    "zero.png": ("quarantined", "empty_file"),
    "text.png": ("quarantined", "not_an_image"),
    "deep16.png": ("converted", "16bit_to_8bit"),
    "cmyk.jpg": ("quarantined", "cmyk_colorspace"),
    "palette.png": ("converted", "palette_to_rgb"),
    "folder.jpg": ("quarantined", "not_a_file"),
    "transparent.png": ("quarantined", "transparency"),
    "picture.bmp": ("converted", "format_to_png:BMP"),
}


def pattern(height: int, width: int, channels: int, seed: int) -> np.ndarray:
    """A deterministic uint8 test image with smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = (x * 255 // max(width - 1, 1) + y * 3 + seed * 17) % 256
    noise = rng.integers(0, 40, size=(height, width))
    gray = np.clip(base + noise, 0, 255).astype(np.uint8)
    if channels == 1:
        return gray
    return np.stack([gray, gray[::-1], 255 - gray], axis=-1)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    """Encode a uint8 array with PIL."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_good(path: Path, seed: int, size: int = 24, channels: int = 3) -> Path:
    """Write a valid JPEG or PNG (by suffix) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    path.write_bytes(encode(pattern(size, size, channels, seed), fmt))
    return path


def write_bad_files(folder: Path) -> dict[str, tuple[str, str]]:
    """Plant every file of `BAD_FILES` in `folder`; return BAD_FILES."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = encode(pattern(64, 64, 3, 99), "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not a PNG, just text\n")
    deep = (pattern(16, 16, 1, 5).astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    Image.fromarray(pattern(16, 16, 3, 6)).convert("CMYK").save(
        folder / "cmyk.jpg", format="JPEG"
    )
    Image.fromarray(pattern(16, 16, 3, 7)).convert("P").save(folder / "palette.png")
    (folder / "folder.jpg").mkdir(exist_ok=True)
    rgba = np.dstack([pattern(16, 16, 3, 8), np.full((16, 16), 128, np.uint8)])
    Image.fromarray(rgba).save(folder / "transparent.png")
    Image.fromarray(pattern(16, 16, 3, 9)).save(folder / "picture.bmp")
    return BAD_FILES


def make_image_folder(
    root: Path, classes=("cat", "dog"), per_class: int = 6, with_bad: bool = True
) -> Path:
    """root/<class>/*.{jpg,png} good images, plus bad files under the first class."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            suffix = ".jpg" if i % 2 else ".png"
            write_good(root / name / f"{name}_{i:02d}{suffix}", seed=100 * c + i)
    if with_bad:
        write_bad_files(root / classes[0])
    return root


def folder_manifest(root, name: str = "toy", test_fraction: float = 0.34, **split):
    """An image-folder manifest over `root` (3 channels). The data-layer
    tests assume no carved validation split unless they ask for one (the
    manifest default is 10% of train)."""
    from thumbnet_keras import data

    return data.Manifest.model_validate(
        {
            "name": name,
            "description": "planted files",
            "license": "test data",
            "source": {"type": "image_folder", "root": str(root)},
            "image": {"channels": 3},
            "split": {
                "test_fraction": test_fraction,
                "validation_fraction": 0.0,
                **split,
            },
        }
    )
