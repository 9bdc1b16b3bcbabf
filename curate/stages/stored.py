"""The download stage for images already stored in tars: the same checks, resize and columns as a fetch."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import (
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    STATUS,
    TAR_OFFSET,
    TAR_PATH,
    TAR_SIZE,
)
from curate.stages.buckets import CROP_LEFT, CROP_TOP
from curate.stages.consent import not_checked
from curate.stages.download import (
    DownloadOptions,
    bbox_values,
    process_body,
    resizer_for,
    with_download_results,
)
from curate.stages.verdict import alive, with_verdict_columns
from curate.wds.reader import read_stored

# img2dataset measured the image before it resized it: that is the true original size.
SOURCE_ORIGINAL = {ORIGINAL_WIDTH: "source_original_width", ORIGINAL_HEIGHT: "source_original_height"}
CHUNK_ROWS = 64  # rows per slice of decode_stored_chunks: tens of megabytes of stored photos
# Decoding is all CPU, no network wait: a few threads keep a core busy (the GIL-free decode overlaps the rest);
# the download's dozens only add switching.
THREADS = 4


def decode_one(body: bytes | None, options: DownloadOptions, boxes: Any = None) -> dict[str, Any]:
    if body is None:
        return {**not_checked(), STATUS: "truncated", "error": "the image member runs past the end of its tar"}
    # Stored input was fetched by someone else: no origin file or response header of ours to check.
    return {**not_checked(), **process_body(body, options, boxes)}  # a clean JPEG that needs no resize comes back as is


def decode_stored(table: pa.Table, options: DownloadOptions) -> pa.Table:
    """Add the download columns to rows whose image lies in an input tar; rows already flagged are not read."""
    return pa.concat_tables(decode_stored_chunks(table, options))


def decode_stored_chunks(table: pa.Table, options: DownloadOptions, rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    """decode_stored(table) as consecutive slices of `rows` rows (one at least, for an empty table): memory holds
    one slice's images, not a part's (a 500-row part of 1 MB photos is 500 MB, and its copies as many again)."""
    table = with_verdict_columns(table)
    go = alive(table).to_pylist()
    if options.resize_mode == "bucket" and any(go):
        resizer_for(options)  # load the resizer once, before the threads need it
    with ThreadPoolExecutor(max_workers=max(1, min(options.threads, THREADS, sum(go)))) as pool:
        for start in range(0, max(table.num_rows, 1), rows):
            piece = table.slice(start, rows)
            todo = [i for i, live in enumerate(go[start:start + rows]) if live]
            results: list[dict[str, Any]] = [{} for _ in range(piece.num_rows)]
            if todo:
                located = piece.take(pa.array(todo, pa.int64()))
                bodies = read_stored(located[TAR_PATH].to_pylist(), located[TAR_OFFSET].to_pylist(),
                                     located[TAR_SIZE].to_pylist())
                boxes = bbox_values(located, options)  # --bbox-column's values, with --blur-faces
                decoded = pool.map(lambda pair: decode_one(pair[0], options, pair[1]), zip(bodies, boxes, strict=True))
                for i, result in zip(todo, decoded, strict=True):
                    results[i] = result
                del bodies
            yield _with_results(piece, results)


def _with_results(piece: pa.Table, results: list[dict[str, Any]]) -> pa.Table:
    piece = _unknown_crops(with_download_results(piece, results))
    for ours, theirs in SOURCE_ORIGINAL.items():
        if theirs in piece.column_names:
            claimed = pc.cast(piece[theirs], pa.int32(), safe=False)
            usable = pc.and_(pc.is_valid(piece[ours]), pc.greater(pc.fill_null(claimed, 0), 0))
            piece = piece.set_column(piece.column_names.index(ours), ours,
                                     pc.if_else(usable, claimed, piece[ours]))
    return piece


def _unknown_crops(piece: pa.Table) -> pa.Table:
    """crop_top/crop_left null where the tar's image has another aspect than the original its json claims: the tool
    that wrote it cropped or padded it (img2dataset's center_crop or border) and recorded no crop, so the SDXL crop
    from the original is unknown. The same aspect within rounding (a keep_ratio resize) keeps the crop computed here:
    SDXL's crop is in the coordinates of the image scaled for it, which scaling the stored image instead reaches too."""
    if not all(name in piece.column_names for name in (*SOURCE_ORIGINAL.values(), CROP_TOP, CROP_LEFT)):
        return piece
    claimed = [pc.fill_null(pc.cast(piece[SOURCE_ORIGINAL[side]], pa.float64(), safe=False), 0).to_numpy()
               for side in (ORIGINAL_WIDTH, ORIGINAL_HEIGHT)]
    decoded = [pc.fill_null(pc.cast(piece[side], pa.float64()), 0).to_numpy() for side in (ORIGINAL_WIDTH,
                                                                                           ORIGINAL_HEIGHT)]
    # w = round(W s), h = round(H s) keeps |W h - H w| within (W + H) / 2
    skew = np.abs(claimed[0] * decoded[1] - claimed[1] * decoded[0])
    unknown = (claimed[0] > 0) & (claimed[1] > 0) & (decoded[0] > 0) & (skew > (claimed[0] + claimed[1]) / 2 + 1)
    if not unknown.any():
        return piece
    for name in (CROP_TOP, CROP_LEFT):
        column = piece[name]
        piece = piece.set_column(piece.column_names.index(name), name,
                                 pc.if_else(pa.array(unknown), pa.scalar(None, column.type), column))
    return piece
