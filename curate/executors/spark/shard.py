"""Spark sharding: the seeded global order as a sort, then the pipeline's shard apply step, one task per tar.

The driver holds counts, byte totals, the shard plan and one index entry per shard; never rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from curate.config import Config
from curate.executors.spark.frames import INDEX, global_index, map_stage
from curate.pipeline import plan as pipeline_plan
from curate.pipeline import steps as pipeline_steps
from curate.pipeline.plan import RunFacts
from curate.schema import CAPTION, DROP_REASON, JPG, KEY, POSITION, ROW, SHARD
from curate.stages import shard as shard_stage
from curate.stages.buckets import BUCKET_HEIGHT, BUCKET_WIDTH, bucket_name
from curate.storage import files as storage
from curate.wds.writer import CARRIED_SKIP, PLACEMENT_COLUMNS, TarSink, sample_document

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
DRAW = "_draw"
# Set to a folder: the first shard-writing task to get there fails once, after writing part of its tar (tests).
FAIL_ONCE_ENV = "CURATE_SPARK_FAIL_SHARD_ONCE"
ENTRY_DDL = "shard long, url string, nsamples long, filesize long, sha256 string"


def _draws(seed: int) -> Any:
    """shuffle_positions' sort key as a signed long (x ^ 2^63 keeps the unsigned order under signed compare)."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            draws = shard_stage.shuffle_draws(batch.column(KEY).to_pylist(), seed)
            signed = (draws ^ np.uint64(1 << 63)).view(np.int64)
            yield pa.RecordBatch.from_arrays([batch.column(ROW), batch.column(KEY), pa.array(signed)],
                                             [ROW, KEY, DRAW])
    return run


def plan(spark: SparkSession, judged: DataFrame, config: Config, facts: RunFacts,
         scratch: str) -> tuple[DataFrame, Any]:
    """judged with position, shard and aspect bucket added, the remainder flagged; and the ShardPlan (from counts).
    The global order is a Spark sort here; the plan and the apply step are the pipeline's (plan.shard_plan,
    pipeline_steps.bound("shard"))."""
    from pyspark.sql import functions as F

    survivors = judged.filter(F.col(DROP_REASON).isNull())
    totals = survivors.agg(F.count("*").alias("n"), F.sum("jpg_bytes").alias("jpg"),
                           F.sum(F.octet_length(F.coalesce(CAPTION, F.lit("")))).alias("text")).collect()[0]
    n = int(totals["n"])
    total = int(totals["jpg"] or 0) + int(totals["text"] or 0) + n * shard_stage.estimated_sample_bytes(0, 0)
    shard_plan = pipeline_plan.shard_plan(config, n, total)
    drawn = survivors.select(ROW, KEY).mapInArrow(_draws(config.seed), f"{ROW} long, {KEY} string, {DRAW} long")
    order = global_index(spark, drawn, [DRAW, KEY], scratch).select(ROW, F.col(INDEX).alias(POSITION))
    placed = judged.drop(POSITION, SHARD).join(order, ROW, "left") \
        .withColumn(POSITION, F.coalesce(F.col(POSITION), F.lit(-1)).cast("long"))
    return map_stage(placed, pipeline_steps.bound("shard", config, facts, plan=shard_plan)), shard_plan


def _fail_once(folder: str | None, tar: TarSink) -> None:
    """Test hook: the first writer to get here dies like a killed executor, leaving its partial temporary tar."""
    if folder is None:
        return
    try:
        with open(os.path.join(folder, "failed-once"), "x"):
            pass
    except FileExistsError:
        return
    tar.handle.flush()
    log.error("%s: killing this Python worker in the middle of %s", FAIL_ONCE_ENV, tar.final)
    os._exit(17)


def _writer(shard_dir: str, prefix: str, metadata_columns: list[str], fail_folder: str | None) -> Any:
    """mapInArrow body: rows sorted by (shard, position) stream into one tar per shard; yields index entries."""
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        tar: TarSink | None = None
        current = -1
        try:
            for batch in batches:
                for row in batch.to_pylist():
                    if tar is None or row[SHARD] != current:
                        if tar is not None:
                            yield _entry(current, str(tar.final), tar.close())
                        current, tar = row[SHARD], TarSink(f"{shard_dir}/{shard_stage.shard_name(prefix, row[SHARD])}")
                    tar.add(shard_stage.sample_bytes(row[KEY], row[JPG], row.get(CAPTION) or "",
                                                     sample_document(row, metadata_columns)))
                    if tar.samples == 2:
                        _fail_once(fail_folder, tar)
            if tar is not None:
                yield _entry(current, str(tar.final), tar.close())
                tar = None
        finally:
            if tar is not None:
                tar.abandon()
    return run


def _entry(shard: int, path: str, facts: dict[str, Any]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([{"shard": shard, "url": path.rsplit("/", 1)[-1], **facts}])


def write_shards(placed: DataFrame, downloaded: DataFrame, shard_plan: Any, config: Config,
                 shard_dir: str) -> list[dict[str, Any]]:
    """Join each placed sample with its image, partition by shard, write every tar; the wids entries in order."""
    from pyspark.sql import functions as F

    metadata_columns = [name for name in placed.columns if name not in CARRIED_SKIP]
    assignment = placed.filter(F.col(SHARD) >= 0).select(*PLACEMENT_COLUMNS)
    images = downloaded.drop(*[c for c in assignment.columns if c != ROW]).join(assignment, ROW)
    ordered = images.repartition(shard_plan.num_shards, SHARD).sortWithinPartitions(SHARD, POSITION)
    storage.makedirs(shard_dir)
    writer = _writer(shard_dir, config.shard_name, metadata_columns, os.environ.get(FAIL_ONCE_ENV))
    rows = ordered.mapInArrow(writer, ENTRY_DDL).collect()
    storage.remove_temporaries(shard_dir)  # left by attempts killed mid-tar (an object store holds none)
    entries = sorted((r.asDict() for r in rows), key=lambda entry: entry["shard"])
    if [e["shard"] for e in entries] != list(range(shard_plan.num_shards)):
        raise RuntimeError(f"shard writers returned {len(entries)} entries for {shard_plan.num_shards} shards")
    per_bucket: dict[int, dict[str, int]] = {}
    for row in assignment.groupBy(SHARD, BUCKET_WIDTH, BUCKET_HEIGHT).count().collect():
        per_bucket.setdefault(row[SHARD], {})[bucket_name(row[BUCKET_WIDTH], row[BUCKET_HEIGHT])] = row["count"]
    return [{**{k: v for k, v in entry.items() if k != "shard"}, "buckets": dict(sorted(per_bucket.get(
        entry["shard"], {}).items()))} for entry in entries]

