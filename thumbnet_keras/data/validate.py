"""Decode every image once at prepare time; keep, convert or quarantine it.

The training pipeline (`tf.io.decode_image`) only ever sees 8-bit JPEG or PNG
files with 1 or 3 channels. Everything else is either converted to an 8-bit
PNG when the conversion is exact (or a documented linear rescale) or
quarantined with a reason. Nothing here raises on a bad file.

Rules (also in docs/data.md):

| input                                   | status      | reason                   |
|-----------------------------------------|-------------|--------------------------|
| 8-bit JPEG/PNG, mode L or RGB           | ok          |                          |
| no such file (a table's path, a link    | quarantined | missing                  |
| to nothing)                             |             |                          |
| a directory, a socket, ...              | quarantined | not_a_file               |
| a path that is not UTF-8 (sources.py)   | quarantined | non_utf8_path            |
| zero bytes                              | quarantined | empty_file               |
| cannot be opened/read (permissions)     | quarantined | unreadable               |
| not an image PIL recognises             | quarantined | not_an_image             |
| image signature, unparsable header      | quarantined | corrupt                  |
| a critical PNG chunk's CRC is wrong     | quarantined | corrupt                  |
| decode fails part way (truncated), a    | quarantined | truncated                |
| PNG without its whole IEND chunk        |             |                          |
| any other decode error                  | quarantined | corrupt                  |
| more pixels than PIL's bomb limit       | quarantined | too_large                |
| CMYK (no exact RGB without ICC profile) | quarantined | cmyk_colorspace          |
| animated (several frames)               | quarantined | animated                 |
| alpha channel that is not fully opaque  | quarantined | transparency             |
| 32-bit int / float modes (I, F)         | quarantined | unsupported_mode:<mode>  |
| 16-bit gray or RGB PNG                  | converted   | 16bit_to_8bit            |
| palette (P) image                       | converted   | palette_to_rgb           |
| 1-bit image                             | converted   | bilevel_to_gray          |
| opaque RGBA / LA                        | converted   | drop_opaque_alpha        |
| BMP, GIF, TIFF, WebP... (8-bit, L/RGB)  | converted   | format_to_png:<format>   |

EXIF orientation (phone photos): an ok JPEG/PNG keeps its bytes and its
orientation is recorded (index column `orientation`), applied after decoding
in training and in `thumbnet predict`; converted images are written upright.
Widths and heights are the upright image's.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

OK = "ok"
CONVERTED = "converted"
QUARANTINED = "quarantined"

_PASS_FORMATS = ("JPEG", "PNG")
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8",  # JPEG SOI
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
)


@dataclasses.dataclass(frozen=True)
class Validation:
    """Outcome of validating one image.

    Attributes:
        status: "ok", "converted" or "quarantined".
        reason: "" for ok; a short machine-readable reason otherwise.
        width, height, channels: of the image as the pipeline will see it,
            upright (0 when quarantined).
        converted: 8-bit PNG bytes to use instead of the original, or None.
        orientation: the EXIF orientation (1-8) the pipeline applies after
            decoding the original bytes (`data.pipeline.apply_orientation`);
            1 when the stored pixels are upright, and always 1 for converted
            bytes, which are written upright.
    """

    status: str
    reason: str = ""
    width: int = 0
    height: int = 0
    channels: int = 0
    converted: bytes | None = None
    orientation: int = 1


def quarantine(reason: str) -> Validation:
    """A quarantined `Validation` with `reason`."""
    return Validation(status=QUARANTINED, reason=reason)


def read_file(path: str | os.PathLike) -> tuple[bytes | None, Validation | None]:
    """Read a candidate file; on failure return (None, quarantined Validation)."""
    try:
        if not os.path.exists(path):  # nothing there, or a dangling link
            return None, quarantine("missing")
        if not os.path.isfile(path):
            return None, quarantine("not_a_file")
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None, quarantine("unreadable")
    return data, None


def _png_bit_depth(data: bytes) -> int:
    # IHDR is the first chunk: 8 signature + 4 length + 4 type + 4 w + 4 h, then depth.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24]
    return 8


# Bumped when a rule changes a verdict (a file `ok` before is not now):
# `prepare` then re-validates every file instead of reusing an earlier
# index's rows. 2: PNG chunk CRCs and a whole IEND chunk (2026-12-01).
RULES_VERSION = 2


def _png_problem(data: bytes) -> str | None:
    """ "truncated", "corrupt" or None: the PNG's chunks, walked by their
    lengths, must run to a whole IEND chunk (bytes after it are allowed)
    and every critical chunk's CRC must match. Pillow decodes a PNG cut
    inside or before IEND, or with a damaged IDAT CRC; TensorFlow's decoder
    (libpng) refuses both ("Invalid PNG data"), and only warns about an
    ancillary chunk's bad CRC: such files passed validation, then failed
    training with a traceback that named no file (a trial: 4 of 150
    one-bit flips, and cuts of 1-4 bytes)."""
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return "truncated"
        crc = int.from_bytes(data[end : end + 4], "big")
        critical = not data[pos + 4] & 0x20  # IHDR, PLTE, IDAT, IEND: upper case
        if critical and zlib.crc32(data[pos + 4 : end]) != crc:
            return "corrupt"  # (libpng only warns about an ancillary chunk's)
        if data[pos + 4 : pos + 8] == b"IEND":
            return None
        pos = end + 4  # length, type, data, CRC
    return "truncated"


def _encode_png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright
# (as `PIL.ImageOps.exif_transpose`).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def exif_orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (upright) when absent or invalid:
    phones store pixels as the sensor read them and say in this tag how to
    turn them (6: rotate 90 degrees clockwise)."""
    try:
        value = int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - an unreadable EXIF block means no rotation
        return 1
    return value if value in _UPRIGHT else 1


