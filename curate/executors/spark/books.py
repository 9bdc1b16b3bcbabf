"""The Spark engine's books: ledger, samples, index.json, sizes.json and stats.json (the local engine's shapes), and
the check that every input row is accounted for.
ledger.parquet and samples.parquet are parquet folders of ordered parts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curate.executors.spark.frames import arrow_schema, map_stage
from curate.pipeline import accounting
from curate.schema import POSITION, ROW, SHARD, table_schema
from curate.storage import files as storage
from curate.wds.index import index_document, sizes_document

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

    from curate.executors.spark.engine import SparkRun

def write_json(run: SparkRun, name: str, value: Any) -> None:
    """JSON by the storage layer's one writer (the local engine's too), atomically, on any fsspec URL."""
    storage.write_json(value, run.path(name))


def check_accounting(input_rows: int, samples: DataFrame, ledger: DataFrame) -> None:
    """input rows = kept + dropped, every row number 0..n-1 exactly once: one aggregation, no rows collected; the
    check itself is the books' (accounting.check_totals)."""
    from pyspark.sql import functions as F

    rows = samples.select(ROW).unionAll(ledger.select(ROW))
    facts = rows.agg(F.countDistinct(ROW).alias("distinct"), F.min(ROW).alias("low"),
                     F.max(ROW).alias("high")).collect()[0]
    accounting.check_totals(input_rows, samples.count(), ledger.count(), facts["distinct"], facts["low"],
                            facts["high"])


def drop_counts(ledger: DataFrame) -> dict[str, dict[str, int]]:
    """{stage: {reason: count}} in pipeline order: one aggregation, merged by the books' accounting.merged_counts."""
    return accounting.merged_counts([(row["stage"], row["reason"], row["count"])
                                     for row in ledger.groupBy("stage", "reason").count().collect()])


def write_ledger(run: SparkRun, judged: DataFrame) -> DataFrame:
    """ledger.parquet (ordered parts) of every row judged so far; read back from what was written."""
    ledger = map_stage(judged, accounting.ledger_table, table_schema("ledger")).orderBy(ROW)
    ledger.write.mode("overwrite").parquet(run.path("ledger.parquet"))
    return run.spark.read.parquet(run.path("ledger.parquet"))


def write_books(run: SparkRun, placed: DataFrame, shard_plan: Any, entries: list[dict[str, Any]],
                facts: dict[str, Any]) -> dict[str, Any]:
    """index.json, ledger.parquet, samples.parquet and stats.json; raises AccountingError if a row went missing."""
    started = time.perf_counter()
    config = run.config
    write_json(run, "shards/index.json", index_document(config, shard_plan, entries))
    write_json(run, "shards/sizes.json", sizes_document(entries))
    placed_schema = arrow_schema(placed)
    samples_schema = accounting.samples_table(placed_schema.empty_table()).schema
    ledger = write_ledger(run, placed)
    samples = map_stage(placed, accounting.samples_table, samples_schema).orderBy(SHARD, POSITION)
    samples.write.mode("overwrite").parquet(run.path("samples.parquet"))
    samples = run.spark.read.parquet(run.path("samples.parquet"))
    input_rows = facts["input_rows"]
    check_accounting(input_rows, samples, ledger)
    counts = drop_counts(ledger)
    run.timings["books"] = time.perf_counter() - started
    shards = {"num_shards": shard_plan.num_shards, "samples_per_shard": shard_plan.samples_per_shard,
              "remainder": shard_plan.remainder, "seconds": run.timings.get("shard", 0.0)}
    stats = accounting.stats_document(
        input_rows=input_rows, kept=samples.count(), counts=counts, judged_by=facts["judged_by"],
        not_reconsidered=facts["not_reconsidered"], scores=facts["scores"],
        dedup={**facts["dedup"], "seconds": run.timings.get("dedup", 0.0)}, shards=shards,
        timings={**run.timings, "total": time.perf_counter() - facts["started"]}, config=config.to_dict(),
        engine="spark")
    write_json(run, "stats.json", stats)
    return stats


__all__ = ["write_books", "pa"]
