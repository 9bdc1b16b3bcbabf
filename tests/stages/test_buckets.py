"""Aspect buckets against the SDXL paper's table; the bucket resize never upscales and records its crop."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.stages.buckets import add_buckets, bucket_list, cover_geometry, nearest_bucket
from curate.stages.download import DownloadOptions, process_body

# SDXL paper, appendix "multi-aspect training": height, width, aspect ratio as printed (ratio = height / width).
PUBLISHED = """
512 2048 0.25; 512 1984 0.26; 512 1920 0.27; 512 1856 0.28; 576 1792 0.32; 576 1728 0.33; 576 1664 0.35;
640 1600 0.4; 640 1536 0.42; 704 1472 0.48; 704 1408 0.5; 704 1344 0.52; 768 1344 0.57; 768 1280 0.6;
832 1216 0.68; 832 1152 0.72; 896 1152 0.78; 896 1088 0.82; 960 1088 0.88; 960 1024 0.94; 1024 1024 1.0;
1024 960 1.07; 1088 960 1.13; 1088 896 1.21; 1152 896 1.29; 1152 832 1.38; 1216 832 1.46; 1280 768 1.67;
1344 768 1.75; 1408 704 2.0; 1472 704 2.09; 1536 640 2.4; 1600 640 2.5; 1664 576 2.89; 1728 576 3.0;
1792 576 3.11; 1856 512 3.62; 1920 512 3.75; 1984 512 3.88; 2048 512 4.0
"""
TABLE = [tuple(float(v) for v in entry.split()) for entry in PUBLISHED.replace("\n", " ").split(";")]


def test_the_list_is_the_published_table():
    assert len(TABLE) == 40
    assert bucket_list(1024) == tuple((int(w), int(h)) for h, w, _ in TABLE)
    for height, width, ratio in TABLE:
        assert round(height / width, 2) == pytest.approx(ratio, abs=0.011)
        assert width % 64 == 0 and height % 64 == 0 and 0.9 * 1024**2 <= width * height <= 1024**2


@pytest.mark.parametrize("aspect", np.exp(np.linspace(math.log(0.2), math.log(5.0), 97)).tolist())
def test_nearest_bucket_by_log_aspect_ratio(aspect):
    width, height = round(1000 * aspect), 1000
    distances = [abs(math.log(width / height) - math.log(w / h)) for _, (h, w, _) in enumerate(TABLE)]
    best = min(range(len(TABLE)), key=lambda i: (distances[i], i))
    assert nearest_bucket(width, height) == (int(TABLE[best][1]), int(TABLE[best][0]))


@pytest.mark.parametrize(("size", "bucket"), [((1000, 1000), (1024, 1024)), ((1920, 1080), (1344, 768)),
                                              ((1600, 1200), (1152, 896)), ((1500, 1000), (1216, 832)),
                                              ((1000, 1500), (832, 1216)), ((5000, 1000), (2048, 512))])
def test_common_photo_shapes(size, bucket):
    assert nearest_bucket(*size) == bucket


def test_other_base_sizes_keep_the_shape_of_the_list():
    small = bucket_list(512)
    assert (512, 512) in small and len(small) == len(set(small)) > 20
    for width, height in small:
        assert width % 64 == 0 and height % 64 == 0 and 0.75 * 512**2 <= width * height <= 1.2 * 512**2
    assert nearest_bucket(1920, 1080, 512) in small


def test_cover_geometry_never_upscales():
    rng = np.random.default_rng(0)
    for width, height in rng.integers(100, 3000, size=(300, 2)).tolist():
        bucket = nearest_bucket(width, height)
        shape = cover_geometry(width, height, bucket)
        if width < bucket[0] or height < bucket[1]:
            assert shape.smaller_than_bucket and (shape.scaled_width, shape.scaled_height) == (width, height)
            assert (shape.crop_top, shape.crop_left) == (0, 0)
            continue
        assert shape.scaled_width <= width and shape.scaled_height <= height
        assert shape.scaled_width >= bucket[0] and shape.scaled_height >= bucket[1]
        assert shape.crop_left == (shape.scaled_width - bucket[0]) // 2
        assert shape.crop_top == (shape.scaled_height - bucket[1]) // 2
        assert shape.scaled_width == bucket[0] or shape.scaled_height == bucket[1]  # only one side is cropped


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def test_bucket_resize_crops_the_centre_and_records_it():
    # 1560x1000 lies between buckets: 1216x832 wins, scaled to 1298x832, 41 px cropped from the left (49 original).
    image = Image.new("RGB", (1560, 1000), (128, 128, 128))
    image.paste((255, 0, 0), (0, 0, 45, 1000))  # a red band the crop removes
    image.paste((0, 0, 255), (45, 0, 1560, 10))  # a blue top band no crop touches
    row = process_body(_png(image), DownloadOptions(resize_mode="bucket"))
    assert row["status"] == "success"
    assert (row["stored_width"], row["stored_height"]) == (1216, 832)
    assert (row["original_width"], row["original_height"]) == (1560, 1000)
    assert (row["crop_top"], row["crop_left"]) == (0, 41)
    stored = np.asarray(Image.open(io.BytesIO(row["jpg"])).convert("RGB")).astype(int)
    assert stored.shape == (832, 1216, 3)
    assert abs(stored[400, 0] - [128, 128, 128]).max() < 12  # the red band is gone
    assert stored[2, 600, 2] > 200 and stored[2, 600, 0] < 40  # the top is still there


def test_bucket_resize_keeps_a_small_image_and_says_so():
    image = Image.new("RGB", (800, 600), (10, 200, 30))
    row = process_body(_png(image), DownloadOptions(resize_mode="bucket"))
    assert (row["stored_width"], row["stored_height"]) == (800, 600)
    assert (row["crop_top"], row["crop_left"]) == (0, 0)
    table = add_buckets(pa.table({"stored_width": pa.array([800, 1152, None], pa.int32()),
                                  "stored_height": pa.array([600, 896, None], pa.int32())}), 1024)
    assert table["bucket_width"].to_pylist() == [1152, 1152, None]
    assert table["bucket_height"].to_pylist() == [896, 896, None]
    assert table["smaller_than_bucket"].to_pylist() == [True, False, None]


def test_other_modes_record_no_crop():
    image = Image.new("RGB", (700, 500), (10, 200, 30))
    row = process_body(_png(image), DownloadOptions(resize_mode="keep_ratio", image_size=256))
    assert (row["crop_top"], row["crop_left"]) == (0, 0) and row["stored_height"] == 256