def _converted(image: Image.Image, reason: str, orientation: int = 1) -> Validation:
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return Validation(
        status=CONVERTED,
        reason=reason,
        width=image.width,
        height=image.height,
        channels=1 if image.mode == "L" else 3,
        converted=_encode_png(image),
    )


def validate_bytes(data: bytes) -> Validation:
    """Decode `data` fully and classify it (see the module table).

    Args:
        data: the encoded image file.

    Returns:
        A `Validation`; never raises for bad input.
    """
    if len(data) == 0:
        return quarantine("empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return quarantine("too_large")
    except UnidentifiedImageError:
        # An image signature that Pillow cannot parse is a damaged image.
        return quarantine("corrupt" if data.startswith(_SIGNATURES) else "not_an_image")
    except OSError as err:
        text = str(err).lower()
        if "truncated" in text or "premature" in text:
            return quarantine("truncated")
        return quarantine("corrupt")
    except Exception:  # noqa: BLE001 - any decoder failure means a bad file
        return quarantine("corrupt")

    fmt = image.format or "unknown"
    if fmt == "PNG" and (problem := _png_problem(data)) is not None:
        return quarantine(problem)
    mode = image.mode
    orientation = exif_orientation(image)
    if getattr(image, "n_frames", 1) > 1:
        return quarantine("animated")
    if mode == "CMYK":
        return quarantine("cmyk_colorspace")
    if mode.startswith("I;16") or (fmt == "PNG" and _png_bit_depth(data) == 16):
        if mode.startswith("I;16") or mode == "I":
            # The high byte, as Pillow reduces 16-bit RGB (below) and
            # tf.image.convert_image_dtype converts: gray and colour files
            # alike (gray took round(v / 257), one level apart: a trial).
            array = np.asarray(image, dtype=np.int64)
            gray = np.clip(array >> 8, 0, 255).astype(np.uint8)
            return _converted(Image.fromarray(gray), "16bit_to_8bit", orientation)
        # PIL already reduced 16-bit RGB(A) to 8 bits per channel (high byte).
        if mode in ("RGBA", "LA"):
            image = _drop_alpha(image)
            if image is None:
                return quarantine("transparency")
        return _converted(
            image.convert("RGB" if mode != "L" else "L"), "16bit_to_8bit", orientation
        )
    if mode in ("I", "F"):
        return quarantine(f"unsupported_mode:{mode}")
    if mode == "P":
        rgba = image.convert("RGBA")
        flat = _drop_alpha(rgba)
        if flat is None:
            return quarantine("transparency")
        return _converted(flat, "palette_to_rgb", orientation)
    if mode == "1":
        return _converted(image.convert("L"), "bilevel_to_gray", orientation)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        flat = _drop_alpha(image)
        if flat is None:
            return quarantine("transparency")
        return _converted(flat, "drop_opaque_alpha", orientation)
    if mode not in ("L", "RGB"):
        try:
            return _converted(image.convert("RGB"), f"mode_to_rgb:{mode}", orientation)
        except (OSError, ValueError):
            return quarantine(f"unsupported_mode:{mode}")
    if fmt not in _PASS_FORMATS:
        return _converted(image, f"format_to_png:{fmt}", orientation)
    turned = orientation in (5, 6, 7, 8)  # a quarter turn swaps the sides
    return Validation(
        status=OK,
        width=image.height if turned else image.width,
        height=image.width if turned else image.height,
        channels=1 if mode == "L" else 3,
        orientation=orientation,
    )


def _drop_alpha(image: Image.Image) -> Image.Image | None:
    """The image without its alpha band if alpha is fully opaque, else None."""
    image = image.convert("LA" if image.mode in ("LA", "La") else "RGBA")
    alpha = np.asarray(image.getchannel("A"))
    if alpha.min() < 255:
        return None
    return image.convert("L" if image.mode == "LA" else "RGB")


def validate_array(array: np.ndarray) -> Validation:
    """Validate a decoded uint8 array (H, W) or (H, W, C) and encode it as PNG."""
    if array.dtype != np.uint8:
        return quarantine(f"unsupported_dtype:{array.dtype}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        return quarantine(f"unsupported_shape:{array.shape}")
    if min(array.shape[:2]) < 1:
        return quarantine("empty_image")
    image = Image.fromarray(array)
    return Validation(
        status=OK,
        width=image.width,
        height=image.height,
        channels=1 if array.ndim == 2 else 3,
        converted=_encode_png(image),
    )
