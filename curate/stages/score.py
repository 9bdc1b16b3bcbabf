"""Score stage: CLIP ViT-L/14 embedding, LAION aesthetic score and watermark probability of each downloaded image."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
from curate.models.device import resolve_device
from curate.models.preprocess import model_inputs
from curate.schema import AESTHETIC_SCORE, EMBEDDING, JPG, SCORES_SOURCE, WATERMARK_PROB
from curate.stages.verdict import alive, with_reason, with_verdict_columns

log = logging.getLogger(__name__)

STAGE = "score"
DECODE_FAILED = "decode_failed"
SCORES_FROM_MODEL = "model"
# Batches decoded ahead of the one being scored: keeps the models busy without holding a whole table of pixels.
PREFETCH_BATCHES = 2


@dataclass
class Scorer:
    """The three models, built once per process, and how to feed them."""

    clip: ClipEncoder
    aesthetic: AestheticPredictor
    watermark: WatermarkDetector
    batch_size: int = 64
    decode_workers: int = max(1, os.cpu_count() or 1)
    draft: bool = True


_SCORERS: dict[tuple, Scorer] = {}


def load_scorer(config: Config) -> Scorer:
    """Build (or reuse, within this process) the models config names; raises before any image is scored."""
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    key = (
        config.device,
        config.model_cache,
        config.clip_weights,
        config.aesthetic_weights,
        config.aesthetic_head,
        config.watermark_weights,
    )
    if key not in _SCORERS:
        _SCORERS.clear()  # one set of models per process: free the old ones before building new ones
        device = resolve_device(config.device)
        cache = config.model_cache
        _SCORERS[key] = Scorer(
            clip=ClipEncoder.load(config.clip_weights, cache_dir=cache, device=device),
            aesthetic=AestheticPredictor.load(
                config.aesthetic_weights, head=config.aesthetic_head, cache_dir=cache, device=device
            ),
            watermark=WatermarkDetector.load(config.watermark_weights, cache_dir=cache, device=device),
        )
        log.info("scoring on %s", device)
    scorer = _SCORERS[key]
    scorer.batch_size = config.batch_size
    return scorer


def score_images(table: pa.Table, scorer: Scorer) -> pa.Table:
    """Add aesthetic_score, watermark_prob, scores_source and embedding; flag images that fail to decode.

    Only rows no stage has flagged and that hold a jpg are scored; every other row gets nulls.
    """
    table = with_verdict_columns(table)
    rows = table.num_rows
    todo = np.flatnonzero(np.asarray(pc.and_(alive(table), pc.is_valid(table[JPG])).to_numpy(zero_copy_only=False)))
    aesthetic = np.zeros(rows, dtype=np.float32)
    watermark = np.zeros(rows, dtype=np.float32)
    embedding = np.zeros((rows, scorer.clip.embed_dim), dtype=np.float16)
    scored = np.zeros(rows, dtype=bool)
    errors: list[str | None] = [None] * rows
    for batch in _decoded_batches(table[JPG], todo, scorer):
        for row, error in batch.failures:
            errors[row] = error
        if not len(batch.rows):
            continue
        features = scorer.clip.encode_pixels(batch.clip_pixels)
        aesthetic[batch.rows] = scorer.aesthetic.predict(features)
        watermark[batch.rows] = scorer.watermark.predict_pixels(batch.watermark_pixels)
        embedding[batch.rows] = features.astype(np.float16)
        scored[batch.rows] = True
    log.info("scored %d of %d rows, %d failed to decode", scored.sum(), rows, sum(e is not None for e in errors))
    invalid = ~scored
    new_columns = {
        AESTHETIC_SCORE: pa.array(aesthetic, pa.float32(), mask=invalid),
        WATERMARK_PROB: pa.array(watermark, pa.float32(), mask=invalid),
        SCORES_SOURCE: pa.array([SCORES_FROM_MODEL if done else None for done in scored], pa.string()),
        EMBEDDING: _embedding_array(embedding, invalid),
    }
    for name, values in new_columns.items():
        table = _merge_column(table, name, values, scored)
    failed = np.array([error is not None for error in errors], dtype=bool)
    if failed.any():
        table = with_reason(table, failed, STAGE, DECODE_FAILED, detail=errors)
    return table


@dataclass
class _DecodedBatch:
    rows: np.ndarray
    clip_pixels: np.ndarray
    watermark_pixels: np.ndarray
    failures: list[tuple[int, str]]


def _decode(data: bytes, draft: bool) -> tuple[np.ndarray, np.ndarray] | str:
    """Both model inputs, or the error text: a bad image is a value, never an exception."""
    try:
        return model_inputs(data, draft=draft)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"


def _decoded_batches(jpgs: pa.ChunkedArray, todo: np.ndarray, scorer: Scorer) -> Iterator[_DecodedBatch]:
    """Batches of decoded rows, in order; decoding runs in threads (PIL releases the GIL) ahead of scoring."""
    starts = range(0, len(todo), scorer.batch_size)
    with ThreadPoolExecutor(max_workers=scorer.decode_workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[np.ndarray, list[Future]]] = deque()
        for start in starts:
            rows = todo[start : start + scorer.batch_size]
            data = jpgs.take(pa.array(rows)).to_pylist()
            pending.append((rows, [pool.submit(_decode, item, scorer.draft) for item in data]))
            if len(pending) > PREFETCH_BATCHES:
                yield _collect(*pending.popleft())
        while pending:
            yield _collect(*pending.popleft())


def _collect(rows: np.ndarray, futures: list[Future]) -> _DecodedBatch:
    decoded, failures = [], []
    for row, future in zip(rows, futures, strict=True):
        result = future.result()
        if isinstance(result, str):
            failures.append((int(row), result))
        else:
            decoded.append((int(row), result))
    if not decoded:
        nothing = np.zeros(0, dtype=np.int64)
        return _DecodedBatch(nothing, nothing, nothing, failures)
    return _DecodedBatch(
        rows=np.array([row for row, _ in decoded], dtype=np.int64),
        clip_pixels=np.stack([pixels[0] for _, pixels in decoded]),
        watermark_pixels=np.stack([pixels[1] for _, pixels in decoded]),
        failures=failures,
    )


def _embedding_array(embedding: np.ndarray, invalid: np.ndarray) -> pa.FixedSizeListArray:
    """fixed_size_list<float16, D>, null where the row was not scored."""
    values = pa.array(embedding.reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, embedding.shape[1], mask=pa.array(invalid))


def _merge_column(table: pa.Table, name: str, values: pa.Array, scored: np.ndarray) -> pa.Table:
    """Set a column: new values on scored rows; a column already there keeps its values on the others."""
    if name in table.column_names:
        old = table[name]
        if old.type == values.type or (pa.types.is_floating(old.type) and pa.types.is_floating(values.type)):
            values = pc.if_else(pa.array(scored), values, pc.cast(old, values.type).combine_chunks())
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
