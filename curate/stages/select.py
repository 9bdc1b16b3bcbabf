"""Select: the thresholds. The one stage whose verdicts depend on --threshold, so a run can be re-cut cheaply."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import (
    AESTHETIC,
    AESTHETIC_SCORE,
    CLIP_SCORE,
    DROP_REASON,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PASSES_THRESHOLDS,
    PUNSAFE,
    PWATERMARK,
    SCORES_SOURCE,
    VERDICT_COLUMNS,
    WATERMARK_PROB,
)
from curate.stages.verdict import above, below, stored_text, with_reason, with_verdict_columns

STAGE = "select"


def scores_from_metadata(table: pa.Table) -> pa.Table:
    """Use LAION's precomputed columns as the scores (the --scores metadata path)."""
    for target, source in ((AESTHETIC_SCORE, AESTHETIC), (WATERMARK_PROB, PWATERMARK)):
        values = (pc.cast(table[source], pa.float32()) if source in table.column_names
                  else pa.nulls(table.num_rows, pa.float32()))
        table = _put(table, target, values)
    return _put(table, SCORES_SOURCE, pa.array(["metadata"] * table.num_rows, pa.string()))


def _put(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def flag_low_resolution(table: pa.Table, min_size: int) -> pa.Table:
    """Rows whose downloaded image's shorter side is below min_size."""
    short = pc.min_element_wise(table[ORIGINAL_WIDTH], table[ORIGINAL_HEIGHT])
    return with_reason(table, pc.less(short, min_size), STAGE, "low_resolution", pc.cast(short, pa.string()))


def _judged(table: pa.Table, score: str, metadata: str) -> pa.ChunkedArray:
    """The values a threshold judges: a row scored from metadata by its metadata column, in that column's precision
    (the float32 score would round a float64 5.0000001 to 5.0, which prefilter kept for "> 5.0"), else its score."""
    if metadata not in table.column_names or SCORES_SOURCE not in table.column_names:
        return table[score]
    from_metadata = pc.fill_null(pc.equal(table[SCORES_SOURCE], "metadata"), False)
    return pc.if_else(from_metadata, pc.cast(table[metadata], pa.float64()), pc.cast(table[score], pa.float64()))


def flag_watermark(table: pa.Table, max_watermark: float) -> pa.Table:
    values = _judged(table, WATERMARK_PROB, PWATERMARK)
    return with_reason(table, above(values, max_watermark), STAGE, "watermark", stored_text(values))


def flag_unsafe(table: pa.Table, max_unsafe: float | None) -> pa.Table:
    """Rows whose punsafe is above max_unsafe (no-op when unset or the column is absent)."""
    if max_unsafe is None or PUNSAFE not in table.column_names:
        return table
    values = table[PUNSAFE]
    return with_reason(table, above(values, max_unsafe), STAGE, "unsafe", stored_text(values))


def flag_low_clip_score(table: pa.Table, min_clip_score: float | None) -> pa.Table:
    """Rows whose clip_score is below min_clip_score, or that have none (no caption); no-op when unset."""
    if min_clip_score is None:
        return table
    if CLIP_SCORE not in table.column_names:
        return with_reason(table, pa.array([True] * table.num_rows), STAGE, "no_clip_score",
                           "no clip_score column: the images were scored without the text tower; rerun `curate run` "
                           "into a new --output with --scores model")
    values = table[CLIP_SCORE]
    table = with_reason(table, pc.is_null(values), STAGE, "no_clip_score", "no caption")
    return with_reason(table, below(values, min_clip_score), STAGE, "low_clip_score", stored_text(values))


def flag_low_aesthetic(table: pa.Table, threshold: float) -> pa.Table:
    table = with_reason(table, pc.is_null(table[AESTHETIC_SCORE]), STAGE, "no_aesthetic_score")
    values = _judged(table, AESTHETIC_SCORE, AESTHETIC)
    return with_reason(table, below(values, threshold), STAGE, "low_aesthetic", stored_text(values))


def select(table: pa.Table, min_size: int, threshold: float, max_watermark: float,
           max_unsafe: float | None = None, min_clip_score: float | None = None) -> pa.Table:
    """Apply the thresholds in the recipe's order: resolution, watermark, safety, image-caption agreement,
    aesthetic."""
    table = flag_low_resolution(table, min_size)
    table = flag_watermark(table, max_watermark)
    table = flag_unsafe(table, max_unsafe)
    table = flag_low_clip_score(table, min_clip_score)
    return flag_low_aesthetic(table, threshold)


def with_threshold_pass(table: pa.Table, min_size: int, threshold: float, max_watermark: float,
                        max_unsafe: float | None = None, min_clip_score: float | None = None) -> pa.Table:
    """Add PASSES_THRESHOLDS: whether select would keep the row on its own, so dedup can prefer such copies."""
    names = [n for n in table.column_names if n not in (*VERDICT_COLUMNS, PASSES_THRESHOLDS)]
    probe = select(with_verdict_columns(table.select(names)), min_size, threshold, max_watermark, max_unsafe,
                   min_clip_score)
    passes = pc.is_null(probe[DROP_REASON])
    if PASSES_THRESHOLDS in table.column_names:
        return table.set_column(table.column_names.index(PASSES_THRESHOLDS), PASSES_THRESHOLDS, passes)
    return table.append_column(PASSES_THRESHOLDS, passes)
