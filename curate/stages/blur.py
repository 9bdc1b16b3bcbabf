"""--blur-faces: faces Gaussian-blurred in the stored image, so the bytes the shard writer copies are the blurred ones.

The boxes come from the metadata (--bbox-column, img2dataset's bbox_col: normalized [x0, y0, x1, y1] per face) or
from OpenCV's frontal-face Haar cascade, whose weights ship inside opencv-python-headless (nothing is fetched). The
blur follows img2dataset's BoundingBoxBlurrer, which DataComp's resharder applies: each box grown by a tenth of the
largest box's longer side, a Gaussian of sigma a tenth of that side. Unlike it, the edge is hard: no pixel outside
the grown boxes changes (its soft mask and float round trip change pixels all over the image).
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import simplejpeg

from curate.stages.images import _cv2, encode_jpeg

FACES_BLURRED = "faces_blurred"
GROW = 0.1  # each box grows by this fraction of the largest box's longer side (ImageNet face obfuscation)
SIGMA = 0.1  # the Gaussian's sigma, as a fraction of that side
DETECT_SIDE = 512  # the detector looks at a copy at most this long: Haar's cost grows with the pixels
CASCADE = "haarcascade_frontalface_default.xml"
Box = tuple[float, float, float, float]
_local = threading.local()  # a CascadeClassifier is not safe to share between the download threads


class BoxError(ValueError):
    """A --bbox-column value that is not a list of normalized [x0, y0, x1, y1] boxes."""


def _cascade() -> Any:
    cascade = getattr(_local, "cascade", None)
    if cascade is None:
        cv2 = _cv2()
        cascade = _local.cascade = cv2.CascadeClassifier(cv2.data.haarcascades + CASCADE)
        if cascade.empty():
            raise RuntimeError(f"OpenCV's {CASCADE} is missing from {cv2.data.haarcascades}")
    return cascade


def detect_faces(pixels: np.ndarray) -> list[Box]:
    """Normalized boxes of the frontal faces OpenCV's Haar cascade finds (on a copy at most DETECT_SIDE long)."""
    cv2 = _cv2()
    height, width = pixels.shape[:2]
    gray = cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_RGB2GRAY)
    scale = min(1.0, DETECT_SIDE / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    found = _cascade().detectMultiScale(gray, scaleFactor=1.2, minNeighbors=5, minSize=(20, 20))
    rows, columns = gray.shape
    return [(x / columns, y / rows, (x + w) / columns, (y + h) / rows) for x, y, w, h in np.asarray(found).tolist()]


def parse_boxes(value: Any) -> list[Box]:
    """A --bbox-column value (None or a list of [x0, y0, x1, y1] in [0, 1]) as boxes; raises BoxError."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise BoxError(f"expected a list of [x0, y0, x1, y1] boxes, got {str(value)[:100]!r}")
    boxes = []
    for box in value:
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError) as error:
            raise BoxError(f"a box is not four numbers: {str(box)[:100]!r}") from error
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x0 >= x1 or y0 >= y1:
            raise BoxError(f"a box is not normalized [x0, y0, x1, y1] with x0 < x1, y0 < y1: {[x0, y0, x1, y1]}")
        boxes.append((x0, y0, x1, y1))
    return boxes


def grown_boxes(boxes: list[Box], width: int, height: int) -> tuple[list[tuple[int, int, int, int]], int]:
    """Pixel rectangles (x0, y0, x1, y1, end exclusive) grown as img2dataset's blurrer grows them, and the largest
    box's longer side in pixels."""
    pixel = [(int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height)) for x0, y0, x1, y1 in boxes]
    side = max(max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in pixel)
    rectangles = []
    for x0, y0, x1, y1 in pixel:
        grow = GROW * max(x1 - x0, y1 - y0)
        rectangles.append((max(0, int(x0 - grow)), max(0, int(y0 - grow)), min(width, int(x1 + grow)),
                           min(height, int(y1 + grow))))
    return rectangles, side


def blur_boxes(pixels: np.ndarray, boxes: list[Box]) -> np.ndarray:
    """A copy with every grown box replaced by its Gaussian blur; every other pixel is the input's."""
    if not boxes:
        return pixels
    cv2 = _cv2()
    height, width = pixels.shape[:2]
    rectangles, side = grown_boxes(boxes, width, height)
    sigma = max(SIGMA * side, 0.5)
    margin = int(math.ceil(4 * sigma)) + 1  # past the kernel's reach: a padded crop blurs as the whole image would
    out = pixels.copy()
    for x0, y0, x1, y1 in rectangles:
        if x1 <= x0 or y1 <= y0:
            continue
        top, left = max(0, y0 - margin), max(0, x0 - margin)
        crop = np.ascontiguousarray(pixels[top:min(height, y1 + margin), left:min(width, x1 + margin)])
        blurred = cv2.GaussianBlur(crop, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        out[y0:y1, x0:x1] = blurred[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def blur_faces(jpeg: bytes, boxes: list[Box] | None) -> tuple[bytes, int]:
    """The stored JPEG with its faces blurred (boxes given, or detected when None) and how many; unchanged bytes when
    there are none."""
    pixels = simplejpeg.decode_jpeg(jpeg, colorspace="RGB")
    found = detect_faces(pixels) if boxes is None else boxes
    if not found:
        return jpeg, 0
    return encode_jpeg(blur_boxes(pixels, found)), len(found)
