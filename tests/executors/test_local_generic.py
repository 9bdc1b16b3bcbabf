"""The local executor's generic runners: one verdict per row, chosen as Spark chooses it."""

from __future__ import annotations

import pyarrow as pa

from curate.executors.local.generic import first_verdicts


def test_the_first_verdict_per_row_is_the_smallest_detail() -> None:
    verdicts = pa.table({"row": pa.array([4, 1, 4, 4], pa.int64()), "drop_stage": ["s"] * 4,
                         "drop_reason": ["r"] * 4, "drop_detail": ["pHash 03 bits", "x", "pHash 01 bits", "pHash 02"]})
    first = first_verdicts(verdicts)
    assert first["row"].to_pylist() == [1, 4] and first["drop_detail"].to_pylist() == ["x", "pHash 01 bits"]
    assert first_verdicts(verdicts.slice(0, 0)).num_rows == 0
