"""`--scores model` through the Spark engine: the tiny real-architecture models loaded once per Python worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curate.models.testing import write_tiny_weights
from curate.pipeline.run import run_local


def test_model_scores_on_spark_match_the_local_engine(spark: Any, tmp_path: Path, corpus_factory: Any,
                                                      config_factory: Any) -> None:
    from curate.executors.spark.engine import run_spark

    corpus = corpus_factory(16)
    weights = write_tiny_weights(tmp_path / "weights")
    config = config_factory(scores="model", device="cpu", batch_size=8, threshold=0.0, max_watermark=1.0,
                            world_size=2, workers_per_rank=1, dedup=["url", "exact", "phash"], **weights)
    local = run_local([str(corpus.path)], tmp_path / "local", config)
    stats = run_spark(spark, [str(corpus.path)], str(tmp_path / "spark"), config)
    assert stats["scores_source"] == local["scores_source"] == "model"
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    ours = pq.read_table(tmp_path / "spark" / "samples.parquet").sort_by("key").to_pydict()
    theirs = pq.read_table(tmp_path / "local" / "samples.parquet").sort_by("key").to_pydict()
    assert ours["key"] == theirs["key"] and ours["shard"] == theirs["shard"] and len(ours["key"]) >= 2
    assert ours["aesthetic_score"] == pytest.approx(theirs["aesthetic_score"], abs=1e-4)
    assert ours["watermark_prob"] == pytest.approx(theirs["watermark_prob"], abs=1e-4)


def test_model_punsafe_and_max_unsafe_match_the_local_engine(spark: Any, tmp_path: Path, corpus_factory: Any,
                                                             config_factory: Any) -> None:
    """The NSFW detector runs in the Spark workers as locally, and --max-unsafe cuts its punsafe the same way."""
    import numpy as np
    import pyarrow as pa

    from curate.config import Config
    from curate.executors.spark.engine import run_spark
    from curate.pipeline.run import recut

    corpus = corpus_factory(16)
    weights = write_tiny_weights(tmp_path / "weights")
    config = config_factory(scores="model", device="cpu", batch_size=8, threshold=0.0, max_watermark=1.0,
                            world_size=2, workers_per_rank=1, dedup=["url"], **weights)
    run_local([str(corpus.path)], tmp_path / "local", config)

    def punsafe(out: Path) -> dict[str, float]:
        table = pa.concat_tables(pq.read_table(p) for p in sorted((out / "stages" / "score").glob("part-*.parquet")))
        table = table.filter(pa.compute.is_valid(table["punsafe"]))
        return dict(zip(table["row"].to_pylist(), table["punsafe"].to_pylist(), strict=True))

    local_unsafe = punsafe(tmp_path / "local")
    cut = float(np.median(list(local_unsafe.values())))
    config = Config(**{**config.to_dict(), "max_unsafe": cut})
    local = recut(tmp_path / "local", config)
    stats = run_spark(spark, [str(corpus.path)], str(tmp_path / "spark"), config)
    spark_unsafe = punsafe(tmp_path / "spark")
    assert spark_unsafe.keys() == local_unsafe.keys() and len(local_unsafe) >= 8
    assert [spark_unsafe[row] for row in local_unsafe] == pytest.approx(list(local_unsafe.values()), abs=1e-5)
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]

    def unsafe_rows(out: Path) -> list[int]:
        ledger = pq.read_table(out / "ledger.parquet")
        return sorted(row for row, reason in zip(ledger["row"].to_pylist(), ledger["reason"].to_pylist(),
                                                 strict=True) if reason == "unsafe")

    assert unsafe_rows(tmp_path / "spark") == unsafe_rows(tmp_path / "local") and unsafe_rows(tmp_path / "local")
