"""Make a downloaded body safe for img2dataset's Resizer: bombs, truncation, EXIF orientation, odd pixel modes.

The Resizer decodes with OpenCV's IMREAD_UNCHANGED, which ignores EXIF orientation, scales 16-bit alpha as if it
were 8-bit and keeps grayscale as one channel. Plain RGB JPEGs (most of the web) go to it untouched after a cheap
completeness check; anything else is decoded once by Pillow (first frame, upright, RGB on white) and handed over
as an uncompressed BMP, so the Resizer stays the one place that resizes and encodes.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ORIENTATION_TAG = 0x0112
DRAFT_SIZE = (64, 64)
# Containers Pillow may lack a decoder for; named in the detail so a `decode_failed` row says why.
_CONTAINERS = {b"ftypheic": "HEIC", b"ftypheix": "HEIC", b"ftyphevc": "HEIC", b"ftypmif1": "HEIF",
               b"ftypavif": "AVIF", b"ftypavis": "AVIF"}


class DecodeError(Exception):
    """A row-level image failure: reason is the ledger reason, str(self) the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def describe(body: bytes) -> str:
    """What a body that is not a decodable image looks like, for the ledger detail."""
    head = body[:512].lstrip().lower()
    if not body:
        return "empty body"
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        return "an HTML document, not an image"
    container = _CONTAINERS.get(body[4:12])
    if container:
        return f"a {container} image, which this build's decoders do not support"
    return f"{len(body)} bytes starting {body[:8]!r}"


def _open(body: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(body))
    except Image.DecompressionBombError as error:
        raise DecodeError("decompression_bomb", f"DecompressionBombError: {error}") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DecodeError("decode_failed", f"{type(error).__name__}: {describe(body)}") from error
    pixels = image.width * image.height
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; with dozens of decodes in flight, refuse there too.
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        raise DecodeError("decompression_bomb", f"DecompressionBombError: {image.width}x{image.height} = {pixels} "
                                                f"pixels exceeds the limit of {Image.MAX_IMAGE_PIXELS}")
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is no reason to lose the pixels
        return 1


def _eight_bit(image: Image.Image) -> Image.Image:
    """16/32-bit grayscale or float to 8-bit L (Pillow's convert would clip at 255 instead of scaling)."""
    values = np.asarray(image, dtype=np.float64)
    top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), "L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB; transparency composited onto white, as img2dataset does for 8-bit alpha."""
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        image = _eight_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _load(image: Image.Image, body: bytes) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise DecodeError("decompression_bomb", f"DecompressionBombError: {error}") from error
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise DecodeError("decode_failed", f"{type(error).__name__}: {error} ({describe(body)})") from error


class Prepared(NamedTuple):
    body: bytes  # what the Resizer decodes
    gray: Image.Image  # a small upright grayscale copy from the same decode, for the perceptual hash


def prepare(body: bytes) -> Prepared:
    """Bytes the Resizer decodes faithfully (original width and height after EXIF rotation); raises DecodeError."""
    if not body:
        raise DecodeError("empty_body", "200 with an empty body")
    with _open(body) as image:
        if image.format == "JPEG" and image.mode == "RGB" and _orientation(image) == 1:
            image.draft("RGB", DRAFT_SIZE)  # a 1/8-scale decode still reads every byte: truncation shows
            _load(image, body)
            return Prepared(body, image.convert("L"))
        _load(image, body)  # the first frame of an animation or a multi-page file
        try:
            upright = to_rgb(ImageOps.exif_transpose(image) or image)
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
            raise DecodeError("decode_failed", f"{type(error).__name__}: {error} ({describe(body)})") from error
    buffer = io.BytesIO()
    upright.save(buffer, "BMP")
    gray = upright.convert("L")
    gray.thumbnail((256, 256))
    return Prepared(buffer.getvalue(), gray)
