"""Download: fetch every alive row politely (curate.net.fetch.Session), decode once, resize, measure; a status
per row."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from curate.net.fetch import FetchError, FetchPolicy, Session, fetch, is_transient
from curate.net.origins import OriginCache
from curate.schema import (
    DOWNLOAD_BYTES,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    JPG,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PHASH,
    ROW,
    SHA256,
    STATUS,
    STORED_HEIGHT,
    STORED_WIDTH,
    URL,
    VERDICT_COLUMNS,
    table_schema,
)
from curate.stages import blur
from curate.stages.blur import FACES_BLURRED
from curate.stages.buckets import BucketResizer, crop_columns
from curate.stages.consent import CONSENT_HEADERS, check_origin, header_consent
from curate.stages.images import (
    DecodeError,
    decode,
    downscale,
    encode_jpeg,
    hash_copy,
    planned_size,
    prepare,
    resized,
)
from curate.stages.verdict import alive, with_reason, with_verdict_columns


def _load_resizer_module() -> ModuleType:
    """img2dataset.resizer alone: the package's __init__ imports its whole downloader (webdataset, torch), ~10 s."""
    if "img2dataset.resizer" in sys.modules:
        return sys.modules["img2dataset.resizer"]
    package = importlib.util.find_spec("img2dataset")
    if package is None or not package.submodule_search_locations:
        raise ImportError("img2dataset is not installed; `pip install img2dataset`")
    spec = importlib.util.spec_from_file_location(
        "img2dataset.resizer", Path(next(iter(package.submodule_search_locations))) / "resizer.py")
    if spec is None or spec.loader is None:
        raise ImportError("img2dataset has no resizer module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["img2dataset.resizer"] = module
    return module


@cache
def _resizer_module() -> ModuleType:
    """img2dataset.resizer, loaded and patched when the download stage starts: `import curate` changes nothing."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import otherwise
    module = _load_resizer_module()
    # Resizer silences cv2 by swapping the process's fds 1 and 2 around every image; from several threads at once the
    # swaps interleave and leave stdout/stderr pointing at /dev/null for good. cv2 warnings are harmless: keep the fds.
    module.SuppressStdoutStderr = contextlib.nullcontext  # type: ignore[attr-defined]
    return module


log = logging.getLogger(__name__)
STAGE = "download"
SUCCESS = "success"
JPG_BYTES = "jpg_bytes"  # the score stage moves it last, where it has always been
CHUNK_ROWS = 256  # rows per slice of download_chunks (and per row group of a download part)
WINDOW_PER_THREAD = 8  # fetches submitted per thread ahead of the oldest unfinished one


@dataclass(frozen=True)
class DownloadOptions:
    image_size: int = 1024
    resize_mode: str = "keep_ratio"
    buckets: int = 1024  # base size of the aspect buckets, for resize_mode "bucket"
    threads: int = 32
    max_per_host: int = 4  # concurrent requests to one host, per download process
    policy: FetchPolicy = FetchPolicy()
    respect_robots: bool = True  # robots.txt of each origin, for policy.user_agent_token and robots_agents
    robots_agents: tuple[str, ...] = ()  # further robots.txt tokens whose exclusion also excludes this run
    respect_tdm: bool = True  # /.well-known/tdmrep.json of each origin (the response header: policy)
    blur_faces: bool = False  # faces blurred in the stored image (curate.stages.blur)
    bbox_column: str | None = None  # with blur_faces: the metadata column of face boxes, instead of detecting


_resizers: dict[tuple[int, str], Any] = {}


def resizer_for(options: DownloadOptions) -> Any:
    """One Resizer per process and setting; never upscales (resize_only_if_bigger)."""
    cache_key = (options.image_size, options.resize_mode)
    if options.resize_mode == "bucket":  # scale to cover the aspect bucket, centre crop (curate.stages.buckets)
        return BucketResizer(options.buckets)
    if cache_key not in _resizers:
        resizer = _resizer_module()
        mode = resizer.ResizeMode[options.resize_mode]
        _resizers[cache_key] = resizer.Resizer(options.image_size, mode, resize_only_if_bigger=True,
                                               encode_format="jpg", encode_quality=95)
    return _resizers[cache_key]


def warm_up() -> None:
    """Load what the first image, connection or slice would load lazily (OpenCV; scipy's DCT, which phash_of imports
    on its first call; the idna codec of the first connection; pandas, which pyarrow imports on its first pa.array of
    Python values, ~0.4 s), once per process before the threads start: start-up, else paid mid-stream with every
    thread queued on the import lock (tests/stages/test_download_stream.py)."""
    decode(encode_jpeg(downscale(np.zeros((16, 16, 3), np.uint8), (8, 8))), lambda width, height: None)
    phash_of(Image.new("L", (32, 32)))
    "localhost".encode("idna")
    pa.array([0])


def phash_of(gray: Image.Image) -> int:
    """64-bit pHash as signed int64, from the small grayscale copy of the one decode: imagehash.phash's bits exactly
    (its 32x32 Lanczos, scipy's DCT-II down and across, the 8x8 low band above its median, first bit highest), without
    its ImageHash object and hex string, which cost as much again (tests/stages/test_download.py compares the two)."""
    import scipy.fftpack  # here, not at import: `import curate` stays light; warm_up loads it before the threads

    pixels = np.asarray(gray.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    low = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    value = int.from_bytes(np.packbits(low > np.median(low)).tobytes(), "big")
    return value - (1 << 64) if value >= 1 << 63 else value


def download_one(url: str, options: DownloadOptions, session: Session | None = None,
                 origins: OriginCache | None = None, boxes: Any = None) -> dict[str, Any]:
    """Check the origin's opt-outs, fetch, resize and measure one URL; failures are values, never exceptions.
    boxes: the row's --bbox-column value."""
    try:
        return _download_one(url, options, session, origins if origins is not None else OriginCache(), boxes)
    except Exception as error:  # a bug on one hostile row must not take its whole part down with it
        log.exception("unexpected error on %s", url[:200])
        return {STATUS: "download_error", "error": f"{type(error).__name__}: {error}"[:1000]}


def _download_one(url: str, options: DownloadOptions, session: Session | None, origins: OriginCache,
                  boxes: Any) -> dict[str, Any]:
    consent = check_origin(url, options, session, origins)
    if STATUS in consent:  # robots.txt or tdmrep.json says no: the image is never asked for
        return consent
    try:
        body = fetch(url, options.policy, session)
    except FetchError as error:
        return {**consent, CONSENT_HEADERS: header_consent(error.reason, options), STATUS: error.reason,
                "error": str(error)}
    return {**consent, CONSENT_HEADERS: header_consent(None, options), **process_body(body, options, boxes)}


def process_body(body: bytes, options: DownloadOptions, boxes: Any = None) -> dict[str, Any]:
    """Check, resize and measure fetched (or already stored) image bytes: the download columns of one row; with
    blur_faces, the stored image's faces blurred (hashes stay those of the image as published)."""
    row: dict[str, Any] = {DOWNLOAD_BYTES: len(body), SHA256: hashlib.sha256(body).hexdigest() if body else None}
    try:
        jpeg, width, height, original_width, original_height, gray = _stored_image(body, options)
        if options.blur_faces:
            jpeg, row[FACES_BLURRED] = blur.blur_faces(jpeg, blur.parse_boxes(boxes) if options.bbox_column else None)
    except DecodeError as decode_error:
        return {**row, STATUS: decode_error.reason, "error": str(decode_error)}
    except blur.BoxError as box_error:
        return {**row, STATUS: "invalid_bbox", "error": f"--bbox-column {options.bbox_column}: {box_error}"}
    row[PHASH] = phash_of(gray)
    return {**row, STATUS: SUCCESS, JPG: jpeg, ORIGINAL_WIDTH: original_width, ORIGINAL_HEIGHT: original_height,
            STORED_WIDTH: width, STORED_HEIGHT: height,
            **crop_columns(options.resize_mode, options.buckets, original_width, original_height, options.image_size)}


def _stored_image(body: bytes, options: DownloadOptions) -> tuple[bytes, int, int, int, int, Image.Image]:
    """(jpeg, width, height, original width, original height, pHash copy) from one decode; raises DecodeError."""
    if options.resize_mode == "bucket":  # the bucket resize takes bytes its decoder reads faithfully
        prepared = prepare(body)
        jpeg, width, height, original_width, original_height, problem = resizer_for(options)(
            io.BytesIO(prepared.body))
        if problem is not None or jpeg is None:
            raise DecodeError("decode_failed", f"resize: {problem}")
        return jpeg, width, height, original_width, original_height, prepared.gray
    decoded = decode(body, lambda width, height: planned_size(width, height, options.image_size, options.resize_mode))
    original = (decoded.original_width, decoded.original_height)
    if decoded.size is None and decoded.clean_jpeg:  # nothing to change: no generation loss, no encode
        return body, *original, *original, hash_copy(decoded.pixels)
    pixels = resized(decoded, options.image_size, options.resize_mode)
    return encode_jpeg(pixels), pixels.shape[1], pixels.shape[0], *original, hash_copy(pixels)


def download(table: pa.Table, options: DownloadOptions, origins: OriginCache | None = None) -> pa.Table:
    """Add the download columns; rows already flagged are not fetched, failed ones get the download reason. The
    whole table's images in memory: the local engine streams its parts through download_stream instead."""
    chunks = [chunk for _, chunk in download_stream([table], options, origins=origins)]
    return pa.concat_tables(chunks) if chunks else with_download_results(with_verdict_columns(table), [])


def bbox_values(table: pa.Table, options: DownloadOptions) -> list[Any]:
    """Each row's --bbox-column value (None for every row when blurring does not read one)."""
    if not (options.blur_faces and options.bbox_column):
        return [None] * table.num_rows
    if options.bbox_column not in table.column_names:
        raise ValueError(f"--bbox-column {options.bbox_column!r}: no such column in the input (it has "
                         f"{', '.join(table.column_names)[:300]})")
    return table[options.bbox_column].to_pylist()


class _Batch:
    """One table of a download stream: its rows still to submit, the results not yet yielded, the next row to yield."""

    def __init__(self, number: int, table: pa.Table, options: DownloadOptions) -> None:
        self.number, self.table = number, with_verdict_columns(table)
        self.urls = self.table[URL].to_pylist()
        self.boxes = bbox_values(self.table, options)
        self.todo = deque(i for i, go in enumerate(alive(self.table).to_pylist()) if go)
        self.results: dict[int, dict[str, Any]] = {}
        self.start = 0


def download_stream(tables: Iterable[pa.Table], options: DownloadOptions, rows: int = CHUNK_ROWS,
                    origins: OriginCache | None = None) -> Iterator[tuple[int, pa.Table]]:
    """download_chunks of consecutive tables through one session and one thread pool, as (table number, slice):
    the next table's rows are fetched while the slowest rows of the one before finish, so no table ends with idle
    threads waiting on its last URLs. origins: the run's opt-out files fetched so far (a fresh cache by default)."""
    origins = origins if origins is not None else OriginCache()
    window = max(1, options.threads) * WINDOW_PER_THREAD
    source, batches = enumerate(tables), deque[_Batch]()
    pending: deque[tuple[_Batch, int, Future[dict[str, Any]]]] = deque()
    more = True
    warm_up()
    with Session(options.max_per_host) as session, ThreadPoolExecutor(max_workers=max(1, options.threads)) as pool:
        while True:
            while len(pending) < window and (more or (batches and batches[-1].todo)):
                if not batches or not batches[-1].todo:  # open the next table
                    number, table = next(source, (-1, None))
                    if table is None:
                        more = False
                        continue
                    batches.append(_Batch(number, table, options))
                    if options.resize_mode == "bucket" and batches[-1].todo:
                        resizer_for(options)  # load the resizer here, once, before the threads need it
                    continue
                batch = batches[-1]
                i = batch.todo.popleft()
                pending.append((batch, i, pool.submit(download_one, batch.urls[i], options, session, origins,
                                                         batch.boxes[i])))
            if pending:
                batch, i, future = pending.popleft()
                batch.results[i] = future.result()
            while batches:  # the oldest table's finished slices: every row before `upto` is done
                head = batches[0]
                upto = (pending[0][1] if pending and pending[0][0] is head else
                        head.todo[0] if head.todo else head.table.num_rows)
                while head.start < head.table.num_rows and (head.start + rows <= upto or upto == head.table.num_rows):
                    yield head.number, _slice_with_results(head.table, head.start, rows, head.results)
                    head.start += rows
                if head.start < head.table.num_rows:
                    break
                batches.popleft()
            if not (pending or batches or more):
                return


def _slice_with_results(table: pa.Table, start: int, rows: int, results: dict[int, dict[str, Any]]) -> pa.Table:
    piece = table.slice(start, rows)
    return with_download_results(piece, [results.pop(i, {}) for i in range(start, start + piece.num_rows)])


def binary_column(values: list[bytes | None]) -> pa.Array:
    """pa.array(values, pa.binary()) in one exact allocation and one copy: pa.array grows its buffer by doubling,
    which for a batch of images is several copies of hundreds of megabytes and as many fresh pages."""
    lengths = np.fromiter((0 if v is None else len(v) for v in values), np.int64, len(values))
    if lengths.sum() >= 2**31 - 1:  # past int32 offsets: pa.array's own chunking
        return pa.array(values, pa.binary())
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    valid = np.fromiter((v is not None for v in values), np.bool_, len(values))
    nulls = len(values) - int(valid.sum())
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little")) if nulls else None
    data = pa.py_buffer(b"".join(v for v in values if v is not None))
    return pa.Array.from_buffers(pa.binary(), len(values), [bitmap, pa.py_buffer(offsets), data], nulls)


def image_bytes_last(table: pa.Table) -> pa.Table:
    """jpg_bytes moved to the last column, where the score stage has always put it (samples.parquet's column order);
    measured from jpg in a download part written before the download stage added it."""
    values = table[JPG_BYTES] if JPG_BYTES in table.column_names else pc.binary_length(table[JPG])
    return table.drop_columns([c for c in [JPG_BYTES] if c in table.column_names]).append_column(JPG_BYTES, values)


def with_download_results(table: pa.Table, results: list[dict[str, Any]]) -> pa.Table:
    """The download columns from one result per row ({} for rows not processed); failures get their reason."""
    for field in table_schema("download"):
        if field.name in table.column_names:
            continue
        if field.name == JPG_BYTES:  # the stored image's length: later stages need not read the images for it
            values = pc.binary_length(table[JPG])
        elif field.type == pa.binary():
            values = binary_column([r.get(field.name) for r in results])
        else:
            values = pa.array([r.get(field.name) for r in results], field.type)
        table = table.append_column(field, values)
    failed = pa.array([bool(r) and r[STATUS] != SUCCESS for r in results])
    reasons: list[str] = [r.get(STATUS) or "" for r in results]
    details = [r.get("error") for r in results]
    # One reason per failure kind, so the ledger can be grouped by it.
    for reason in sorted({r for r, f in zip(reasons, failed.to_pylist(), strict=True) if f}):
        mask = pa.array([f and r == reason for r, f in zip(reasons, failed.to_pylist(), strict=True)])
        table = with_reason(table, mask, STAGE, reason, details)
    return table


def retry_transient(part: pa.Table, options: DownloadOptions) -> tuple[pa.Table, int]:
    """Download again the rows whose download failed with a transient error; every other row stays as it was."""
    retry = [stage == STAGE and is_transient(reason, detail) for stage, reason, detail in zip(
        part[DROP_STAGE].to_pylist(), part[DROP_REASON].to_pylist(), part[DROP_DETAIL].to_pylist(), strict=True)]
    if not any(retry):
        return part, 0
    mask = pa.array(retry)
    again = part.filter(mask).drop_columns([f.name for f in table_schema("download") if f.name in part.column_names])
    for name in VERDICT_COLUMNS:
        again = again.set_column(again.column_names.index(name), name, pa.nulls(again.num_rows, pa.string()))
    redone = download(again, options).select(part.column_names).cast(part.schema)
    merged = pa.concat_tables([part.filter(pc.invert(mask)), redone]).sort_by(ROW)
    return merged, len(redone)
