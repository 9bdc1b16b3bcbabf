"""Tar writing: scatter sample members into one bucket file per shard, then write each shard in position order."""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import CAPTION, JPG, KEY, LOCATION_COLUMNS, POSITION, ROW, SHARD
from curate.stages.buckets import BUCKET_COLUMNS, BUCKET_HEIGHT, BUCKET_WIDTH, CROP_LEFT, CROP_TOP, SMALLER_THAN_BUCKET
from curate.stages.shard import sample_pieces, shard_name, tar_end
from curate.storage import files as storage
from curate.storage.files import Location

_RECORD = struct.Struct("<qQ")  # position, length of the member bytes that follow

# Columns not carried into a sample's json (they are its other members, or working and verdict columns).
CARRIED_SKIP = {"key", "row", "url", "caption", "jpg", "status", "error", "embedding", "drop_stage", "drop_reason",
                "drop_detail", "original_width", "original_height", "stored_width", "stored_height", "sha256",
                "aesthetic_score", "watermark_prob", "scores_source", "jpg_bytes", "position", "shard",
                *LOCATION_COLUMNS, CROP_TOP, CROP_LEFT, *BUCKET_COLUMNS, "consent_robots", "consent_tdm",
                "consent_headers", "faces_blurred"}


# What the tar writer takes of each placed sample besides its downloaded row (both engines' scatter/join).
PLACEMENT_COLUMNS = (ROW, SHARD, POSITION, "aesthetic_score", "watermark_prob", "scores_source", *BUCKET_COLUMNS)


def sample_document(row: dict[str, Any], metadata_columns: list[str]) -> dict[str, Any]:
    """The KEY.json document of one sample, with SDXL's conditioning: original size, crop, aspect bucket."""
    from curate.stages.shard import json_value

    document = {
        "key": row[KEY], "url": row["url"], "caption": row.get(CAPTION),
        "original_width": row["original_width"], "original_height": row["original_height"],
        "width": row["stored_width"], "height": row["stored_height"],
        "aesthetic_score": json_value(row.get("aesthetic_score")),
        "watermark_prob": json_value(row.get("watermark_prob")),
        "scores_source": row.get("scores_source"), "sha256": row["sha256"],
        "crop_top": row.get(CROP_TOP), "crop_left": row.get(CROP_LEFT),
        "bucket_width": row[BUCKET_WIDTH], "bucket_height": row[BUCKET_HEIGHT],
        "smaller_than_bucket": row[SMALLER_THAN_BUCKET],
        # the opt-out checks this sample passed (curate.stages.consent), for a dataset card
        "consent": {signal: row.get(f"consent_{signal}") for signal in ("robots", "tdm", "headers")},
        "faces_blurred": row.get("faces_blurred"),
    }
    document["metadata"] = {name: json_value(row.get(name)) for name in metadata_columns}
    return document


def scatter(parts: Iterable[pa.Table], assignment: pa.Table, bucket_dir: Path, metadata_columns: list[str]) -> int:
    """Append every assigned sample's tar members to its shard's bucket file; returns samples written.

    Only the metadata goes through Python objects: each image goes from the part's Arrow buffer to the bucket file
    as a view of that buffer, uncopied (joins, sorts and to_pylist of the image column were most of this stage)."""
    bucket_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    # Match on the input row number: keys repeat among dropped rows (url+caption duplicates).
    wanted = assignment.select(list(PLACEMENT_COLUMNS))
    for part in parts:
        part = part.drop_columns([c for c in wanted.column_names if c != ROW and c in part.column_names])
        match = pc.index_in(part[ROW], value_set=wanted[ROW]).to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(~np.isnan(match)) if match.dtype.kind == "f" else np.arange(len(match))
        if len(hits) == 0:
            continue
        chosen = wanted.take(pa.array(match[hits].astype(np.int64)))
        order = np.lexsort((chosen[POSITION].to_numpy(), chosen[SHARD].to_numpy()))
        hits, chosen = hits[order], chosen.take(pa.array(order))
        rows = part.drop_columns([JPG]).take(pa.array(hits))
        for name in chosen.column_names[1:]:
            rows = rows.append_column(name, chosen[name])
        images = _binary_views(part[JPG], hits)
        shards = chosen[SHARD].to_numpy()
        for shard in np.unique(shards):
            picked = np.flatnonzero(shards == shard)
            with open(bucket_dir / f"{int(shard):06d}.bucket", "ab") as bucket:
                for i, row in zip(picked.tolist(), rows.take(pa.array(picked)).to_pylist(), strict=True):
                    image = images[i]
                    if image is None:  # select keeps only downloaded rows: a kept row without bytes is a bug
                        raise RuntimeError(f"sample {row[KEY]} was placed in a shard but has no image bytes")
                    pieces = sample_pieces(row[KEY], image, row.get(CAPTION) or "",
                                           sample_document(row, metadata_columns))
                    bucket.writelines([_RECORD.pack(row[POSITION], sum(len(p) for p in pieces)), *pieces])
            written += len(picked)
    return written


