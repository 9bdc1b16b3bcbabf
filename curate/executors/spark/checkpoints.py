"""The Spark engine's checkpoints in the local engine's layout (curate.storage.checkpoint.Checkpoint), so every
`curate` command (select, shard, retry, verify, report) works on a Spark output as on a local one.

Rows are cut into parts by row number (`starts`: each part's first row; a part never spans two input files), the
same cut for every stage: stages/S/part-i.parquet holds the rows of part i still alive after S (for select and
shard: every row that reached S), stages/S/dropped-i.parquet the rows S dropped, stages/S/_SUCCESS the stage's
facts as JSON. One Spark task writes all files of a part, streamed in row order through the storage layer (a
retried task rewrites the same bytes); the driver writes the empty parts and the marker, and holds one count per
part. Spark reads a stage back as its folder plus the dropped rows of the stages before it: every row once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.executors.spark.frames import arrow_schema, spark_schema
from curate.pipeline.steps import DROPPING_STAGES, STAGE_NAMES
from curate.schema import DROP_STAGE, ROW
from curate.storage import files as storage

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

PART = "_curate_part"
WRITTEN_DDL = "part long, target string, rows long"


def file_starts(file_rows: list[int], batch_rows: int) -> np.ndarray:
    """Each part's first row: every file (its row count, in input order) cut into batch_rows pieces, as the local
    ingest cuts it."""
    starts: list[int] = []
    offset = 0
    for count in file_rows:
        starts += range(offset, offset + count, max(batch_rows, 1))
        offset += count
    return np.array(starts or [0], dtype=np.int64)


def earlier_dropping(stage: str) -> list[str]:
    """The dropping stages before `stage` (their dropped rows never reach it)."""
    return [s for s in DROPPING_STAGES if STAGE_NAMES.index(s) < STAGE_NAMES.index(stage)]


LIVE = ""  # the targets' key of the rows no stage dropped


class _PartFiles:
    """The open files of one part, one per target (live rows, or the rows one stage dropped), each opened at its first
    rows (their parquet options come from them); the dropped files close first, so part-i, which marks the part
    done, appears last (empty when the part has no live rows)."""

    def __init__(self, targets: dict[str, str], schema: pa.Schema, number: int) -> None:
        self.targets, self.schema, self.number = targets, schema, number
        self.order = [key for key in targets if key != LIVE] + [LIVE]
        self.stacks = {key: ExitStack() for key in self.order}
        self.writers: dict[str, Any] = {}
        self.counts = dict.fromkeys(self.order, 0)

    def path(self, key: str) -> str:
        return f"{self.targets[key]}-{self.number:06d}.parquet"

    def write(self, key: str, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if key not in self.writers:
            self.writers[key] = self.stacks[key].enter_context(storage.table_writer(self.path(key), self.schema, table))
        self.writers[key](table)
        self.counts[key] += table.num_rows

    def close(self, error: BaseException | None = None) -> pa.RecordBatch:
        for key in self.order:
            if error is not None:  # a failed attempt: the storage layer discards its temporaries
                self.stacks[key].__exit__(type(error), error, error.__traceback__)
            else:
                self.stacks[key].close()
        if error is None and LIVE in self.targets and LIVE not in self.writers:
            storage.write_table(self.schema.empty_table(), self.path(LIVE))
        return pa.RecordBatch.from_pylist([{"part": self.number, "target": key, "rows": self.counts[key]}
                                           for key in self.order])


def routes_for(targets: dict[str, str]) -> dict[str, list[str]]:
    """Per dropped-rows target, the drop_stage values it holds: its stage, and for the first dropping stage the rows a
    stage before it marked without dropping them (WebDataset ingest's damaged members), as the local engine does."""
    first = DROPPING_STAGES[0]
    before = [s for s in STAGE_NAMES[:STAGE_NAMES.index(first)] if s not in DROPPING_STAGES]
    return {key: [key, *(before if key == first else [])] for key in targets if key != LIVE}


def _writer(targets: dict[str, str], schema: pa.Schema) -> Any:
    """mapInArrow body over rows sorted by (part, row): per part, one file per target (by drop_stage)."""
    routes = {key: pa.array(values, pa.string()) for key, values in routes_for(targets).items()}

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        files: _PartFiles | None = None
        try:
            for batch in batches:
                table = pa.Table.from_batches([batch])
                parts = table[PART].to_numpy()
                stages = pa.array([LIVE] * table.num_rows, pa.string())  # select's and shard's verdicts stay in part-i
                if DROP_STAGE in table.column_names:
                    for key, values in routes.items():
                        hit = pc.fill_null(pc.is_in(table[DROP_STAGE], value_set=values), False)
                        stages = pc.if_else(hit, pa.scalar(key, pa.string()), stages)
                for number in np.unique(parts).tolist():  # sorted: a part ends where the next begins
                    if files is None or files.number != number:
                        if files is not None:
                            yield files.close()
                        files = _PartFiles(targets, schema, number)
                    in_part = pa.array(parts == number)
                    for key in targets:
                        files.write(key, table.filter(pc.and_(in_part, pc.equal(stages, key))).drop_columns([PART]))
            if files is not None:
                done, files = files, None
                yield done.close()
        except BaseException as error:
            if files is not None:
                files.close(error)
            raise
    return run


def _parts_of(starts: np.ndarray) -> Any:
    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            rows = batch.column(ROW).to_numpy(zero_copy_only=False)
            parts = np.searchsorted(starts, rows, side="right") - 1
            yield pa.RecordBatch.from_arrays([*batch.columns, pa.array(parts.astype(np.int64))],
                                             [*batch.schema.names, PART])
    return run


class LocalLayout:
    """Writes and reads a Spark run's stages in the local engine's checkpoint layout under OUT/stages."""

    def __init__(self, spark: SparkSession, out: str, starts: np.ndarray) -> None:
        self.spark, self.out, self.starts = spark, out, starts

    def folder(self, stage: str) -> str:
        return f"{self.out}/stages/{stage}"

    def write(self, stage: str, df: DataFrame, meta: dict[str, Any] | None,
              also: tuple[str, ...] = ()) -> dict[str, int]:
        """df (every row of the run, with its verdicts) as stage's checkpoint: its live rows and, for a dropping
        stage, the rows it dropped; with `also`, the dropped rows of those stages too (prefilter's, which Spark judges
        inside its download job). Rows other stages dropped are in their files already. Returns the rows written per
        target: "" (live) and each stage whose dropped rows were written."""
        from pyspark.sql import functions as F

        folder = self.folder(stage)
        targets = {LIVE: f"{folder}/part"}
        for name in (*also, stage):
            if name in DROPPING_STAGES:
                targets[name] = f"{self.folder(name)}/dropped"
        for name in {*also, stage}:
            storage.remove(self.folder(name))
            storage.makedirs(self.folder(name))
        kept = [value for values in routes_for(targets).values() for value in values]
        if DROP_STAGE not in df.columns:  # ingest: no verdicts yet
            reaching = df
        elif kept:
            reaching = df.filter(F.col(DROP_STAGE).isNull() | F.col(DROP_STAGE).isin(kept))
        else:
            gone = [value for values in routes_for(dict.fromkeys(DROPPING_STAGES, "")).values() for value in values]
            reaching = df.filter(F.col(DROP_STAGE).isNull() | ~F.col(DROP_STAGE).isin(gone))
        schema = arrow_schema(reaching)
        tagged = reaching.mapInArrow(_parts_of(self.starts), spark_schema(schema.append(pa.field(PART, pa.int64()))))
        tasks = max(1, min(len(self.starts), self.spark.sparkContext.defaultParallelism * 4))
        ordered = tagged.repartition(tasks, PART).sortWithinPartitions(PART, ROW)
        written = ordered.mapInArrow(_writer(targets, schema), WRITTEN_DDL).collect()
        for name in {*also, stage}:
            storage.remove_temporaries(self.folder(name))  # left by attempts killed mid-part
        seen = {row["part"] for row in written}
        for index in range(len(self.starts)):  # the local layout has a part-i for every part, empty or not
            if index not in seen:
                storage.write_table(schema.empty_table(), f"{folder}/part-{index:06d}.parquet")
        if meta is not None:  # else the caller marks it done later
            storage.write_json(meta, f"{folder}/_SUCCESS")
        counts = dict.fromkeys(targets, 0)
        for row in written:
            counts[row["target"]] += row["rows"]
        return counts

    def read(self, stage: str) -> DataFrame:
        """Every row of the run as of `stage`: its files, then the dropped rows of the stages before it."""
        frame = self.spark.read.parquet(self.folder(stage))
        for earlier in earlier_dropping(stage):
            if storage.glob(self.folder(earlier), "dropped-*.parquet"):
                dropped = self.spark.read.parquet(f"{self.folder(earlier)}/dropped-*.parquet")
                frame = frame.unionByName(dropped.select(*[c for c in dropped.columns if c in frame.columns]),
                                          allowMissingColumns=True)
        return frame

