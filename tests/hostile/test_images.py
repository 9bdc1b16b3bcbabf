"""Hostile and unusual image bodies: each decodes faithfully or becomes a ledger row with a clear reason."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from curate.stages.images import DecodeError, prepare
from curate.testing.server import ImageServer, Response
from tests.hostile.conftest import encode, outcomes, picture, png_declaring, png_rgba16, row, run_rows, serve


def two_colour(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: shows which way an image was turned."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2:] = (0, 0, 255)
    return Image.fromarray(pixels)


def rotated_jpeg() -> bytes:
    """Stored 120 x 60, EXIF orientation 6: shown upright as 60 x 120 with red on top."""
    image = two_colour(120, 60)
    exif = image.getexif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif, quality=95)


def image_cases() -> dict[str, tuple[bytes, str]]:
    """name -> (body, expected outcome)."""
    base = picture(96, 64, seed=11)
    whole = encode(base)
    sixteen = (np.arange(64 * 96, dtype=np.uint32).reshape(64, 96) * 10 % 65536).astype(np.uint16)
    rgba16 = np.zeros((64, 96, 4), np.uint16)
    rgba16[..., 3] = np.linspace(0, 65535, 96, dtype=np.uint16)
    frames = [picture(96, 64, seed=s).convert("P") for s in (12, 13)]
    return {
        "jpeg": (whole, "kept"),
        "truncated jpeg": (whole[: len(whole) // 2], "decode_failed"),
        "zero bytes": (b"", "empty_body"),
        "html as jpg": (b"<!DOCTYPE html><html><body>404</body></html>", "decode_failed"),
        "bomb 50000x50000": (png_declaring(50_000, 50_000), "decompression_bomb"),
        "cmyk jpeg": (encode(picture(96, 64, seed=14).convert("CMYK")), "kept"),
        "16-bit png": (encode(Image.fromarray(sixteen), "PNG"), "kept"),
        "16-bit rgba png, transparent": (png_rgba16(rgba16), "kept"),
        "palette png with transparency": (encode(picture(96, 64, seed=15).convert("P"), "PNG", transparency=0),
                                          "kept"),
        "grayscale jpeg": (encode(picture(96, 64, seed=16).convert("L")), "kept"),
        "animated gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "kept"),
        "multi-page tiff": (encode(picture(96, 64, seed=17), "TIFF", save_all=True,
                                   append_images=[picture(32, 32, seed=18)]), "kept"),
        "webp": (encode(picture(96, 64, seed=19), "WEBP"), "kept"),
        "heic": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "decode_failed"),
        "exif rotated": (rotated_jpeg(), "kept"),
        "1x1": (encode(picture(1, 1, seed=20), "PNG"), "kept"),
        "1x10000": (encode(picture(1, 10_000, seed=21), "PNG"), "kept"),
    }


def test_every_image_case_ends_with_its_reason(tmp_path: Path, server: ImageServer) -> None:
    cases = image_cases()
    names = list(cases)
    rows = [row(serve(server, f"/{i}.img", Response(body)), name) for i, (name, (body, _)) in
            enumerate(cases.items())]
    result = run_rows(tmp_path, rows)
    got = outcomes(result, rows)
    wrong = {names[i]: (cases[names[i]][1], got[i]) for i in range(len(rows)) if got[i] != cases[names[i]][1]}
    assert not wrong, f"{len(rows) - len(wrong)} of {len(rows)} right; wrong (expected, got): {wrong}"
    details = {r["detail"] for r in result["ledger"].to_pylist()}
    assert any("DecompressionBombError" in d for d in details)
    assert any("HEIC" in d for d in details) and any("HTML" in d for d in details)
    check_stored_samples(result["out"], result["samples"].to_pylist())


def check_stored_samples(out: Path, samples: list[dict]) -> None:
    """Every stored image is an RGB JPEG of the reported size; the EXIF-rotated one is upright."""
    by_caption = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
        for sample in samples:
            if f"{sample['key']}.jpg" in members:
                by_caption[members[f"{sample['key']}.txt"].decode()] = (sample, members[f"{sample['key']}.jpg"])
    for caption, (sample, data) in by_caption.items():
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "JPEG" and image.mode == "RGB", caption
            assert image.size == (sample["stored_width"], sample["stored_height"]), caption
    sample, data = by_caption["exif rotated"]
    assert (sample["original_width"], sample["original_height"]) == (60, 120)
    upright = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int32)
    top, bottom = upright[: upright.shape[0] // 4].mean((0, 1)), upright[-upright.shape[0] // 4:].mean((0, 1))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (top, bottom)
    assert by_caption["1x10000"][0]["original_height"] == 10_000


def test_sixteen_bit_alpha_is_composited_on_white() -> None:
    """img2dataset scales 16-bit alpha as if it were 8-bit; a fully transparent 16-bit pixel must come out white."""
    pixels = np.zeros((8, 8, 4), np.uint16)
    pixels[:, 4:, 3] = 32768  # black, fully transparent on the left, half transparent on the right
    prepared = Image.open(io.BytesIO(prepare(png_rgba16(pixels)).body)).convert("RGB")
    assert prepared.getpixel((0, 0)) == (255, 255, 255)
    assert all(abs(v - 127) <= 2 for v in prepared.getpixel((7, 0)))
    gray16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    assert Image.open(io.BytesIO(prepare(encode(gray16, "PNG")).body)).convert("RGB").getpixel((0, 0)) == (255,) * 3


def test_decode_errors_are_values_not_crashes() -> None:
    for body in (b"\xff\xd8\xff", b"GIF89a", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", bytes(range(256))):
        try:
            prepare(body)
        except DecodeError as error:
            assert error.reason == "decode_failed" and str(error)


def test_samples_parquet_reports_the_size_after_rotation(tmp_path: Path, server: ImageServer) -> None:
    rows = [row(serve(server, "/r.jpg", Response(rotated_jpeg())), "turned")]
    result = run_rows(tmp_path, rows)
    sample = pq.read_table(result["out"] / "samples.parquet").to_pylist()[0]
    assert (sample["original_width"], sample["original_height"]) == (60, 120)
