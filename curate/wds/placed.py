"""The local engine's tars, each image written once, straight from its download part into its tar.

The shard plan gives every sample its shard and position before anything is written, so the tars are laid out first
and filled after, in four steps:
1. record(): per placed part, each sample's frame (the bytes around its image: the KEY.jpg header, then padding,
   KEY.txt and KEY.json) and a reference to its image (download part, row in that part, length) go to its shard's
   bucket; no image is read;
2. lay_out(): per shard, its records in position order give each sample its offset in the tar: the frames and the
   end-of-archive blocks are written at theirs, and each image's (row, shard, offset, length) is routed to its part;
3. fill(): each download part is read once, a row group at a time (only groups that hold a placed image), and every
   image written at its offset;
4. seal(): each tar is hashed (read back from the page cache), fsync'd once and renamed into place.
The bytes are those of writing sample_bytes in position order, then tar_end (TarSink, as the Spark engine does).
Memory: one part's metadata, one shard's frames, one row group of images per worker.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import resource
import shutil
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.schema import CAPTION, JPG, KEY, POSITION, ROW, SHARD
from curate.stages.download import JPG_BYTES
from curate.stages.shard import sample_frame, tar_end
from curate.storage import files as storage
from curate.storage.files import Location
from curate.wds.writer import DOCUMENT_COLUMNS, PLACEMENT_COLUMNS, sample_document

# position, download part, row in that part, image length, header length, tail length; the frame's bytes follow
_RECORD = struct.Struct("<6q")
_ROUTE = 4  # int64s per routed image: row in its part, shard, offset in the tar, length
FILES_PER_GROUP = 4096  # tars open at once at most (more are written in groups, each reading the parts again)


def metadata_groups(path: Location) -> Iterator[tuple[int, pa.Table]]:
    """(first row, table) per row group of a download part, without the images when their lengths are stored."""
    reader = storage.parquet_file(path)
    names = reader.schema_arrow.names
    columns = [name for name in names if name != JPG] if JPG_BYTES in names else None
    start = 0
    for group in range(reader.num_row_groups):
        table = reader.read_row_group(group, columns=columns)
        yield start, table
        start += table.num_rows


def record(groups: Iterable[tuple[int, pa.Table]], part: int, assignment: pa.Table, bucket_dir: Path,
           metadata_columns: list[str]) -> int:
    """Append every assigned sample's frame and image reference to its shard's bucket; returns samples recorded."""
    bucket_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    # Match on the input row number: keys repeat among dropped rows (url+caption duplicates).
    wanted = assignment.select(list(PLACEMENT_COLUMNS))
    for start, group in groups:
        group = group.drop_columns([c for c in wanted.column_names if c != ROW and c in group.column_names])
        match = pc.index_in(group[ROW], value_set=wanted[ROW]).to_numpy(zero_copy_only=False)
        hits = np.flatnonzero(~np.isnan(match)) if match.dtype.kind == "f" else np.arange(len(match))
        if len(hits) == 0:
            continue
        chosen = wanted.take(pa.array(match[hits].astype(np.int64)))
        lengths = (group[JPG_BYTES] if JPG_BYTES in group.column_names else pc.binary_length(group[JPG])).take(
            pa.array(hits)).to_pylist()
        needed = {*DOCUMENT_COLUMNS, *metadata_columns}  # only what the json takes goes through Python objects
        rows = group.select([c for c in group.column_names if c in needed]).take(pa.array(hits))
        for name in chosen.column_names[1:]:
            rows = rows.append_column(name, chosen[name])
        frames: dict[int, list[bytes]] = {}
        for i, (row, shard) in enumerate(zip(rows.to_pylist(), chosen[SHARD].to_pylist(), strict=True)):
            if lengths[i] is None:  # select keeps only downloaded rows: a kept row without bytes is a bug
                raise RuntimeError(f"sample {row[KEY]} was placed in a shard but has no image bytes")
            header, tail = sample_frame(row[KEY], lengths[i], row.get(CAPTION) or "",
                                        sample_document(row, metadata_columns))
            frames.setdefault(shard, []).extend([_RECORD.pack(row[POSITION], part, start + int(hits[i]), lengths[i],
                                                              len(header), len(tail)), header, tail])
        for shard, pieces in frames.items():
            with open(bucket_dir / f"{shard:06d}.bucket", "ab") as bucket:
                bucket.writelines(pieces)
        written += len(hits)
    return written


def _pwrite(descriptor: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        while view.nbytes:
            done = os.pwrite(descriptor, view, offset)
            view, offset = view[done:], offset + done


def lay_out(bucket: Path, shard: int, descriptor: int, routes: Path) -> tuple[int, int]:
    """Write a shard's frames and end blocks at their offsets, and route its images to their parts' files; returns
    the tar's size and samples."""
    data = bucket.read_bytes() if bucket.exists() else b""  # one shard's frames: its images are not in it
    records, at = [], 0
    while at < len(data):
        position, part, row, length, head, tail = _RECORD.unpack_from(data, at)
        records.append((position, part, row, length, at + _RECORD.size, head, tail))
        at += _RECORD.size + head + tail
    records.sort()
    offset, routed = 0, dict[int, list[tuple[int, int, int, int]]]()
    with memoryview(data) as view:
        for _, part, row, length, at, head, tail in records:
            _pwrite(descriptor, view[at:at + head], offset)
            _pwrite(descriptor, view[at + head:at + head + tail], offset + head + length)
            routed.setdefault(part, []).append((row, shard, offset + head, length))
            offset += head + length + tail
    end = tar_end(offset)
    _pwrite(descriptor, end, offset)
    for part, images in routed.items():
        with open(routes / f"{part:06d}.route", "ab") as handle:
            np.array(images, dtype=np.int64).tofile(handle)
    return offset + len(end), len(records)


