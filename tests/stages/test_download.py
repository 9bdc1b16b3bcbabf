"""The download stage's image path: one decode at the size needed, img2dataset's Resizer as the reference, clean
JPEGs kept byte for byte, and the worker counts a default run gets."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from bench.corpus import photo_like
from curate.config import Config, download_workers
from curate.stages.download import DownloadOptions, process_body, resizer_for
from curate.stages.images import decode, planned_size, prepare

# Agreement with img2dataset's Resizer, in 8-bit levels over the decoded outputs: with DCT scaling (target at most
# half the original), mean |diff| <= 2.5 and max <= 48; a factor of at most 2 left after the full decode is bilinear
# where the Resizer's filter is area, mean <= 4 and max <= 48; a factor past 2 is the same area resize, mean <= 1
# (the resized pixels are OpenCV's in both; the encoders part: libjpeg-turbo's TurboJPEG at q95 4:2:0 lands 0.8-1.2
# levels from OpenCV's and Pillow's libjpeg path, 38.9 against 39.1 dB PSNR to the source, measured).
DCT_MEAN, DCT_MAX, PLAIN_MEAN = 2.5, 48, 1.0
BILINEAR_MEAN, BILINEAR_MAX = 4.0, 48


def jpeg_of(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)


@pytest.mark.parametrize(("width", "height", "size", "mode", "scaled"), [
    (900, 700, 256, "keep_ratio", True), (1800, 1300, 256, "keep_ratio", True), (700, 1300, 256, "keep_ratio", True),
    (1200, 800, 512, "border", True), (1300, 900, 300, "keep_ratio_largest", True),
    (1200, 800, 512, "center_crop", False), (1000, 760, 600, "keep_ratio", False),
])
def test_outputs_agree_with_img2dataset_resizer(width: int, height: int, size: int, mode: str, scaled: bool) -> None:
    difference = difference_from_resizer(jpeg_of(photo_like(width, height, seed=width + height), quality=85),
                                         DownloadOptions(image_size=size, resize_mode=mode), (width, height))
    if scaled:
        assert difference.mean() <= DCT_MEAN and difference.max() <= DCT_MAX, (difference.mean(), difference.max())
    else:  # 1.56 and 1.27 left after a full decode: bilinear
        assert difference.mean() <= BILINEAR_MEAN and difference.max() <= BILINEAR_MAX, (difference.mean(),
                                                                                         difference.max())


def difference_from_resizer(body: bytes, options: DownloadOptions, original: tuple[int, int]) -> np.ndarray:
    """|ours - img2dataset's Resizer| per pixel and channel, both stored images decoded; sizes checked equal."""
    ours = process_body(body, options)
    jpeg, stored_width, stored_height, original_width, original_height, problem = resizer_for(options)(
        io.BytesIO(prepare(body).body))
    assert problem is None and ours["status"] == "success"
    assert (ours["stored_width"], ours["stored_height"]) == (stored_width, stored_height)
    assert (ours["original_width"], ours["original_height"]) == (original_width, original_height) == original
    return np.abs(pixels(ours["jpg"]) - pixels(jpeg))


@pytest.mark.parametrize(("width", "height", "size"), [
    (700, 530, 512), (1500, 1200, 1024), (1000, 760, 600), (1839, 1386, 1024), (2000, 1638, 1024), (1200, 640, 330),
])
@pytest.mark.parametrize("quality", [75, 95])
def test_the_bilinear_downscale_agrees_with_img2dataset_resizer(width: int, height: int, size: int,
                                                                quality: int) -> None:
    """Factors 1.04 to 1.94 left after a full decode (no DCT scale covers the target): OpenCV's bilinear where the
    Resizer's filter is area (~3 ms against ~25 ms at 1.5-2 MP). On these grainy photo-like JPEGs (the worst case
    for an interpolation; the fine grain is where the two filters part) measured with OpenCV 4.14 and Pillow 13:
    mean |diff| 0.8-3.4 levels (growing with the factor), max 11-35, 99.9th percentile <= 18; held to mean <= 4
    and max <= 48 (the DCT path's max). A factor past 2 stays area: the next test."""
    body = jpeg_of(photo_like(width, height, seed=width + quality), quality=quality)
    difference = difference_from_resizer(body, DownloadOptions(image_size=size), (width, height))
    assert difference.mean() <= BILINEAR_MEAN and difference.max() <= BILINEAR_MAX, (difference.mean(),
                                                                                     difference.max())


def test_a_factor_past_two_is_the_resizers_own_area_resize() -> None:
    """A PNG (no DCT scaling) shrunk 3.5 times: OpenCV's INTER_AREA as in the Resizer (identical before the
    encode)."""
    buffer = io.BytesIO()
    photo_like(1200, 900, seed=5).save(buffer, "PNG")
    difference = difference_from_resizer(buffer.getvalue(), DownloadOptions(image_size=256), (1200, 900))
    assert difference.mean() <= PLAIN_MEAN, difference.mean()


def test_the_jpeg_is_decoded_at_the_smallest_dct_scale_that_covers_the_target() -> None:
    body = jpeg_of(photo_like(2000, 1600, seed=1), quality=80)
    plan = lambda w, h: planned_size(w, h, 256, "keep_ratio")  # noqa: E731 - a one-line plan
    decoded = decode(body, plan)
    assert (decoded.original_width, decoded.original_height) == (2000, 1600) and decoded.size == (320, 256)
    assert decoded.pixels.shape == (400, 500, 3)  # 1/4: 1/8 (250 x 200) would not cover 320 x 256
    assert decode(body, lambda w, h: planned_size(w, h, 1200, "keep_ratio")).pixels.shape == (1600, 2000, 3)
    assert decode(body, lambda w, h: planned_size(w, h, 800, "keep_ratio")).pixels.shape == (800, 1000, 3)  # 1/2
    clean_keep = decode(jpeg_of(photo_like(400, 300, seed=3), quality=90), lambda w, h: None)
    assert clean_keep.clean_jpeg and clean_keep.pixels.shape == (38, 50, 3)  # 1/8: only the check and the pHash