def _binary_views(column: pa.ChunkedArray, rows: np.ndarray) -> list[memoryview | None]:
    """The values of a binary column at rows, as views of its Arrow buffers (None for a null); no chunk is copied."""
    starts = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    chunks = []
    for array in column.chunks:
        offsets = np.frombuffer(array.buffers()[1], np.int32)[array.offset:array.offset + len(array) + 1]
        data = memoryview(array.buffers()[2] or b"")
        chunks.append((offsets, data, array.is_valid().to_numpy(zero_copy_only=False)))
    views: list[memoryview | None] = []
    for row in rows.tolist():
        number = int(np.searchsorted(starts, row, side="right")) - 1
        offsets, data, valid = chunks[number]
        at = row - int(starts[number])
        views.append(data[offsets[at]:offsets[at + 1]] if valid[at] else None)
    return views


def _bucket_index(path: Path) -> list[tuple[int, int, int]]:
    """(position, offset, length) of every record, without holding the bytes."""
    records = []
    with open(path, "rb") as bucket:
        offset = 0
        while header := bucket.read(_RECORD.size):
            position, length = _RECORD.unpack(header)
            records.append((position, offset + _RECORD.size, length))
            offset += _RECORD.size + length
            bucket.seek(offset)
    return sorted(records)


class TarSink:
    """One tar being written through the storage layer (a temporary name locally, the final key on an object store):
    samples' member bytes in, then close() adds the end-of-archive blocks and makes it appear whole, returning its
    wids index entry; abandon() leaves nothing. Both engines write their shards with it."""

    def __init__(self, destination: str | Location) -> None:
        self.final = destination
        self._writing = storage.open_write(destination)
        self.handle = self._writing.__enter__()
        self.digest, self.size, self.samples = hashlib.sha256(), 0, 0

    def add(self, data: bytes | memoryview) -> None:
        """One sample's members (curate.stages.shard.sample_bytes)."""
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.samples += 1

    def close(self) -> dict[str, Any]:
        end = tar_end(self.size)
        self.handle.write(end)
        self.digest.update(end)
        self._writing.__exit__(None, None, None)
        return {"nsamples": self.samples, "filesize": self.size + len(end), "sha256": self.digest.hexdigest()}

    def abandon(self) -> None:
        error = RuntimeError(f"{self.final}: abandoned")
        self._writing.__exit__(RuntimeError, error, None)  # deletes the temporary file, or aborts the upload


def write_shard(bucket: Path, destination: Location) -> dict[str, Any]:
    """Write one tar from its (local) bucket in position order, atomically, to a local or fsspec destination;
    returns its wids index entry."""
    records = _bucket_index(bucket)
    tar = TarSink(destination)
    try:
        if records:  # the bucket mapped, not read: each record goes to the tar and the digest without a copy
            with open(bucket, "rb") as source, mmap.mmap(source.fileno(), 0, access=mmap.ACCESS_READ) as mapped, \
                    memoryview(mapped) as view:
                for _, offset, length in records:
                    with view[offset:offset + length] as data:
                        tar.add(data)
    except BaseException:
        tar.abandon()
        raise
    return {"url": destination.name, **tar.close()}


def shard_path(shard_dir: Location, prefix: str, index: int) -> Location:
    return shard_dir / shard_name(prefix, index)
