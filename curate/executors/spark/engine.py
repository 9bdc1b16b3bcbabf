"""The Spark engine: curate's stage functions through mapInArrow / applyInArrow, Spark shuffles for dedup and order.

Checkpoints are parquet folders under OUT/stages/ (download keeps the image bytes; a rerun with the same inputs and
options resumes after it). The driver only ever holds counts, near-duplicate pairs, centroids and the shard plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.executors.spark.books import write_books
from curate.executors.spark.checkpoints import LocalLayout
from curate.executors.spark.frames import (
    FILE,
    ROW_IN_FILE,
    read_parquet_files,
)
from curate.pipeline import accounting, plan, steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.steps import AFTER_DOWNLOAD_OPTIONS
from curate.schema import (
    AESTHETIC,
    EMBEDDING,
    PWATERMARK,
    ROW,
)
from curate.stages import prefilter
from curate.stages.ingest import canonical_names, normalize
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.wds.reader import check_tar

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)
GLOBAL_ROW, PAIR = "_curate_row", "pair_hash"
FIRSTS = [prefilter.FIRST_ROW_OF_PAIR, prefilter.FIRST_ROW]


def _path_id(path: str) -> str:
    parts = urlsplit(path)
    return unquote(parts.netloc + parts.path)


def _with_scheme(path: str, scheme: str) -> str:
    current = urlsplit(path).scheme
    if not scheme or current == scheme:
        return path
    return f"{scheme}://{path[len(current) + 3:] if current else path}"


def input_files(inputs: list[str]) -> list[str] | None:
    """Every input file in the local engine's order (io.expand_inputs), under the scheme the input was given with
    (Spark may know s3a:// where fsspec answers s3://); None when fsspec cannot list them."""
    try:
        return [_with_scheme(path, urlsplit(pattern).scheme)
                for pattern in inputs for path in io.expand_inputs([pattern])]
    except Exception as error:  # e.g. a Hadoop-only filesystem: Spark reads it, fsspec does not
        log.warning("cannot list %s with fsspec (%s); reading them as one table, rows numbered in sorted file order",
                    inputs, error)
        return None


def file_order(found: list[str], listed: list[str]) -> list[str]:
    """Spark's file paths in the order of `listed` (io.expand_inputs'); files not listed last, sorted."""
    rank = {_path_id(path): i for i, path in enumerate(listed)}
    return sorted(found, key=lambda p: (rank.get(_path_id(p), len(rank)), p))


def read_input(spark: SparkSession, inputs: list[str],
               file_rows: list[int] | None = None) -> tuple[DataFrame, int]:
    """The input rows with their global row number (files in order, then row in file), and the row count (each
    file's, in order, appended to file_rows). Each file is read with its own schema (releases spell and type columns
    differently), then unified by name."""
    from pyspark.sql import functions as F

    files = input_files(inputs)
    if files is not None:
        tagged = read_parquet_files(spark, files)
    else:
        raw = spark.read.parquet(*inputs)
        try:
            canonical_names(raw.columns)
        except ValueError as error:
            raise ValueError(f"{inputs}: {error}") from error
        tagged = raw.select("*", F.col("_metadata.file_path").alias(FILE),
                            F.col("_metadata.row_index").alias(ROW_IN_FILE))
    counts = {r[FILE]: r["n"] for r in tagged.groupBy(FILE).agg(F.count("*").alias("n")).collect()}
    offsets, total = [], 0
    for path in file_order(list(counts), files or []):
        offsets.append((path, total))
        total += counts[path]
        if file_rows is not None:
            file_rows.append(counts[path])
    table = spark.createDataFrame(offsets, f"{FILE} string, _offset long")
    rows = tagged.join(F.broadcast(table), FILE).withColumn(GLOBAL_ROW, F.col("_offset") + F.col(ROW_IN_FILE))
    return rows.drop(FILE, ROW_IN_FILE, "_offset"), total


def _ingest(table: pa.Table) -> pa.Table:
    """ingest.normalize with the global row number, plus the url+caption pair hash the first-row aggregation uses."""
    rows = pc.cast(table[GLOBAL_ROW], pa.int64())
    table = normalize(table.drop_columns([GLOBAL_ROW]), 0)
    table = table.set_column(table.column_names.index(ROW), ROW, rows)
    return table.append_column(PAIR, pc.cast(prefilter.pair_hashes(table), pa.int64()))


def _pair_hashes(table: pa.Table) -> pa.Table:
    """Rows the driver already normalized (WebDataset input): only the pair hash is added."""
    table = table.drop_columns([GLOBAL_ROW])
    return table.append_column(PAIR, pc.cast(prefilter.pair_hashes(table), pa.int64()))


def read_tar_input(run: SparkRun, inputs: list[str]) -> tuple[DataFrame, int]:
    """Stored images (tars, img2dataset's folders or parquet): the driver reads the tars' headers, captions and json
    (the local engine's ingest, no image bytes) into OUT/stages/ingest parts; Spark reads those rows. Their images
    are read where they lie at download."""
    entries = plan.input_entries(run.config, inputs)
    files = entries.files
    for path in files:  # a file that is no tar is refused before any work
        if path.endswith(".tar"):
            check_tar(path)
    folder, rows, part, starts = run.path("stages", "ingest"), 0, 0, []
    damage: list[dict[str, Any]] = []
    storage.remove(folder)
    read = steps.bound("ingest", run.config, RunFacts(stored=True))
    for path in files:
        for table in read(path, rows, damage):
            storage.write_table(table, f"{folder}/part-{part:06d}.parquet")
            starts.append(rows)
            rows, part = rows + table.num_rows, part + 1
    if rows == 0:
        raise ValueError(f"the input tars hold no samples: {files}")
    run.damaged_inputs, run.ignored_inputs = damage, entries.ignored
    run.layout = LocalLayout(run.spark, run.out, np.array(starts, dtype=np.int64))
    # the local engine's ingest meta (Spark skips _-files when it reads the parts)
    storage.write_json({"input_files": files, "input_rows": rows, "parts": part, "input_format": "webdataset",
                        "damaged_inputs": damage, "ignored_inputs": entries.ignored}, f"{folder}/_SUCCESS")
    ingested = run.spark.read.option("mergeSchema", "true").parquet(run.path("stages", "ingest"))
    return ingested.withColumn(GLOBAL_ROW, ingested[ROW]), rows


def _prefilter(config: Config, facts: RunFacts, url_dedup: bool) -> Callable[[pa.Table], pa.Table]:
    judge = steps.bound("prefilter", config, facts)

    def run(table: pa.Table) -> pa.Table:
        url_flags = None
        if url_dedup:  # the first rows were joined on by a Spark aggregation; the rule is the shared one
            url_flags = prefilter.url_verdicts(table[ROW], table[prefilter.FIRST_ROW_OF_PAIR],
                                               table[prefilter.FIRST_ROW])
        table = table.drop_columns([c for c in (PAIR, *FIRSTS) if c in table.column_names])
        return judge(table, url_flags)
    return run


def _score(config: Config, scores: str) -> Callable[[pa.Table], pa.Table]:
    score = steps.bound("score", config, RunFacts(scores), scorer=lambda: worker_scorer(config))

    def run(table: pa.Table) -> pa.Table:
        table = score(table)
        if EMBEDDING in table.column_names:  # Spark has no float16 and no fixed-size lists
            float_list = pc.cast(table[EMBEDDING], pa.list_(pa.float32()))
            table = table.set_column(table.column_names.index(EMBEDDING), EMBEDDING, float_list)
        return table
    return run


def task_device(device: str, addresses: list[str], cuda_devices: int) -> str:
    """The device a score task runs on: cuda:N for the GPU Spark gave it (TaskContext.resources()), else the
    configured one. A GPU this process cannot use (torch without CUDA, an address past the visible devices) falls
    back to the configured device, with a warning, rather than failing every task."""
    if not addresses:
        return device
    index = addresses[0]
    if index.isdigit() and int(index) < cuda_devices:
        return f"cuda:{index}"
    log.warning("Spark gave this task GPU %s but this process sees %d CUDA devices; scoring on %s", index,
                cuda_devices, device)
    return device


def assigned_device(config: Config) -> str:
    """task_device for the running task."""
    from pyspark import TaskContext

    context = TaskContext.get()
    resources = context.resources() if context is not None else {}
    addresses = list(resources["gpu"].addresses) if "gpu" in resources else []
    if not addresses:
        return config.device
    import torch

    return task_device(config.device, addresses, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def worker_scorer(config: Config) -> Any:
    """The scorer of this Python worker (load_scorer caches it per process), on the GPU Spark gave this task."""
    from curate.stages.score import load_scorer

    return load_scorer(replace(config, device=assigned_device(config)))


def wants_score_profile(setting: Callable[[str], str | None], scores: str) -> bool:
    """With GPU executors (spark.executor.resource.gpu.amount) but no cluster-wide spark.task.resource.gpu.amount,
    the score step alone asks for one GPU per task (stage-level scheduling)."""
    return scores == "model" and not setting("spark.task.resource.gpu.amount") and bool(
        setting("spark.executor.resource.gpu.amount"))


def score_profile(spark: SparkSession, scores: str) -> Any:
    """wants_score_profile's resource profile (1 CPU + 1 GPU per score task), or None: download and shard tasks
    never hold a GPU."""
    if not wants_score_profile(spark.sparkContext.getConf().get, scores):
        return None
    from pyspark.resource import ResourceProfileBuilder, TaskResourceRequests

    return ResourceProfileBuilder().require(TaskResourceRequests().cpus(1).resource("gpu", 1.0)).build


class SparkRun:
    """One output folder (any fsspec/Hadoop URL) on one SparkSession."""

    def __init__(self, spark: SparkSession, output: str, config: Config) -> None:
        self.spark, self.config, self.out = spark, config, str(output).rstrip("/")
        self.timings: dict[str, float] = {}
        self.damaged_inputs: list[dict[str, Any]] = []
        self.ignored_inputs: list[str] = []
        self.inputs: list[str] = []
        self.resume = False
        self.input_rows = 0
        self.facts = RunFacts()
        self.images: DataFrame | None = None  # the checkpoint of the step that holds the image bytes
        self.meta: dict[str, Any] = {}  # what steps report for the books (dedup's kinds, not_reconsidered)
        self.placed: DataFrame | None = None  # the last step's frame, and the shards it wrote
        self.shard_plan: Any = None
        self.entries: list[dict[str, Any]] = []
        self.prefiltered_by = self.path("stages", "prefilter-judged-by.json")  # the thresholds that downloaded

    def run_step(self, step: steps.Step, frame: DataFrame | None) -> DataFrame:
        """One step: its own runner where it declares one, else the map or global runner."""
        from curate.executors.spark import generic

        if step.spark is not None:
            return steps.runner(step.spark)(self, step, frame)  # type: ignore[no-any-return]
        run = generic.global_step if step.global_step is not None else generic.map_step
        assert frame is not None, f"{step.name}: no rows from the steps before it"
        frame = run(self, step, frame)
        if self.images is None:  # before the images' step: its checkpoint holds this step's dropped rows
            return frame
        return self.stage(step.name, frame, {})  # the local layout: `curate select` reads the step before dedup
        self.layout: LocalLayout | None = None  # set at ingest, when the parts' row ranges are known

    def path(self, *parts: str) -> str:
        return "/".join([self.out, *parts])

    def checkpoint(self, stage: str, df: DataFrame) -> DataFrame:
        """A Spark-internal checkpoint (not a stage the local engine reads)."""
        df.write.mode("overwrite").parquet(self.path("stages", stage))
        return self.spark.read.parquet(self.path("stages", stage))

    def stage(self, stage: str, df: DataFrame, meta: dict[str, Any] | None, also: tuple[str, ...] = (),
              counts: dict[str, int] | None = None) -> DataFrame:
        """Write a stage in the local engine's checkpoint layout (meta: its _SUCCESS facts) and read it back; the
        rows written per target go to counts."""
        assert self.layout is not None
        written = self.layout.write(stage, df, meta, also)
        if counts is not None:
            counts.update(written)
        return self.layout.read(stage)

    def timed(self, stage: str, body: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = body()
        self.timings[stage] = time.perf_counter() - started
        log.info("%s: %.1f s", stage, self.timings[stage])
        return result

    def resumable(self, inputs: list[str]) -> bool:
        """True when OUT holds a finished download of the same inputs with the same download-side options."""
        current: dict[str, Any] = {"inputs": inputs, "config": self.config.to_dict()}
        marker, success = self.path("stages", "spark-run.json"), self.path("stages", "download", "_SUCCESS")
        same = False
        if storage.exists(marker) and storage.exists(success):
            earlier = storage.read_json(marker)
            same = earlier["inputs"] == inputs and all(
                current["config"].get(k) == v for k, v in earlier["config"].items() if k not in AFTER_DOWNLOAD_OPTIONS)
        storage.write_json(current, marker)
        storage.write_json(current, self.path("stages", "run.json"))  # the local engine's run record (`curate select`…)
        return same

    def resolve_scores(self, ingested: DataFrame) -> str:
        """model/metadata by the plan's rule; the score columns' null counts in one aggregation."""
        from pyspark.sql import functions as F

        names = ingested.columns
        if self.config.scores == "metadata" and AESTHETIC not in names:
            raise ValueError("--scores metadata needs an AESTHETIC_SCORE/aesthetic column and the input has none "
                             f"(columns: {names}); use --scores model to compute scores from the images")

        def nulls() -> dict[str, int]:
            present = [c for c in (AESTHETIC, PWATERMARK) if c in names]
            if not present:
                return {}
            counts = ingested.agg(*[F.sum(F.col(c).isNull().cast("long")).alias(c) for c in present]).collect()[0]
            return {c: int(counts[c] or 0) for c in present}

        return plan.resolve_scores(self.config, nulls)


def run_spark(spark: SparkSession, inputs: list[str], output: str, config: Config) -> dict[str, Any]:
    """Every step of PIPELINE on Spark; returns stats.json's content (same shape as curate.pipeline.run.run_local's).
    A rerun with the same inputs and the options the images' step reads resumes from that step's checkpoint."""
    started = time.perf_counter()
    run = SparkRun(spark, output, config)
    run.inputs = inputs
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.batch_size_rows))
    # Checkpoints hold image bytes: the vectorized reader's default 4,096-row batch of 1024 px JPEGs is ~1 GB, past
    # local mode's default 1 GB heap (a 20k-row run with 1,000 live images failed so); 256 rows stay ~100 MB.
    spark.conf.set("spark.sql.parquet.columnarReaderBatchSize", "256")
    plan.stored_input(config, inputs)  # a mixed input (tars and parquet) is refused before OUT exists
    todo = steps.enabled(config)
    for step in todo:  # what each step can know before any work (a missing list file)
        step.check(config)
    run.resume = run.resumable(inputs)
    resumed = next(i for i, step in enumerate(todo) if step.holds_images) if run.resume else -1
    frame: DataFrame | None = None
    for number, step in enumerate(todo):
        if 0 < number <= resumed:  # done in an earlier run: its checkpoint stands for it and every step before it
            if number == resumed:
                log.info("%s: done in an earlier run, resuming after it", step.name)
                frame = run.images = run.layout.read(step.name)  # type: ignore[union-attr]
            continue
        frame = run.timed(step.name, partial(run.run_step, step, frame))
    judged_by = {"prefilter": storage.read_json(run.prefiltered_by) if storage.exists(run.prefiltered_by) else None,
                 "select": plan.select_arguments(config)}
    facts = {"input_rows": run.input_rows, "scores": run.facts.scores, "dedup": run.meta.get("dedup", {}),
             "started": started, "judged_by": judged_by, "not_reconsidered": run.meta.get("not_reconsidered", {})}
    assert run.placed is not None, "the last step placed no rows"
    stats = write_books(run, run.placed, run.shard_plan, run.entries, facts)
    accounting.check_kept(stats, write_report(run))
    return stats


def write_report(run: SparkRun) -> Any:
    """OUT/report.html, by the one report builder both engines share (it reads either engine's folder)."""
    from curate.report.build import build_report

    return build_report(run.out)  # through the storage layer: a local folder or any fsspec URL (s3a://, gs://, …)
