"""`--min-clip-score` through the Spark engine: the same clip_score column and the same verdicts as the local one."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.models.testing import write_tiny_weights
from curate.pipeline.run import recut, run_local


def low_clip_details(ledger: Path) -> dict[str, float]:
    table = pq.read_table(ledger, columns=["key", "reason", "detail"])
    table = table.filter(pc.equal(table["reason"], "low_clip_score"))
    return {key: float(detail) for key, detail in zip(table["key"].to_pylist(), table["detail"].to_pylist(),
                                                       strict=True)}


def test_min_clip_score_on_spark_matches_the_local_engine(spark: Any, tmp_path: Path, corpus_factory: Any,
                                                          config_factory: Any) -> None:
    from curate.executors.spark.engine import run_spark

    corpus = corpus_factory(16)
    weights = write_tiny_weights(tmp_path / "weights")
    options = {"scores": "model", "device": "cpu", "batch_size": 8, "threshold": 0.0, "max_watermark": 1.0,
               "world_size": 2, "workers_per_rank": 1, "dedup": ["url", "exact", "phash"], **weights}
    run_local([str(corpus.path)], tmp_path / "local", config_factory(**options))
    scored = pq.read_table(tmp_path / "local" / "stages" / "score", columns=["clip_score"])["clip_score"]
    cut = float(np.median(scored.drop_null().to_numpy()))  # the tiny model's cosines: cut half of them
    config = config_factory(**options, min_clip_score=cut)
    local = recut(tmp_path / "local", config)  # a re-cut may change --min-clip-score: no model runs again
    shutil.rmtree(tmp_path / "spark", ignore_errors=True)
    stats = run_spark(spark, [str(corpus.path)], str(tmp_path / "spark"), config)
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    assert local["dropped_by_stage"]["select"]["low_clip_score"] >= 2
    ours, theirs = low_clip_details(tmp_path / "spark" / "ledger.parquet"), low_clip_details(
        tmp_path / "local" / "ledger.parquet")
    assert sorted(ours) == sorted(theirs)
    assert [ours[key] for key in sorted(ours)] == pytest.approx([theirs[key] for key in sorted(ours)], abs=1e-4)
    assert all(value < cut for value in theirs.values())
