"""The Spark executor's two generic runners: a map step through mapInArrow, and a global step as signatures grouped
by GROUP (groupBy/applyInArrow on a bounded number of partitions), the reference files read one per task, the
first verdict per row joined back. Every step without a runner of its own runs through these."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from curate.executors.spark.engine import SparkRun
from curate.executors.spark.frames import VERDICT_DDL, apply_flags, arrow_schema, conform, map_stage, spark_schema
from curate.pipeline.steps import GROUP, Step
from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, ROW
from curate.stages.verdict import verdict_schema, with_verdict_columns

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


def map_step(run: SparkRun, step: Step, frame: DataFrame) -> DataFrame:
    assert step.bind is not None, f"{step.name}: a map step without a function"
    return map_stage(frame, step.bind(run.config, run.facts))


def global_step(run: SparkRun, step: Step, frame: DataFrame) -> DataFrame:
    """signature -> group -> apply: signature rows of the live rows and of the reference files, grouped by GROUP
    modulo the shuffle partitions (each group call holds whole groups), the first verdict per row set on the rows."""
    from pyspark.sql import functions as F

    spec = step.global_step
    assert spec is not None, f"{step.name}: a global step without signature, group and apply"
    config, facts = run.config, run.facts
    signature, group = spec.signature(config, facts), spec.group(config, facts)
    columns = [c for c in (*spec.columns, ROW, DROP_REASON) if c in frame.columns]
    live = frame.filter(F.col(DROP_REASON).isNull()).select(*columns)
    empty = with_verdict_columns(pa.schema([f for f in arrow_schema(live)]).empty_table())
    schema = signature(empty).schema
    signatures = map_stage(live, lambda table: signature(with_verdict_columns(table)), schema)
    references = spec.references(config)
    if references:
        def read(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
            for batch in batches:
                for path in batch.column(0).to_pylist():
                    for table in spec.read_reference(config, path):
                        yield from conform(table, schema).to_batches()

        paths = run.spark.createDataFrame([(path,) for path in references], "path string")
        entries = paths.repartition(len(references)).mapInArrow(read, spark_schema(schema))
        signatures = signatures.unionByName(entries)
    partitions = int(run.spark.conf.get("spark.sql.shuffle.partitions") or 200)
    groups = signatures.withColumn("_partition", F.pmod(F.col(GROUP), F.lit(partitions)))

    def judge(table: pa.Table) -> pa.Table:
        found = group(table.drop_columns(["_partition"]))
        return found.select(verdict_schema().names).cast(verdict_schema())

    flags = groups.groupBy("_partition").applyInArrow(judge, VERDICT_DDL)
    first = F.min(F.struct(DROP_DETAIL, DROP_STAGE, DROP_REASON)).alias("_first")  # local: first_verdicts' order
    flags = flags.groupBy(ROW).agg(first).select(ROW, *[F.col(f"_first.{c}").alias(c)
                                                        for c in (DROP_STAGE, DROP_REASON, DROP_DETAIL)])
    return apply_flags(frame, flags)