def test_a_clean_jpeg_within_the_size_is_stored_byte_for_byte() -> None:
    image = photo_like(400, 300, seed=2)
    for body in (jpeg_of(image, quality=90), jpeg_of(image, quality=90, progressive=True)):
        row = process_body(body, DownloadOptions(image_size=512))
        assert row["status"] == "success" and row["jpg"] == body
        assert (row["stored_width"], row["stored_height"]) == (400, 300)
    larger = process_body(jpeg_of(image), DownloadOptions(image_size=256))
    assert (larger["stored_width"], larger["stored_height"]) == (341, 256)


def test_an_oriented_jpeg_is_reencoded_upright() -> None:
    image = Image.new("RGB", (120, 60), (255, 0, 0))
    image.paste((0, 0, 255), (60, 0, 120, 60))  # left red, right blue
    exif = image.getexif()
    exif[0x0112] = 6  # shown turned a quarter clockwise: red on top
    body = jpeg_of(image, exif=exif, quality=95)
    row = process_body(body, DownloadOptions(image_size=512))
    assert row["jpg"] != body and (row["stored_width"], row["stored_height"]) == (60, 120)
    upright = pixels(row["jpg"])
    assert upright[:30].mean((0, 1))[0] > 200 and upright[-30:].mean((0, 1))[2] > 200


def test_the_scaled_decode_rejects_exactly_the_corruptions_a_full_decode_rejects() -> None:
    """Overwritten spans in the scan, the EOI marker kept: the kind that defeated an end-marker shortcut before."""
    rejected, checked = 0, 0
    for seed in range(12):
        body = jpeg_of(photo_like(640, 480, seed=seed), quality=90)
        rng = np.random.default_rng(seed)
        for _ in range(4):
            start, span = int(rng.integers(len(body) // 4, len(body) - 200)), int(rng.integers(4, 64))
            bad = body[:start] + rng.integers(0, 256, span, dtype=np.uint8).tobytes() + body[start + span:]
            try:
                Image.open(io.BytesIO(bad)).load()
                whole = True
            except Exception:  # noqa: BLE001 - any failure of the full decode is a rejection
                whole = False
            rejected += not whole
            for size in (64, 1024):  # a 1/8-scale decode, and the byte-for-byte keep's 1/8-scale check
                checked += 1
                assert (process_body(bad, DownloadOptions(image_size=size))["status"] == "success") is whole
    assert rejected > 0 and checked == 96


def test_a_default_run_uses_the_usable_cores() -> None:
    cores = len(os.sched_getaffinity(0))
    processes, threads = download_workers(Config())
    assert processes == cores and 8 <= threads <= 32 and (processes * threads <= 256 or threads == 8)
    assert download_workers(Config(processes=3, threads=5)) == (3, 5)
    assert download_workers(Config(processes=64)) == (64, 8)
    with pytest.raises(ValueError, match="--processes"):
        Config(processes=0).validate()


def test_a_jpeg_libjpeg_turbo_only_warns_about_is_kept_as_pillow_keeps_it() -> None:
    """The fast decode treats any libjpeg-turbo warning as a failure; Pillow, which only fails on errors and short
    data, then decides: stray bytes before the end marker (common on the web) keep the image."""
    body = jpeg_of(photo_like(600, 450, seed=4), quality=90)
    stray = body[:-2] + b"\x00\x00" + body[-2:]
    assert decode(body, lambda w, h: (300, 225)).pixels.shape == (225, 300, 3)
    with pytest.raises(ValueError, match="extraneous"):
        simplejpeg.decode_jpeg(stray, strict=True)
    for size in (256, 1024):
        row, clean = process_body(stray, DownloadOptions(image_size=size)), process_body(body, DownloadOptions(
            image_size=size))
        assert row["status"] == clean["status"] == "success"
        assert (row["stored_width"], row["stored_height"]) == (clean["stored_width"], clean["stored_height"])
        assert np.abs(pixels(row["jpg"]) - pixels(clean["jpg"])).max() <= 2


def _gray_copies() -> list[Image.Image]:
    """Grayscale copies of the kinds the download hashes: photo-like, noise, gradients, flat (every DCT term but one
    zero, so the median ties), tiny and odd-sized."""
    rng = np.random.default_rng(7)
    copies = [photo_like(w, h, seed).convert("L") for seed, (w, h) in enumerate([(256, 171), (140, 200), (255, 255)])]
    copies += [Image.fromarray(rng.integers(0, 256, (h, w), np.uint8)) for w, h in [(128, 128), (200, 131), (33, 9)]]
    copies += [Image.fromarray(np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))) for w, h in [(160, 90)]]
    copies += [Image.new("L", (128, 128), 200), Image.new("L", (1, 1), 0), Image.new("L", (32, 32), 255)]
    return copies


def test_phash_of_is_imagehash_phash_bit_for_bit() -> None:
    import imagehash  # a dev dependency: the reference

    from curate.stages.download import phash_of

    for gray in _gray_copies():
        value = int(str(imagehash.phash(gray)), 16)
        assert phash_of(gray) == (value - (1 << 64) if value >= 1 << 63 else value), gray.size
