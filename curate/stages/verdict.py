"""The verdict columns (drop_stage, drop_reason, drop_detail) every stage table carries, and the survivor rule."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import (
    AESTHETIC_SCORE,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    KEY,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PASSES_THRESHOLDS,
    ROW,
    VERDICT_COLUMNS,
)


def with_verdict_columns(table: pa.Table) -> pa.Table:
    """Add empty verdict columns where they are missing."""
    for name in VERDICT_COLUMNS:
        if name not in table.column_names:
            table = table.append_column(pa.field(name, pa.string()), pa.nulls(table.num_rows, pa.string()))
    return table


def alive(table: pa.Table) -> pa.ChunkedArray:
    """True for rows no stage has flagged yet."""
    return pc.is_null(table[DROP_REASON])


def with_reason(
    table: pa.Table,
    mask: pa.Array | pa.ChunkedArray | np.ndarray,
    stage: str,
    reason: str,
    detail: pa.Array | pa.ChunkedArray | list | str | None = None,
) -> pa.Table:
    """Flag rows where mask is true and the row is still alive; an earlier verdict is never overwritten."""
    table = with_verdict_columns(table)
    mask = pc.fill_null(pa.chunked_array([mask]) if isinstance(mask, (pa.Array, np.ndarray)) else mask, False)
    hit = pc.and_(mask, alive(table))
    if isinstance(detail, (str, type(None))):
        detail_values: pa.Array | pa.ChunkedArray = pa.array([detail] * table.num_rows, pa.string())
    elif isinstance(detail, list):
        detail_values = pa.array(detail, pa.string())
    else:
        detail_values = pc.cast(detail, pa.string())
    columns = {
        DROP_STAGE: pc.if_else(hit, stage, table[DROP_STAGE]),
        DROP_REASON: pc.if_else(hit, reason, table[DROP_REASON]),
        DROP_DETAIL: pc.if_else(hit, detail_values, table[DROP_DETAIL]),
    }
    for name, values in columns.items():
        table = table.set_column(table.column_names.index(name), name, values)
    return table


def apply_verdicts(table: pa.Table, verdicts: pa.Table | None) -> pa.Table:
    """Set verdicts (row, drop_stage, drop_reason, drop_detail), found by a global step, on the rows they name that
    are still alive: the apply part of signature -> group -> apply."""
    table = with_verdict_columns(table)
    if verdicts is None or verdicts.num_rows == 0 or table.num_rows == 0:
        return table
    index = pc.index_in(table[ROW], value_set=verdicts[ROW].combine_chunks())
    hit = pc.and_(pc.is_valid(index), alive(table))
    safe_index = pc.fill_null(index, 0)
    for name in VERDICT_COLUMNS:
        values = verdicts[name].combine_chunks().take(safe_index)
        table = table.set_column(table.column_names.index(name), name, pc.if_else(hit, values, table[name]))
    return table


def verdict_schema() -> pa.Schema:
    return pa.schema([pa.field(ROW, pa.int64()), *(pa.field(name, pa.string()) for name in VERDICT_COLUMNS)])


def verdicts_of(table: pa.Table) -> pa.Table:
    """The rows a step flagged, as (row, drop_stage, drop_reason, drop_detail)."""
    flagged = table.filter(pc.is_valid(table[DROP_REASON]))
    return flagged.select([ROW, *VERDICT_COLUMNS]).cast(verdict_schema())


def _as_float64(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    values = pa.chunked_array([values]) if isinstance(values, pa.Array) else values
    return pc.cast(values, pa.float64())


def as_stored(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """Each value as the number its column stored, in float64: a value a float32 holds exactly is read as its shortest
    float32 text (float32(0.8), 0.800000011920929, is 0.8: LAION releases store scores in float32 or float64, and
    ingest widens both to float64); any other value, a float64's, exactly as it is (5.0000001 stays 5.0000001)."""
    values = _as_float64(values)
    as_float32 = pc.cast(values, pa.float32(), safe=False)
    is_float32 = pc.equal(pc.cast(as_float32, pa.float64()), values)
    return pc.if_else(is_float32, pc.cast(pc.cast(as_float32, pa.string()), pa.float64()), values)


def above(values: pa.Array | pa.ChunkedArray, limit: float) -> pa.ChunkedArray:
    """values > limit both as they are and as their column stored them (as_stored): float32(0.8) is not above 0.8,
    and a value equal to the limit never is."""
    return pc.and_(pc.greater(_as_float64(values), limit), pc.greater(as_stored(values), limit))


def below(values: pa.Array | pa.ChunkedArray, limit: float) -> pa.ChunkedArray:
    """values < limit both as they are and as their column stored them (as_stored): float32(5.1) is not below 5.1,
    and a value equal to the limit never is."""
    return pc.and_(pc.less(_as_float64(values), limit), pc.less(as_stored(values), limit))


def stored_text(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """Each value as its column stored it: the shortest float32 text when the value is a float32, else float64's."""
    values = _as_float64(values)
    as_float32 = pc.cast(values, pa.float32(), safe=False)
    is_float32 = pc.equal(pc.cast(as_float32, pa.float64()), values)
    return pc.if_else(is_float32, pc.cast(as_float32, pa.string()), pc.cast(values, pa.string()))


def survivor_order(aesthetic: np.ndarray, area: np.ndarray, keys: np.ndarray,
                   passes: np.ndarray | None = None) -> np.ndarray:
    """Indices sorted best first: rows that pass the select thresholds, then highest aesthetic score, then larger
    original resolution, then smallest key.

    Missing scores and areas rank last. The first index of any group of duplicates is its survivor.
    """
    aesthetic = np.nan_to_num(np.asarray(aesthetic, dtype=np.float64), nan=-np.inf)
    area = np.nan_to_num(np.asarray(area, dtype=np.float64), nan=-1.0)
    fails = np.zeros(len(aesthetic), dtype=bool) if passes is None else ~np.asarray(passes, dtype=bool)
    # np.lexsort sorts by the last key first; negate to get descending order.
    return np.lexsort((np.asarray(keys), -area, -aesthetic, fails))


def ranks_by_survivor_rule(aesthetic: np.ndarray, area: np.ndarray, keys: np.ndarray,
                           passes: np.ndarray | None = None) -> np.ndarray:
    """The position of each row in the survivor order (0 is the best row)."""
    order = survivor_order(aesthetic, area, keys, passes)
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks


def float_column(table: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for nulls (all NaN when the column is absent)."""
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan)
    return pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False)


# What the survivor rule reads of a row (with its row number): both engines carry these through a dedup group.
SURVIVOR_COLUMNS = (ROW, KEY, AESTHETIC_SCORE, ORIGINAL_WIDTH, ORIGINAL_HEIGHT, PASSES_THRESHOLDS)


def survivor_ranks(table: pa.Table) -> np.ndarray:
    """Survivor-rule ranks from passes_thresholds (when present), aesthetic_score, original area and key."""
    area = float_column(table, ORIGINAL_WIDTH) * float_column(table, ORIGINAL_HEIGHT)
    keys = table[KEY].to_numpy(zero_copy_only=False).astype(str)
    # Model scores of identical images differ in the last bits with the batch they ran in (local vs Spark):
    # compare them at 1e-4 so such ties fall to resolution and key, the same on every engine.
    aesthetic = np.round(float_column(table, AESTHETIC_SCORE), 4)
    passes = None
    if PASSES_THRESHOLDS in table.column_names:
        passes = pc.fill_null(table[PASSES_THRESHOLDS], False).to_numpy(zero_copy_only=False)
    return ranks_by_survivor_rule(aesthetic, area, keys, passes)
