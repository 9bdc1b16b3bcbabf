"""The local shard stage and books as partitioned global steps: the same tars, samples and ledger whatever the
partition sizes, and the shuffle of one table (stages.shard.shuffle_positions)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.executors.local import shard as local_shard
from curate.executors.local.engine import LocalRun
from curate.pipeline.run import rerun_stage, run_local
from curate.schema import DROP_REASON, KEY, POSITION, ROW, SHARD
from curate.stages import shard as shard_stage


def _outputs(out) -> dict[str, object]:
    tars = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted((out / "shards").glob("*.tar"))}
    stats = json.loads((out / "stats.json").read_text())
    return {"tars": tars, "index": json.loads((out / "shards" / "index.json").read_text()),
            "samples": pq.read_table(out / "samples.parquet"), "ledger": pq.read_table(out / "ledger.parquet"),
            "counts": (stats["kept"], stats["dropped"], stats["dropped_by_stage"])}


def test_small_partitions_give_the_same_shards_and_books(tmp_path, corpus_factory, config_factory, monkeypatch):
    corpus = corpus_factory(90)
    out = tmp_path / "out"
    config = config_factory(batch_size_rows=16, world_size=2, workers_per_rank=2)  # several parts
    run_local([str(corpus.path)], out, config)
    whole = _outputs(out)
    assert len(LocalRun(out, config).checkpoint("select").parts()) >= 6
    assert whole["tars"] and whole["samples"].num_rows > 8

    # A partition of 3 survivors, a samples bucket of 2 positions: many of each, same result.
    monkeypatch.setattr(local_shard, "ROWS_PER_DRAW_PARTITION", 3)
    monkeypatch.setattr(local_shard, "SAMPLE_ROWS_PER_BUCKET", 2)
    rerun_stage("shard", out, config)
    parted = _outputs(out)
    assert parted["tars"] == whole["tars"]
    assert parted["index"] == whole["index"]
    assert parted["samples"].equals(whole["samples"])
    assert parted["ledger"].equals(whole["ledger"])
    assert parted["counts"] == whole["counts"]

    # The positions are those of shuffling every survivor as one table.
    run = LocalRun(out, config)
    select = run.checkpoint("select").read([KEY, ROW, DROP_REASON])
    survivors = select.filter(pc.is_null(select[DROP_REASON]))
    expected = dict(zip(survivors[ROW].to_pylist(),
                        shard_stage.shuffle_positions(survivors[KEY].to_pylist(), config.seed).tolist(), strict=True))
    placed = run.checkpoint("shard").read([ROW, POSITION, SHARD])
    got = {row: position for row, position in zip(placed[ROW].to_pylist(), placed[POSITION].to_pylist(), strict=True)
           if position >= 0}
    assert got == expected
    samples = parted["samples"]
    assert samples[POSITION].to_pylist() == sorted(samples[POSITION].to_pylist())  # (shard, position) order


def test_draw_ranges_keep_the_draw_order():
    draws = np.sort(np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64) * np.uint64(2))
    draws = np.r_[np.uint64(0), draws, np.uint64(2**64 - 1)]
    for partitions in (1, 3, 7, 1000):
        found = shard_stage.draw_ranges(draws, partitions)
        assert found.min() >= 0 and found.max() < partitions
        assert np.all(np.diff(found) >= 0)  # rising draws never go to a lower partition


def test_empty_parts_are_given_no_rows():
    starts = local_shard._part_starts([None, 0, None, None, 40, None], 100)
    assert starts.tolist() == [0, 0, 40, 40, 40, 100]
    assert np.all(np.diff(starts) >= 0)
    # a row goes to the last part starting at or before it: the non-empty one
    assert (np.searchsorted(starts, [0, 39, 40, 99], side="right") - 1).tolist() == [1, 1, 4, 4]


def test_rows_are_cut_at_each_end_across_tables():
    def source(rows: list[int]) -> pa.Table:
        n = len(rows)
        return pa.table({KEY: ["k"] * n, ROW: rows, "url": ["u"] * n, "drop_stage": [None] * n,
                         "drop_reason": [None] * n, "drop_detail": [None] * n, "_kept": [True] * n},
                        schema=local_shard.SOURCE_SCHEMA)

    tables = iter([source([1, 2, 5]), source([]), source([6, 9, 12]), source([13])])
    cut = [table[ROW].to_pylist() for table in local_shard._between(tables, [2, 6, 10, 14])]
    assert cut == [[1], [2, 5], [6, 9], [12, 13]]
