"""Aspect buckets: the SDXL paper's list, the nearest bucket of an image, and the bucket resize (cover, centre crop).

SDXL (Podell et al. 2023, appendix "multi-aspect training") trains on 40 buckets of about 1024x1024 pixels with sides
that are multiples of 64; an image goes to the bucket nearest its aspect ratio. `--buckets` sets another base size:
the list is then the published one scaled by base/1024, sides rounded to multiples of 64, repeats removed.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import SHARD, STORED_HEIGHT, STORED_WIDTH
from curate.stages.images import planned_size

BUCKET_WIDTH, BUCKET_HEIGHT, SMALLER_THAN_BUCKET = "bucket_width", "bucket_height", "smaller_than_bucket"
CROP_TOP, CROP_LEFT = "crop_top", "crop_left"
BUCKET_COLUMNS = (BUCKET_WIDTH, BUCKET_HEIGHT, SMALLER_THAN_BUCKET)
SDXL_BASE = 1024
STEP = 64

# The published table, as (height, width) in its order: 512x2048 (aspect 0.25) ... 1024x1024 ... 2048x512 (4.0).
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


class Geometry(NamedTuple):
    """How an image becomes its bucket: scaled to (scaled_width, scaled_height), then cropped at (top, left)."""
    bucket_width: int
    bucket_height: int
    scaled_width: int
    scaled_height: int
    crop_top: int
    crop_left: int
    smaller_than_bucket: bool  # covering the bucket would need an upscale


@cache
def bucket_list(base: int = SDXL_BASE) -> tuple[tuple[int, int], ...]:
    """(width, height) of every bucket at this base size, in the published order."""
    if base == SDXL_BASE:
        return tuple((width, height) for height, width in SDXL_BUCKETS)
    found: dict[tuple[int, int], None] = {}
    for height, width in SDXL_BUCKETS:
        sides = [max(STEP, math.floor(side * base / SDXL_BASE / STEP + 0.5) * STEP) for side in (width, height)]
        found.setdefault((sides[0], sides[1]), None)
    return tuple(found)


@cache
def _log_ratios(base: int) -> np.ndarray:
    return np.array([math.log(width / height) for width, height in bucket_list(base)])


def nearest_bucket(width: int, height: int, base: int = SDXL_BASE) -> tuple[int, int]:
    """The bucket nearest by log aspect ratio (ties: the first in the list)."""
    index = int(np.argmin(np.abs(_log_ratios(base) - math.log(width / height))))
    return bucket_list(base)[index]


def cover_geometry(width: int, height: int, bucket: tuple[int, int]) -> Geometry:
    """Scale to cover the bucket and crop the centre; never upscale: a smaller image keeps its size, uncropped."""
    bucket_width, bucket_height = bucket
    scale = max(bucket_width / width, bucket_height / height)
    if scale > 1:
        return Geometry(bucket_width, bucket_height, width, height, 0, 0, True)
    scaled_width = max(bucket_width, round(width * scale))
    scaled_height = max(bucket_height, round(height * scale))
    return Geometry(bucket_width, bucket_height, scaled_width, scaled_height, (scaled_height - bucket_height) // 2,
                    (scaled_width - bucket_width) // 2, False)


class BucketResizer:
    """resize_mode "bucket", called as img2dataset's Resizer: (jpeg, width, height, orig width, orig height, error)."""

    def __init__(self, base: int, quality: int = 95) -> None:
        self.base, self.quality = base, quality

    def __call__(self, stream: Any) -> tuple[Any, ...]:
        import cv2

        try:
            cv2.setNumThreads(1)
            image = cv2.imdecode(np.frombuffer(stream.read(), np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise ValueError("Image decoding error")
            if image.ndim == 3 and image.shape[-1] == 4:  # alpha on white, as img2dataset's Resizer does
                alpha = image[:, :, 3, np.newaxis]
                image = np.rint((alpha / 255 * image[..., :3] + 255 - alpha).clip(0, 255)).astype(np.uint8)
            original_height, original_width = image.shape[:2]
            shape = cover_geometry(original_width, original_height,
                                   nearest_bucket(original_width, original_height, self.base))
            if not shape.smaller_than_bucket:
                if (shape.scaled_width, shape.scaled_height) != (original_width, original_height):
                    image = cv2.resize(image, (shape.scaled_width, shape.scaled_height), interpolation=cv2.INTER_AREA)
                image = image[shape.crop_top:shape.crop_top + shape.bucket_height,
                              shape.crop_left:shape.crop_left + shape.bucket_width]
            height, width = image.shape[:2]
            encoded = cv2.imencode(".jpg", image, params=[int(cv2.IMWRITE_JPEG_QUALITY), self.quality])[1].tobytes()
            return encoded, width, height, original_width, original_height, None
        except Exception as error:  # a row error is a value, as in img2dataset's Resizer
            return None, None, None, None, None, str(error)


def crop_columns(resize_mode: str, base: int, original_width: int, original_height: int,
                 image_size: int = SDXL_BASE) -> dict[str, int | None]:
    """crop_top/crop_left of a stored image, SDXL's crop_coords_top_left as diffusers' train_text_to_image_sdxl.py
    computes it: pixels cut off the top and left of the image scaled for the crop (not of the original), i.e. where
    the stored image starts in the scaled one. bucket: the cover crop; center_crop: img2dataset's (albumentations'
    centre crop of the image whose shorter side was scaled to image_size, (side - image_size) // 2; nothing when the
    image was no larger: resize_only_if_bigger); 0 for the modes that never crop (border pads, it does not crop)."""
    if resize_mode == "bucket":
        shape = cover_geometry(original_width, original_height,
                               nearest_bucket(original_width, original_height, base))
        return {CROP_TOP: shape.crop_top, CROP_LEFT: shape.crop_left}
    if resize_mode == "center_crop":
        scaled = planned_size(original_width, original_height, image_size, resize_mode)
        if scaled is None:
            return {CROP_TOP: 0, CROP_LEFT: 0}
        return {CROP_TOP: max((scaled[1] - image_size) // 2, 0), CROP_LEFT: max((scaled[0] - image_size) // 2, 0)}
    return {CROP_TOP: 0, CROP_LEFT: 0}


def add_buckets(table: pa.Table, base: int) -> pa.Table:
    """bucket_width, bucket_height (nearest to the stored image's aspect) and smaller_than_bucket (needs upscaling)."""
    widths = table[STORED_WIDTH].to_pylist()
    heights = table[STORED_HEIGHT].to_pylist()
    buckets = [nearest_bucket(w, h, base) if w and h else None for w, h in zip(widths, heights, strict=True)]
    smaller = [None if b is None else bool(w < b[0] or h < b[1]) for b, w, h in zip(buckets, widths, heights,
                                                                                     strict=True)]
    table = table.drop_columns([c for c in BUCKET_COLUMNS if c in table.column_names])
    return (table.append_column(BUCKET_WIDTH, pa.array([b and b[0] for b in buckets], pa.int32()))
            .append_column(BUCKET_HEIGHT, pa.array([b and b[1] for b in buckets], pa.int32()))
            .append_column(SMALLER_THAN_BUCKET, pa.array(smaller, pa.bool_())))


def bucket_name(width: int, height: int) -> str:
    return f"{width}x{height}"


def bucket_counts(table: pa.Table) -> dict[int, dict[str, int]]:
    """{shard: {"WxH": samples}} of the placed samples (shard >= 0), for index.json."""
    placed = table.filter(pc.greater_equal(table[SHARD], 0))
    counts: dict[int, dict[str, int]] = {}
    grouped = placed.group_by([SHARD, BUCKET_WIDTH, BUCKET_HEIGHT]).aggregate([(SHARD, "count")])
    for row in grouped.to_pylist():
        counts.setdefault(row[SHARD], {})[bucket_name(row[BUCKET_WIDTH], row[BUCKET_HEIGHT])] = row[f"{SHARD}_count"]
    return {shard: dict(sorted(found.items())) for shard, found in counts.items()}
