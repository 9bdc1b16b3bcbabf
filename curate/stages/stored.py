"""The download stage for images already stored in tars: the same checks, resize and columns as a fetch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
from curate.stages.download import (
    DownloadOptions,
    process_body,
    resizer_for,
    with_download_results,
)
from curate.stages.verdict import alive, with_verdict_columns
from curate.webdataset_input import read_stored

# img2dataset measured the image before it resized it: that is the true original size.
SOURCE_ORIGINAL = {ORIGINAL_WIDTH: "source_original_width", ORIGINAL_HEIGHT: "source_original_height"}


def decode_one(body: bytes | None, options: DownloadOptions) -> dict[str, Any]:
    if body is None:
        return {STATUS: "truncated", "error": "the image member runs past the end of its tar"}
    return process_body(body, options)  # a clean JPEG that needs no resize comes back byte for byte


def decode_stored(table: pa.Table, options: DownloadOptions) -> pa.Table:
    """Add the download columns to rows whose image lies in an input tar; rows already flagged are not read."""
    table = with_verdict_columns(table)
    todo = [i for i, go in enumerate(alive(table).to_pylist()) if go]
    results: list[dict[str, Any]] = [{} for _ in range(table.num_rows)]
    if todo:
        located = table.take(pa.array(todo, pa.int64()))
        bodies = read_stored(located[TAR_PATH].to_pylist(), located[TAR_OFFSET].to_pylist(),
                             located[TAR_SIZE].to_pylist())
        if options.resize_mode == "bucket":
            resizer_for(options)  # load the resizer once, before the threads need it
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
