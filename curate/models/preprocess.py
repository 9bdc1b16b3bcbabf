"""Decode an image once and derive each model's input from it (PIL and numpy only: runs in decode workers)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WATERMARK_SIZE = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# JPEG draft decoding scales by 1/2, 1/4 or 1/8 while both sides stay >= this: twice the largest model input,
# so the antialiased resize that follows still sees at least 2x oversampling.
DRAFT_SIZE = (2 * WATERMARK_SIZE, 2 * WATERMARK_SIZE)


def decode(data: bytes, draft: bool = True) -> Image.Image:
    """The RGB image in data, fully loaded; JPEGs decode at a reduced scale when draft is true."""
    image = Image.open(io.BytesIO(data))
    if draft and image.format == "JPEG":
        image.draft("RGB", DRAFT_SIZE)
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def clip_pixels(image: Image.Image, size: int = CLIP_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: shortest side resized to size (bicubic, antialiased), then center crop.

    Bit-identical to torchvision `Resize(size)` + `CenterCrop(size)` on a PIL image (resizing straight into the
    crop box would be cheaper but moves pixels by one level).
    """
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    left = int(round((new_width - size) / 2.0))
    top = int(round((new_height - size) / 2.0))
    return np.array(image.crop((left, top, left + size, top + size)))


def watermark_pixels(image: Image.Image, size: int = WATERMARK_SIZE) -> np.ndarray:
    """uint8 [size, size, 3]: squashed to size x size, bilinear (torchvision `Resize((size, size))` on PIL)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    if image.size == (size, size):
        return np.array(image)
    return np.array(image.resize((size, size), Image.Resampling.BILINEAR))


def model_inputs(data: bytes, draft: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP pixels, watermark pixels) from one decode of an encoded image."""
    image = decode(data, draft=draft)
    return clip_pixels(image), watermark_pixels(image)