def binary_views(column: pa.ChunkedArray, rows: np.ndarray) -> list[memoryview | None]:
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


def fill(download: Location, routes: Path, descriptors: dict[int, int]) -> int:
    """Write every image routed to one download part at its offset: the part read once, a row group at a time,
    skipping the groups that hold none. Returns the images written."""
    table = np.fromfile(routes, dtype=np.int64).reshape(-1, _ROUTE)
    table = table[np.argsort(table[:, 0], kind="stable")]
    # A local part memory-mapped: its image pages are read in place, not copied into a buffer first.
    reader = pq.ParquetFile(download, memory_map=True) if isinstance(download, Path) else storage.parquet_file(download)
    start, written = 0, 0
    for group in range(reader.num_row_groups):
        count = reader.metadata.row_group(group).num_rows
        low, high = np.searchsorted(table[:, 0], [start, start + count])
        if high > low:
            images = reader.read_row_group(group, columns=[JPG])[JPG]
            for view, (row, shard, offset, length) in zip(binary_views(images, table[low:high, 0] - start),
                                                          table[low:high].tolist(), strict=True):
                if view is None or len(view) != length:  # jpg_bytes is the stored image's length
                    raise RuntimeError(f"{download}: row {row}'s image is {None if view is None else len(view)} "
                                       f"bytes, its jpg_bytes says {length}")
                _pwrite(descriptors[shard], view, offset)
                written += 1
        start += count
    return written


