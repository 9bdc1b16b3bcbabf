"""Decode a downloaded body once, safely: bombs, truncation, EXIF orientation, odd pixel modes; resize and encode.

`decode` serves every use of an image from one decode: the integrity check (truncation and corrupt scans fail the
decode), the measured original size (from the header, after EXIF rotation), the resize and the pHash. An upright
RGB JPEG (nearly every image on the web) is decoded by libjpeg-turbo straight from memory into a numpy array
(simplejpeg), at the smallest power-of-two DCT scale (1/2, 1/4, 1/8) that still covers the target, with every
warning an error; a JPEG it finds any fault in, and every other image, goes through Pillow, which decides
what the body is (so a body is accepted exactly when Pillow's decode accepts it). A bilinear filter (a factor up
to 2 left) or an area filter resizes the rest of the way; img2dataset's Resizer is the reference it is tested
against. `prepare` hands img2dataset's Resizer bytes it decodes faithfully (the bucket resize still uses it).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import cache
from types import ModuleType
from typing import NamedTuple

import numpy as np
import simplejpeg
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


Plan = Callable[[int, int], "tuple[int, int] | None"]  # upright (width, height) -> size after the resize, or None


class Decoded(NamedTuple):
    pixels: np.ndarray  # upright RGB, height x width x 3 uint8, at a DCT scale that still covers the planned size
    original_width: int  # of the upright image, from the header
    original_height: int
    size: tuple[int, int] | None  # what the resize will produce; None: the image stays at its size
    clean_jpeg: bool  # an upright RGB JPEG: its bytes can be stored as they are when no resize is needed


def decode(body: bytes, plan: Plan) -> Decoded:
    """The one decode of a body, at the size plan asks for; raises DecodeError."""
    if not body:
        raise DecodeError("empty_body", "200 with an empty body")
    with _open(body) as image:
        orientation = _orientation(image)
        turned = orientation in (5, 6, 7, 8)  # a quarter turn swaps width and height
        width, height = (image.height, image.width) if turned else image.size
        size = plan(width, height)
        clean = image.format == "JPEG" and image.mode == "RGB" and orientation == 1
        if clean:
            # The smallest DCT scale that covers the planned size; 1/8 when only the check and the pHash need it.
            pixels = turbo_decode(body, image.size, size or (1, 1))
            if pixels is not None:
                return Decoded(pixels, width, height, size, clean)
        if image.format == "JPEG":
            wanted = size if size is not None else (1, 1) if clean else (width, height)
            image.draft(None, (wanted[1], wanted[0]) if turned else wanted)
        _load(image, body)  # every byte is read even at 1/8 scale: truncation shows
        try:
            upright = to_rgb(ImageOps.exif_transpose(image) or image) if orientation != 1 else to_rgb(image)
        except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
            raise DecodeError("decode_failed", f"{type(error).__name__}: {error} ({describe(body)})") from error
    return Decoded(_array(upright), width, height, size, clean)


def turbo_decode(body: bytes, header_size: tuple[int, int], wanted: tuple[int, int]) -> np.ndarray | None:
    """An RGB JPEG decoded by libjpeg-turbo from memory at dct_scale's size, or None when libjpeg-turbo reports
    anything at all (strict: a warning such as a corrupt or short scan is a failure too) or reads another size from
    the header than Pillow did (the bomb check was made on Pillow's): Pillow then decides.

    ~20-30 % less CPU than Pillow's decoder on the same library: no suspending source fed in 64 KB blocks, no RGBX
    buffer to copy out of. Every byte of the scan is entropy-decoded at any scale."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(body)
        if (width, height) != header_size:
            return None
        scaled_width, scaled_height = dct_scale(width, height, wanted)
        return simplejpeg.decode_jpeg(body, colorspace="RGB", min_width=scaled_width, min_height=scaled_height,
                                      strict=True)
    except (ValueError, MemoryError):
        return None


def dct_scale(width: int, height: int, wanted: tuple[int, int]) -> tuple[int, int]:
    """The decoded size at the smallest power-of-two DCT scale (1/8, 1/4, 1/2, 1; Pillow's draft's) that covers
    wanted. libjpeg-turbo's other M/8 scales are not used: on grainy photos their outputs part from img2dataset's
    Resizer by up to 69 levels where the powers of two stay within 26 (measured; tests/stages/test_download.py)."""
    for denominator in (8, 4, 2):
        scaled = -(-width // denominator), -(-height // denominator)
        if scaled[0] >= wanted[0] and scaled[1] >= wanted[1]:
            return scaled
    return width, height


def _array(image: Image.Image) -> np.ndarray:
    """An RGB Pillow image as height x width x 3, one copy (np.asarray reads image.tobytes() twice)."""
    return np.frombuffer(image.tobytes(), np.uint8).reshape(image.height, image.width, 3)


def planned_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int] | None:
    """img2dataset's size after the resize (resize_only_if_bigger, albumentations' rounding); None: no resize."""
    side = {"keep_ratio": min, "center_crop": min, "keep_ratio_largest": max, "border": max}.get(resize_mode)
    if side is None or side(width, height) <= image_size:
        return None
    scale = image_size / side(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resized(decoded: Decoded, image_size: int, resize_mode: str) -> np.ndarray:
    """The stored pixels: downscale to the planned size, then img2dataset's centre crop or white border."""
    if decoded.size is None:
        return decoded.pixels
    pixels = downscale(decoded.pixels, decoded.size)
    height, width = pixels.shape[:2]
    if resize_mode == "center_crop":
        left, top = max((width - image_size) // 2, 0), max((height - image_size) // 2, 0)
        pixels = pixels[top:top + min(height, image_size), left:left + min(width, image_size)]
    elif resize_mode == "border" and (width < image_size or height < image_size):
        canvas = np.full((max(height, image_size), max(width, image_size), 3), 255, np.uint8)
        top, left = (canvas.shape[0] - height) // 2, (canvas.shape[1] - width) // 2
        canvas[top:top + height, left:left + width] = pixels
        pixels = canvas
    return pixels


@cache
def _cv2() -> ModuleType:
    import cv2

    cv2.setNumThreads(1)  # the download threads are the parallelism; OpenCV's own pool would only oversubscribe
    return cv2


LINEAR_UP_TO = 2.0  # the largest downscale factor (per side) done with bilinear interpolation instead of area


def downscale(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The downscale to size: OpenCV's INTER_LINEAR when no side shrinks by more than LINEAR_UP_TO, else INTER_AREA
    (img2dataset's filter: exact pixel coverage; Pillow's BOX rounds it per pixel).

    After a DCT-scaled decode the factor left is below 2 (the decoder took the smallest power-of-two scale that still
    covers the target). There bilinear's two taps per side still reach every input pixel (samples
    are less than 2 apart), it only weighs them by distance where area weighs them by coverage; and OpenCV's area
    filter has no fast path for a fractional factor: a 1.5-2 MP photo to 1024 px costs ~25 ms in it against ~3 ms
    bilinear. tests/stages/test_download.py holds the outputs to img2dataset's Resizer within a stated tolerance.
    """
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels
    cv2 = _cv2()
    method = cv2.INTER_LINEAR if max(width / size[0], height / size[1]) <= LINEAR_UP_TO else cv2.INTER_AREA
    return cv2.resize(pixels, size, interpolation=method)


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """libjpeg-turbo's encoder, as Pillow's defaults set it: 4:2:0 chroma, the accurate DCT."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                  colorsubsampling="420", fastdct=False)


def hash_copy(pixels: np.ndarray) -> Image.Image:
    """A small grayscale copy for the perceptual hash (pHash looks at 32x32): whole factor x factor boxes averaged
    down to 128-255 px on the short side (the < factor pixels left at an edge do not count), then Pillow's luma."""
    height, width = pixels.shape[:2]
    factor = max(1, min(height, width) // 128)
    if factor > 1:
        whole = pixels[:height - height % factor, :width - width % factor]
        pixels = _cv2().resize(whole, (width // factor, height // factor), interpolation=_cv2().INTER_AREA)
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("L")
