"""Every threshold at its boundary: equal, one ulp below and one ulp above, for float32 and float64 columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.stages.ingest import normalize
from curate.stages.prefilter import prefilter
from curate.stages.select import scores_from_metadata, select
from curate.stages.verdict import alive, with_verdict_columns

# (metadata column, the option's value, keep values above it?)
THRESHOLDS = [("AESTHETIC_SCORE", 5.1, True), ("pwatermark", 0.8, False), ("punsafe", 0.3, False)]
DTYPES = [np.float32, np.float64]


def _boundary_values(limit: float, dtype: type) -> dict[str, float]:
    """The limit as the column stores it, and its neighbours one ulp away in the column's own precision."""
    at = dtype(limit)
    return {"equal": float(at), "ulp_below": float(np.nextafter(at, dtype(-np.inf))),
            "ulp_above": float(np.nextafter(at, dtype(np.inf)))}


def _metadata(column: str, values: list[float], dtype: type) -> pa.Table:
    n = len(values)
    base = {"URL": [f"http://example.com/{i}.jpg" for i in range(n)], "TEXT": [f"caption {i}" for i in range(n)],
            "WIDTH": [1024.0] * n, "HEIGHT": [1024.0] * n, "AESTHETIC_SCORE": [6.0] * n, "pwatermark": [0.1] * n,
            "punsafe": [0.0] * n}
    arrow_type = pa.float32() if dtype is np.float32 else pa.float64()
    columns = {name: pa.array(v, arrow_type if name != "WIDTH" and name != "HEIGHT" else pa.float64())
               for name, v in base.items() if name not in ("URL", "TEXT")}
    columns[column] = pa.array(np.asarray(values, dtype=dtype), arrow_type)
    return normalize(pa.table({"URL": base["URL"], "TEXT": base["TEXT"], **columns}), 0)


def _expected_alive(cases: list[str], keep_above: bool) -> list[bool]:
    return [case == "equal" or (case == "ulp_above") == keep_above for case in cases]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("column", "limit", "keep_above"), THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_prefilter_keeps_the_threshold_itself(column: str, limit: float, keep_above: bool, dtype: type) -> None:
    cases = _boundary_values(limit, dtype)
    table = _metadata(column, list(cases.values()), dtype)
    options = {"max_watermark": 0.8, "max_unsafe": 0.3, "aesthetic_threshold": 5.1}
    judged = prefilter(table, None, 512, **options)
    assert alive(judged).to_pylist() == _expected_alive(list(cases), keep_above)
    dropped = [d for d, keep in zip(judged["drop_detail"].to_pylist(), alive(judged).to_pylist(), strict=True)
               if not keep]
    expected = [cases[c] for c in cases if not _expected_alive([c], keep_above)[0]]
    assert [float(dtype(d)) for d in dropped] == expected and all(len(d) <= 20 for d in dropped)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize(("column", "limit", "keep_above"), THRESHOLDS, ids=[t[0] for t in THRESHOLDS])
def test_select_agrees_with_prefilter(column: str, limit: float, keep_above: bool, dtype: type) -> None:
    """Scores from metadata are float32 in select, but the thresholds judge the metadata column as it was stored."""
    cases = _boundary_values(limit, dtype)
    table = scores_from_metadata(_metadata(column, list(cases.values()), dtype))
    size = pa.array([1024] * table.num_rows, pa.int32())
    table = with_verdict_columns(table.append_column("original_width", size).append_column("original_height", size))
    judged = select(table, 512, 5.1, 0.8, 0.3)
    kept = alive(judged).to_pylist()
    # select judges a metadata score by its metadata column, so float64 neighbours stay distinct too
    assert kept == _expected_alive(list(cases), keep_above)


def test_a_value_one_float32_ulp_above_the_watermark_limit_is_dropped_with_its_stored_value() -> None:
    above = float(np.nextafter(np.float32(0.8), np.float32(1)))
    judged = prefilter(_metadata("pwatermark", [above], np.float32), None, 512, 0.8, None, None)
    assert judged["drop_reason"].to_pylist() == ["metadata_watermark"]
    detail = judged["drop_detail"].to_pylist()[0]
    assert len(detail) <= 10 and np.float32(detail) == np.float32(above)  # the float32 text, not 0.800000071525574


def test_a_float32_score_equal_to_the_limit_is_never_on_the_dropped_side() -> None:
    """A cut at a float32 score itself (a median): its shortest text -0.048046656 is below the float64 value, yet
    the score is the limit."""
    from curate.stages.verdict import above, below

    value = float(np.float32(-0.048046656))
    scores = pa.array([value, float(np.nextafter(np.float32(value), np.float32(-1)))], pa.float32())
    assert below(scores, value).to_pylist() == [False, True]
    assert above(pa.array([0.5], pa.float32()), 0.5).to_pylist() == [False]