def _sync_file_range() -> Callable[[int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start writing a file's dirty pages out, without waiting."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return lambda descriptor: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(descriptor: int) -> None:
        call(descriptor, 0, 0, 2)  # a failure only leaves the whole write to fsync

    return start


start_writeback = _sync_file_range()


class _Tar:
    """One tar being written at offsets: a temporary file beside its destination (in scratch for an object store,
    uploaded when sealed)."""

    def __init__(self, final: Location, scratch: Path) -> None:
        self.final = final
        local = final if isinstance(final, Path) else scratch / final.name
        self.path = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}{storage.TMP_SUFFIX}")
        self.descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        self.size, self.samples = 0, 0

    def seal(self) -> dict[str, Any]:
        """Hash the whole tar, fsync it once and rename it into place; returns its wids index entry."""
        if os.fstat(self.descriptor).st_size != self.size:
            raise RuntimeError(f"{self.path}: {os.fstat(self.descriptor).st_size} bytes written, {self.size} laid out")
        digest = hashlib.sha256()
        if self.size:  # mapped with its pages in at once, then hashed outside the GIL
            with mmap.mmap(self.descriptor, self.size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                           mmap.PROT_READ) as mapped:
                digest.update(mapped)
        if isinstance(self.final, Path):
            os.fsync(self.descriptor)
            self.close()
            os.replace(self.path, self.final)
        else:
            with open(self.path, "rb") as source, storage.open_write(self.final) as target:
                shutil.copyfileobj(source, target, 1 << 22)
            self.abandon()
        return {"url": self.final.name, "nsamples": self.samples, "filesize": self.size, "sha256": digest.hexdigest()}

    def close(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1

    def abandon(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def write_tars(bucket_dir: Path, downloads: list[Location], shards: int, destination: Callable[[int], Location],
               workers: int, progress: Callable[[int], None] = lambda done: None) -> list[dict[str, Any]]:
    """Every shard's tar from the buckets record() filled; their wids index entries in shard order."""
    entries: list[dict[str, Any]] = []
    # Half the process's open-file limit at most: the parquet parts, spills and sockets need the rest.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    group = FILES_PER_GROUP if limit in (resource.RLIM_INFINITY, -1) else max(1, min(FILES_PER_GROUP, limit // 2))
    for first in range(0, shards, group):
        numbers = range(first, min(shards, first + group))
        entries += _write_group(bucket_dir, downloads, numbers, destination, workers,
                                functools.partial(lambda offset, done: progress(offset + done), first))
    return entries


def _write_group(bucket_dir: Path, downloads: list[Location], numbers: range, destination: Callable[[int], Location],
                 workers: int, progress: Callable[[int], None]) -> list[dict[str, Any]]:
    routes, scratch = bucket_dir / "routes", bucket_dir / "tars"
    for folder in (routes, scratch):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    tars: dict[int, _Tar] = {}
    try:
        for number in numbers:
            tars[number] = tar = _Tar(destination(number), scratch)
            tar.size, tar.samples = lay_out(bucket_dir / f"{number:06d}.bucket", number, tar.descriptor, routes)
        descriptors = {number: tar.descriptor for number, tar in tars.items()}
        # Parts in parallel: reading a row group and writing its images both run outside the GIL.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            routed = [(download, routes / f"{part:06d}.route") for part, download in enumerate(downloads)]
            filled = sum(pool.map(lambda job: fill(job[0], job[1], descriptors),
                                  [job for job in routed if job[1].exists()]))
            if filled != sum(tar.samples for tar in tars.values()):  # a hole would read as zeros: never leave one
                raise RuntimeError(f"shard: {filled} images written into tars laid out for "
                                   f"{sum(tar.samples for tar in tars.values())}")
            for descriptor in descriptors.values():  # the disk writes while the tars are hashed; fsync waits for it
                start_writeback(descriptor)
            entries = []
            for done, entry in enumerate(pool.map(lambda number: tars[number].seal(), numbers), 1):
                entries.append(entry)
                progress(done)
    except BaseException:
        for tar in tars.values():
            tar.abandon()
        raise
    finally:
        for tar in tars.values():
            tar.close()
    first = destination(numbers[0]) if len(numbers) else None
    if isinstance(first, Path):  # the renames made durable, once for the group
        directory = os.open(first.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    shutil.rmtree(routes, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return entries
