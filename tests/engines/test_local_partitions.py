"""The local engine's spilled global step gives the verdicts of grouping every row at once, part by part."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.engines.local_partitions import VerdictRouter, key_partitions, spill
from curate.stages.ingest import format_key
from curate.stages.prefilter import group_url_duplicates
from curate.stages.verdict import verdict_schema


def _signatures(n: int, seed: int = 0) -> pa.Table:
    """url+caption signatures with repeats (same key and pair) and collisions (same key, other pair)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-(2**63), 2**63 - 1, size=n // 2, dtype=np.int64)
    chosen = rng.integers(0, len(keys), size=n)
    pairs = np.where(rng.random(n) < 0.1, rng.integers(0, 3, size=n), 0) + chosen * 10
    return pa.table({"key": [format_key(int(k)) for k in keys[chosen]], "pair_hash": pa.array(pairs, pa.int64()),
                     "row": pa.array(np.arange(n), pa.int64())})


def test_partitions_of_keys_are_spread_and_stable():
    keys = _signatures(4000)["key"]
    parts = key_partitions(keys, 7)
    assert parts.min() == 0 and parts.max() == 6 and np.bincount(parts).min() > 400
    assert np.array_equal(parts, key_partitions(keys, 7))


def test_spilled_grouping_equals_grouping_everything(tmp_path):
    table = _signatures(6000)
    whole = group_url_duplicates(table)
    assert whole.num_rows > 1000 and set(whole["drop_reason"].to_pylist()) == {"duplicate_url", "key_collision"}
    part_starts = np.arange(0, 6000, 500)
    batches = [table.slice(start, 500) for start in part_starts]
    files = spill(batches, lambda t: key_partitions(t["key"], 5), 5, tmp_path / "signatures")
    assert len(files) == 5
    router = VerdictRouter(tmp_path / "verdicts", part_starts, 3)
    for path in files:
        router.write(group_url_duplicates(pq.read_table(path)))
    per_part = list(router.per_part(verdict_schema()))
    assert len(per_part) == len(part_starts)
    for start, verdicts in zip(part_starts, per_part, strict=True):
        rows = verdicts["row"].to_numpy()
        assert ((rows >= start) & (rows < start + 500)).all() and np.all(np.diff(rows) > 0)
    assert pa.concat_tables(per_part).equals(whole.cast(verdict_schema()))
