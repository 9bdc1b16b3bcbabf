"""Spark plumbing shared by the Spark engine's modules: Arrow schemas, stage functions as mapInArrow, global index."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, ROW, VERDICT_COLUMNS

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql.types import StructType

TableFunction = Callable[[pa.Table], pa.Table]
VERDICT_DDL = "row long, drop_stage string, drop_reason string, drop_detail string"
PARTITION, LOCAL_INDEX, INDEX = "_partition", "_local_index", "index"


def arrow_schema(df: DataFrame) -> pa.Schema:
    """The Arrow schema mapInArrow hands a DataFrame's batches over in."""
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(df.schema)


def spark_schema(schema: pa.Schema) -> StructType:
    """Arrow to Spark, every field nullable (Spark checks nothing for Arrow UDF output and stages write nulls)."""
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(pa.schema([field.with_nullable(True) for field in schema]))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Columns in the declared order and types: a stage may infer a narrower type on one batch than another."""
    return table.select(schema.names).cast(pa.schema([field.with_nullable(True) for field in schema]))


def output_schema(function: TableFunction, schema: pa.Schema) -> pa.Schema:
    """The schema a stage function produces, found by running it on an empty table of the input schema."""
    return function(schema.empty_table()).schema


def map_stage(df: DataFrame, function: TableFunction, schema: pa.Schema | None = None,
              profile: Any = None) -> DataFrame:
    """Run a pure stage function over every Arrow batch of df (spark.sql.execution.arrow.maxRecordsPerBatch rows)."""
    out = schema if schema is not None else output_schema(function, arrow_schema(df))

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows:
                yield from conform(function(pa.Table.from_batches([batch])), out).to_batches()

    if profile is not None:  # stage-level scheduling: e.g. one GPU for each score task only
        return df.mapInArrow(run, spark_schema(out), profile=profile)
    return df.mapInArrow(run, spark_schema(out))


def flagged_rows(table: pa.Table) -> pa.Table:
    """(row, verdict columns) of the rows a stage function flagged: the small result a dedup group sends back."""
    hit = table.filter(pc.is_valid(table[DROP_REASON]))
    return pa.table({ROW: pc.cast(hit[ROW], pa.int64()), DROP_STAGE: hit[DROP_STAGE], DROP_REASON: hit[DROP_REASON],
                     DROP_DETAIL: hit[DROP_DETAIL]})


def apply_flags(df: DataFrame, flags: DataFrame | None) -> DataFrame:
    """Left-join (row, verdict) flags into df; a row's earlier verdict is never overwritten (verdict.with_reason)."""
    from pyspark.sql import functions as F

    if flags is None:
        return df
    renamed = flags.select(ROW, *[F.col(name).alias(f"_new_{name}") for name in VERDICT_COLUMNS])
    joined = df.join(renamed, ROW, "left")
    hit = F.col(DROP_REASON).isNull() & F.col(f"_new_{DROP_REASON}").isNotNull()
    columns = [F.when(hit, F.col(f"_new_{c}")).otherwise(F.col(c)).alias(c) if c in VERDICT_COLUMNS else F.col(c)
               for c in df.columns]
    return joined.select(*columns)


def _number_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Tag rows with their partition and their place inside it, in the order the partition arrives."""
    from pyspark import TaskContext

    context = TaskContext.get()
    partition, seen = (context.partitionId() if context else 0), 0
    for batch in batches:
        table = pa.Table.from_batches([batch])
        local = pa.array(np.arange(seen, seen + table.num_rows, dtype=np.int64))
        seen += table.num_rows
        yield from table.append_column(PARTITION, pa.array(np.full(table.num_rows, partition, np.int64))) \
            .append_column(LOCAL_INDEX, local).to_batches()


def global_index(spark: SparkSession, df: DataFrame, order: list[str], path: str) -> DataFrame:
    """df with `index`, 0..n-1 in the total order `order`, without collecting rows: a global sort, a numbered
    pass written to `path` (so the counts and the numbers come from one evaluation), then per-partition offsets."""
    from pyspark.sql import functions as F

    schema = arrow_schema(df).append(pa.field(PARTITION, pa.int64())).append(pa.field(LOCAL_INDEX, pa.int64()))
    df.orderBy(*order).mapInArrow(_number_partition, spark_schema(schema)).write.mode("overwrite").parquet(path)
    numbered = spark.read.parquet(path)
    counts = sorted((r[PARTITION], r["n"]) for r in numbered.groupBy(PARTITION).agg(F.count("*").alias("n")).collect())
    offsets, total = [], 0
    for partition, count in counts:
        offsets.append((partition, total))
        total += count
    table = spark.createDataFrame(offsets or [(0, 0)], f"{PARTITION} long, _offset long")
    return (numbered.join(F.broadcast(table), PARTITION)
            .withColumn(INDEX, F.col(LOCAL_INDEX) + F.col("_offset")).drop(PARTITION, LOCAL_INDEX, "_offset"))
