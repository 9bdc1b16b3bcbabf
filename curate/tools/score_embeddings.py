"""`curate score-embeddings`: aesthetic and NSFW scores from precomputed CLIP ViT-L/14 embeddings, before any download.

LAION publishes `img_emb_NNNN.npy` (float16 [N, 768]) beside `metadata_NNNN.parquet`, row for row. The output is
the metadata with `aesthetic_score` and `punsafe` columns (or `row` + both without metadata), which `curate run
--scores metadata` reads as the aesthetic score and the NSFW probability.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.models import AestheticPredictor, SafetyDetector
from curate.schema import AESTHETIC_SCORE, PUNSAFE, ROW

log = logging.getLogger(__name__)

DEFAULT_CHUNK_ROWS = 65_536
# Metadata columns that already mean "aesthetic score"; replaced, so the output has exactly one.
_SCORE_ALIASES = {"aesthetic", "aesthetic_score", PUNSAFE}


def score_embeddings(
    embeddings: str | os.PathLike,
    output: str | os.PathLike,
    metadata: str | os.PathLike | None = None,
    aesthetic_weights: str | None = None,
    aesthetic_head: str = "v2",
    model_cache: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    safety_weights: str | None = None,
) -> int:
    """Score every row of an [N, D] .npy of image embeddings and write output parquet atomically; returns N."""
    values = np.load(embeddings, mmap_mode="r")
    if values.ndim != 2:
        raise ValueError(f"{embeddings}: expected a 2-d array [rows, dim] of embeddings, got shape {values.shape}")
    if metadata is not None and pq.ParquetFile(metadata).metadata.num_rows != len(values):
        rows = pq.ParquetFile(metadata).metadata.num_rows
        raise ValueError(f"{metadata} has {rows} rows but {embeddings} has {len(values)} embeddings; pass the pair")
    predictor = AestheticPredictor.load(aesthetic_weights, head=aesthetic_head, cache_dir=model_cache)
    detector = SafetyDetector.load(safety_weights, cache_dir=model_cache)
    models = (predictor, detector)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
    os.close(handle)
    try:
        writer: pq.ParquetWriter | None = None
        for table in _scored_tables(values, metadata, models, chunk_rows):
            writer = writer or pq.ParquetWriter(partial, table.schema)
            writer.write_table(table)
        if writer is None:  # no rows: still write the (empty) file
            empty = pa.table({ROW: pa.array([], pa.int64())})
            pq.write_table(_scored_table(empty, np.zeros((0, values.shape[1]), np.float32), models), partial)
        else:
            writer.close()
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    log.info("scored %d embeddings from %s into %s", len(values), embeddings, output)
    return len(values)


def _scored_tables(
    values: np.ndarray,
    metadata: str | os.PathLike | None,
    models: tuple[AestheticPredictor, SafetyDetector],
    chunk_rows: int,
) -> Iterator[pa.Table]:
    """Chunks of metadata (or row numbers) with their scores, aligned row for row with values."""
    if metadata is None:
        for start in range(0, len(values), chunk_rows):
            rows = pa.array(np.arange(start, min(start + chunk_rows, len(values)), dtype=np.int64))
            yield _scored_table(pa.table({ROW: rows}), values[start : start + len(rows)], models)
        return
    offset = 0
    for batch in pq.ParquetFile(metadata).iter_batches(batch_size=chunk_rows):
        chunk = values[offset : offset + batch.num_rows]
        offset += batch.num_rows
        yield _scored_table(pa.Table.from_batches([batch]), chunk, models)


def _scored_table(
    table: pa.Table, embeddings: np.ndarray, models: tuple[AestheticPredictor, SafetyDetector]
) -> pa.Table:
    existing = [name for name in table.column_names if name.lower() in _SCORE_ALIASES]
    if existing:
        log.warning("replacing metadata column(s) %s with the computed %s and %s", existing, AESTHETIC_SCORE, PUNSAFE)
        table = table.drop_columns(existing)
    predictor, detector = models
    table = table.append_column(AESTHETIC_SCORE, pa.array(predictor.predict(embeddings), pa.float32()))
    return table.append_column(PUNSAFE, pa.array(detector.predict(embeddings), pa.float32()))
