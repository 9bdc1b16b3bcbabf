"""The download stage for images already stored in tars: the same checks, resize and columns as a fetch.

A clean JPEG that needs no resize (no EXIF rotation, RGB or grayscale) is kept byte for byte: a second JPEG
generation would only cost quality.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.images import DecodeError, prepare
from curate.schema import (
    DOWNLOAD_BYTES,
    JPG,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PHASH,
    SHA256,
    STATUS,
    STORED_HEIGHT,
    STORED_WIDTH,
    TAR_OFFSET,
    TAR_PATH,
    TAR_SIZE,
)
from curate.stages.download import (
    SUCCESS,
    DownloadOptions,
    phash_of,
    process_body,
    resizer_for,
    with_download_results,
)
from curate.stages.verdict import alive, with_verdict_columns
from curate.webdataset_input import read_stored

EXIF_ORIENTATION = 0x0112
# img2dataset measured the image before it resized it: that is the true original size.
SOURCE_ORIGINAL = {ORIGINAL_WIDTH: "source_original_width", ORIGINAL_HEIGHT: "source_original_height"}


def keeps_bytes(body: bytes, result: dict[str, Any]) -> bool:
    """A JPEG stored at its own size, upright and in RGB or L: its bytes are the output as they are."""
    if result.get(STATUS) != SUCCESS or not body.startswith(b"\xff\xd8"):
        return False
    if (result[STORED_WIDTH], result[STORED_HEIGHT]) != (result[ORIGINAL_WIDTH], result[ORIGINAL_HEIGHT]):
        return False
    with Image.open(io.BytesIO(body)) as image:  # the header only
        return image.format == "JPEG" and image.mode in ("RGB", "L") and \
            image.getexif().get(EXIF_ORIENTATION, 1) == 1


def fits_as_is(body: bytes, options: DownloadOptions) -> tuple[int, int] | None:
    """(width, height) of a clean upright JPEG the resize mode would leave at its size, from its header; else None."""
    if not body.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(body)) as image:
            clean = image.format == "JPEG" and image.mode == "RGB" and image.getexif().get(EXIF_ORIENTATION, 1) == 1
            width, height = image.size
    except Exception:  # noqa: BLE001 - anything odd takes the full path, which reports it
        return None
    side = {"keep_ratio": min(width, height), "keep_ratio_largest": max(width, height), "no": 0}.get(
        options.resize_mode)
    return (width, height) if clean and side is not None and side <= options.image_size else None


def decode_one(body: bytes | None, options: DownloadOptions) -> dict[str, Any]:
    if body is None:
        return {STATUS: "truncated", "error": "the image member runs past the end of its tar"}
    size = fits_as_is(body, options)
    if size is not None:  # no resize, no re-encode: the one decode checks the bytes and gives the pHash
        row: dict[str, Any] = {DOWNLOAD_BYTES: len(body), SHA256: hashlib.sha256(body).hexdigest()}
        try:
            prepared = prepare(body)
        except DecodeError as error:
            return {**row, STATUS: error.reason, "error": str(error)}
        return {**row, STATUS: SUCCESS, JPG: body, PHASH: phash_of(prepared.gray), ORIGINAL_WIDTH: size[0],
                ORIGINAL_HEIGHT: size[1], STORED_WIDTH: size[0], STORED_HEIGHT: size[1]}
    result = process_body(body, options)
    if keeps_bytes(body, result):
        result[JPG] = body
    return result


def decode_stored(table: pa.Table, options: DownloadOptions) -> pa.Table:
    """Add the download columns to rows whose image lies in an input tar; rows already flagged are not read."""
    table = with_verdict_columns(table)
    todo = [i for i, go in enumerate(alive(table).to_pylist()) if go]
    results: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
    if todo:
        located = table.take(pa.array(todo, pa.int64()))
        bodies = read_stored(located[TAR_PATH].to_pylist(), located[TAR_OFFSET].to_pylist(),
                             located[TAR_SIZE].to_pylist())
        resizer_for(options)  # load img2dataset's resizer once, before the threads need it
        with ThreadPoolExecutor(max_workers=max(1, min(options.threads, len(todo)))) as pool:
            for i, result in zip(todo, pool.map(lambda body: decode_one(body, options), bodies), strict=True):
                results[i] = result
    table = with_download_results(table, results)
    for ours, theirs in SOURCE_ORIGINAL.items():
        if theirs in table.column_names:
            claimed = pc.cast(table[theirs], pa.int32(), safe=False)
            usable = pc.and_(pc.is_valid(table[ours]), pc.greater(pc.fill_null(claimed, 0), 0))
            table = table.set_column(table.column_names.index(ours), ours,
                                     pc.if_else(usable, claimed, table[ours]))
    return table
