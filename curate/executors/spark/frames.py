"""Spark plumbing shared by the Spark engine's modules: Arrow schemas, stage functions as mapInArrow, global index,
input files read each with its own schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, ROW, VERDICT_COLUMNS, table_schema
from curate.stages.ingest import check_input_schema
from curate.storage import checkpoint as io

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession
    from pyspark.sql.types import DataType, StructType

TableFunction = Callable[[pa.Table], pa.Table]
VERDICT_DDL = "row long, drop_stage string, drop_reason string, drop_detail string"
PARTITION, LOCAL_INDEX, INDEX = "_partition", "_local_index", "index"
FILE, ROW_IN_FILE = "_curate_file", "_curate_row_in_file"


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


def _kind(data_type: DataType, arrow_type: pa.DataType) -> str:
    """number, string, null or other; from Arrow for null, which Spark reads as int."""
    from pyspark.sql import types as T

    if pa.types.is_null(arrow_type):
        return "null"
    if isinstance(data_type, T.NumericType | T.BooleanType):
        return "number"
    return "string" if isinstance(data_type, T.StringType | T.BinaryType) else "other"


def _floating(target: str) -> bool:
    schema = table_schema("metadata")
    return target in schema.names and pa.types.is_floating(schema.field(target).type)


class _Group(NamedTuple):
    """Input files of one schema: one Spark read."""
    paths: list[str]
    arrow: pa.Schema
    mapping: dict[str, str]  # input column -> canonical name
    frame: DataFrame

    def fields(self) -> Iterator[tuple[str, str, DataType, str]]:
        """(input name, canonical name, Spark type, kind) of every column."""
        for field in self.frame.schema:
            kind = _kind(field.dataType, self.arrow.field(field.name).type)
            yield field.name, self.mapping[field.name], field.dataType, kind


def _common_types(groups: list[_Group]) -> dict[str, DataType | str]:
    """The Spark type of each column the files disagree on. Canonical ones: double, or string where some file holds
    strings (ingest parses them as it does per file). Others: the one type besides all-null columns; numbers of
    several widths are left to unionByName, which widens them; numbers in one file and text in another raise."""
    seen: dict[str, dict[DataType, tuple[str, str]]] = {}  # canonical name -> Spark type -> (kind, first file)
    for group in groups:
        for _, target, data_type, kind in group.fields():
            seen.setdefault(target, {}).setdefault(data_type, (kind, group.paths[0]))
    common: dict[str, DataType | str] = {}
    for target, types in seen.items():
        typed = [(t, path) for t, (kind, path) in types.items() if kind != "null"]
        kinds = {types[t][0] for t, _ in typed}
        if len(types) < 2:
            continue
        if target in table_schema("metadata").names:
            common[target] = "double" if _floating(target) and kinds <= {"number"} else "string"
        elif len(typed) == 1:
            common[target] = typed[0][0]
        elif kinds != {"number"}:
            (first, a), (second, b) = typed[:2]
            raise ValueError(f"column {target!r} is {first.simpleString()} in {a} but {second.simpleString()} in "
                             f"{b}; drop or convert it in one of them")
    return common


def _canonical_column(name: str, target: str, kind: str, common: dict[str, DataType | str]) -> Column:
    from pyspark.sql import functions as F

    column = F.col("`" + name.replace("`", "``") + "`")
    if target in common:
        if _floating(target) and kind == "number":  # float32 -> double -> text keeps its exact value
            column = column.cast("double")
        column = column.cast(common[target])
    return column.alias(target)


def read_parquet_files(spark: SparkSession, files: list[str]) -> DataFrame:
    """The rows of every file with canonical column names (ingest.canonical_names) and, where files disagree on a
    column's type, one type; a column some files lack is null there. Files with one schema are one read. Adds each
    row's file path (FILE) and place in its file (ROW_IN_FILE). Raises naming the file that is no parquet, has no
    URL column or a column of a type ingest cannot read."""
    from pyspark.sql import functions as F

    with ThreadPoolExecutor(max(1, min(16, len(files)))) as pool:  # footers only; on S3 each is a round trip
        schemas = list(pool.map(io.parquet_schema, files))
    by_schema: dict[str, tuple[pa.Schema, list[str]]] = {}
    for path, schema in zip(files, schemas, strict=True):
        key = schema.to_string(show_field_metadata=False, show_schema_metadata=False)
        by_schema.setdefault(key, (schema, []))[1].append(path)
    groups = []
    for schema, paths in by_schema.values():
        try:
            mapping = check_input_schema(schema)
        except ValueError as error:
            raise ValueError(f"{paths[0]}: {error}") from error
        groups.append(_Group(paths, schema, mapping, spark.read.parquet(*paths)))
    common = _common_types(groups)
    tags = [F.col("_metadata.file_path").alias(FILE), F.col("_metadata.row_index").alias(ROW_IN_FILE)]
    frames = [group.frame.select(*[_canonical_column(name, target, kind, common)
                                   for name, target, _, kind in group.fields()], *tags) for group in groups]
    return reduce(lambda a, b: a.unionByName(b, allowMissingColumns=True), frames)
