"""The Spark engine: curate's stage functions through mapInArrow / applyInArrow, Spark shuffles for dedup and order.

Checkpoints are parquet folders under OUT/stages/ (download keeps the image bytes; a rerun with the same inputs and
options resumes after it). The driver only ever holds counts, near-duplicate pairs, centroids and the shard plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.executors.spark import dedup as spark_dedup
from curate.executors.spark import shard as spark_shard
from curate.executors.spark.books import write_books, write_ledger
from curate.executors.spark.frames import (
    FILE,
    ROW_IN_FILE,
    apply_flags,
    arrow_schema,
    map_stage,
    output_schema,
    read_parquet_files,
)
from curate.pipeline import accounting, plan, steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.steps import AFTER_DOWNLOAD_OPTIONS
from curate.schema import (
    AESTHETIC,
    CLIP_SCORE,
    DROP_STAGE,
    EMBEDDING,
    KEY,
    PASSES_THRESHOLDS,
    PUNSAFE,
    PWATERMARK,
    ROW,
)
from curate.stages import prefilter
from curate.stages.ingest import canonical_names, normalize
from curate.stages.shard import ShardPlanError
from curate.stages.verdict import with_verdict_columns
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


def read_input(spark: SparkSession, inputs: list[str]) -> tuple[DataFrame, int]:
    """The input rows with their global row number (files in order, then row in file), and the row count. Each file
    is read with its own schema (releases spell and type columns differently), then unified by name."""
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
    folder, rows, part = run.path("stages", "ingest"), 0, 0
    damage: list[dict[str, Any]] = []
    storage.remove(folder)
    read = steps.bound("ingest", run.config, RunFacts(stored=True))
    for path in files:
        for table in read(path, rows, damage):
            storage.write_table(table, f"{folder}/part-{part:06d}.parquet")
            rows, part = rows + table.num_rows, part + 1
    if rows == 0:
        raise ValueError(f"the input tars hold no samples: {files}")
    run.damaged_inputs, run.ignored_inputs = damage, entries.ignored
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


def worker_scorer(config: Config) -> Any:
    """The scorer of this Python worker (load_scorer caches it per process), on the GPU Spark gave this task."""
    from pyspark import TaskContext

    from curate.stages.score import load_scorer

    context = TaskContext.get()
    resources = context.resources() if context is not None else {}
    if "gpu" in resources and resources["gpu"].addresses:
        config = replace(config, device=f"cuda:{resources['gpu'].addresses[0]}")
    return load_scorer(config)


def score_profile(spark: SparkSession, scores: str) -> Any:
    """With GPU executors but no cluster-wide spark.task.resource.gpu.amount, one GPU for each score task only
    (stage-level scheduling), so download and shard tasks never hold a GPU."""
    conf = spark.sparkContext.getConf()
    if scores != "model" or conf.get("spark.task.resource.gpu.amount") or not conf.get(
            "spark.executor.resource.gpu.amount"):
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

    def path(self, *parts: str) -> str:
        return "/".join([self.out, *parts])

    def checkpoint(self, stage: str, df: DataFrame) -> DataFrame:
        df.write.mode("overwrite").parquet(self.path("stages", stage))
        return self.spark.read.parquet(self.path("stages", stage))

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


def _download_stage(run: SparkRun, ingested: DataFrame, input_rows: int, scores: str, stored: bool) -> DataFrame:
    """Prefilter (with the url+caption first rows as a Spark aggregation), then download, checkpointed with images."""
    from pyspark.sql import functions as F

    c = run.config
    url_dedup = "url" in c.dedup
    rows = ingested
    if url_dedup:
        pairs = ingested.groupBy(KEY, PAIR).agg(F.min(ROW).alias(prefilter.FIRST_ROW_OF_PAIR))
        per_key = pairs.groupBy(KEY).agg(F.min(prefilter.FIRST_ROW_OF_PAIR).alias(prefilter.FIRST_ROW))
        rows = ingested.join(pairs.join(per_key, KEY), [KEY, PAIR]).select(*ingested.columns, *FIRSTS)
    kept = [f for f in arrow_schema(rows) if f.name not in (PAIR, *FIRSTS)]
    schema = with_verdict_columns(pa.schema(kept).empty_table()).schema  # prefilter only adds the verdict columns
    facts = RunFacts(scores, stored)
    judged = map_stage(rows, _prefilter(c, facts, url_dedup), schema)
    parts = max(run.spark.sparkContext.defaultParallelism, -(-input_rows // max(c.batch_size_rows, 1)))
    spread = judged.repartition(parts, KEY)  # keys are hashes of url+caption: one host's URLs land in every task
    fetched = map_stage(spread, steps.bound("download", c, facts))
    return run.checkpoint("download", fetched)


def _dedup_stage(run: SparkRun, scored: DataFrame) -> tuple[DataFrame, dict[str, Any]]:
    c, kinds = run.config, run.config.dedup
    # Copies that pass the select thresholds survive before copies that fail them (the survivor rule).
    judged = map_stage(scored, steps.bound("dedup", c, RunFacts(c.scores)),
                       arrow_schema(scored).append(pa.field(PASSES_THRESHOLDS, pa.bool_())))
    if "exact" in kinds:
        judged = apply_flags(judged, spark_dedup.exact_flags(judged))
    if "phash" in kinds:
        judged = apply_flags(judged, spark_dedup.phash_flags(run.spark, judged, c.phash_distance))
    judged = run.checkpoint("dedup", judged)
    semantic = "semantic" in kinds and EMBEDDING in judged.columns
    if semantic:
        flags = spark_dedup.semantic_flags(run.spark, judged, c.semdedup_threshold, c.semdedup_clusters, c.seed,
                                           run.path("stages", "semantic-sample"))
        judged = apply_flags(judged, flags)
    meta = {"kinds": kinds, "semantic": "ran" if semantic else "skipped: no embeddings (scores from metadata)"}
    return judged.drop(PASSES_THRESHOLDS), meta


def not_reconsidered(downloaded: DataFrame, config: Config) -> dict[str, int]:
    """Rows prefilter dropped on metadata that this run's thresholds would keep (after a resume that changed them):
    prefilter.recoverable per batch over the prefilter-dropped rows' few columns, summed."""
    from pyspark.sql import functions as F

    thresholds = plan.metadata_thresholds(config)
    schema = pa.schema([("reason", pa.string()), ("rows", pa.int64())])

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            found = prefilter.recoverable(pa.Table.from_batches([batch]), **thresholds)
            if found:
                yield pa.RecordBatch.from_pydict({"reason": list(found), "rows": list(found.values())}, schema)

    names = [c for c in prefilter.RECOVERABLE_COLUMNS if c in downloaded.columns]
    dropped = downloaded.filter(F.col(DROP_STAGE) == prefilter.STAGE).select(*names)
    rows = dropped.mapInArrow(count, "reason string, rows long").groupBy("reason").agg(F.sum("rows").alias("rows"))
    lost = {row["reason"]: int(row["rows"]) for row in rows.collect()}
    if lost:
        log.warning("%d rows that these thresholds would keep were dropped on their metadata before the download "
                    "(%s) and are not brought back; a new run into another output with these thresholds fetches them",
                    sum(lost.values()), lost)
    return dict(sorted(lost.items()))


def run_spark(spark: SparkSession, inputs: list[str], output: str, config: Config) -> dict[str, Any]:
    """Every stage on Spark; returns stats.json's content (same shape as curate.pipeline.run.run_local's)."""
    started = time.perf_counter()
    run = SparkRun(spark, output, config)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(config.batch_size_rows))
    # Checkpoints hold image bytes: the vectorized reader's default 4,096-row batch of 1024 px JPEGs is ~1 GB, past
    # local mode's default 1 GB heap (a 20k-row run with 1,000 live images failed so); 256 rows stay ~100 MB.
    spark.conf.set("spark.sql.parquet.columnarReaderBatchSize", "256")
    stored = plan.stored_input(config, inputs)  # images already downloaded; a mixed input is refused before OUT exists
    resume = run.resumable(inputs)
    if stored:
        raw, input_rows = run.timed("ingest", lambda: read_tar_input(run, inputs))
        ingested = map_stage(raw, _pair_hashes)
    else:
        raw, input_rows = run.timed("ingest", lambda: read_input(spark, inputs))
        ingested = map_stage(raw, _ingest)
    scores = run.resolve_scores(ingested)
    prefiltered_by = run.path("stages", "prefilter-judged-by.json")  # the thresholds of the run that downloaded
    if resume:
        log.info("download: done in an earlier run, resuming after it")
        downloaded = spark.read.parquet(run.path("stages", "download"))
    else:  # the thresholds first: a download killed after its checkpoint is whole still finds them on resume
        storage.write_json(plan.prefilter_arguments(config, RunFacts(scores, stored)), prefiltered_by)
        downloaded = run.timed("download", lambda: _download_stage(run, ingested, input_rows, scores, stored))
    lost = not_reconsidered(downloaded, config)
    scored_schema = output_schema(_score(config, "metadata"), arrow_schema(downloaded))
    if scores == "model":
        scored_schema = scored_schema.append(pa.field(EMBEDDING, pa.list_(pa.float32())))
        scored_schema = scored_schema.append(pa.field(CLIP_SCORE, pa.float32()))
        unsafe = pa.field(PUNSAFE, pa.float32())  # the detector's replaces the metadata's float64, as in local runs
        names = scored_schema.names
        scored_schema = (scored_schema.set(names.index(PUNSAFE), unsafe) if PUNSAFE in names
                         else scored_schema.append(unsafe))
    profile = score_profile(spark, scores)
    scored = run.timed("score", lambda: run.checkpoint(
        "score", map_stage(downloaded, _score(config, scores), scored_schema, profile)))
    judged, dedup_meta = run.timed("dedup", lambda: _dedup_stage(run, scored))
    selected = map_stage(judged, steps.bound("select", config, RunFacts(scores)), arrow_schema(judged))
    selected = run.timed("select", lambda: run.checkpoint("select", selected))

    def shard() -> tuple[DataFrame, Any, list[dict[str, Any]]]:
        try:
            placed, shard_plan = spark_shard.plan(spark, selected, config, RunFacts(scores, stored),
                                                  run.path("stages", "order"))
        except ShardPlanError as error:  # still show why rows went: the ledger of everything dropped so far
            write_ledger(run, selected)
            raise ShardPlanError(f"{error}; the dropped rows are in {run.path('ledger.parquet')}") from None
        placed = run.checkpoint("shard", placed)
        storage.remove(run.path("shards"))
        if not shard_plan.num_shards:  # nothing kept: no tar, and books that say why
            return placed, shard_plan, []
        return placed, shard_plan, spark_shard.write_shards(placed, downloaded, shard_plan, config, run.path("shards"))

    placed, shard_plan, entries = run.timed("shard", shard)
    judged_by = {"prefilter": storage.read_json(prefiltered_by) if storage.exists(prefiltered_by) else None,
                 "select": plan.select_arguments(config)}
    facts = {"input_rows": input_rows, "scores": scores, "dedup": dedup_meta, "started": started,
             "judged_by": judged_by, "not_reconsidered": lost}
    stats = write_books(run, placed, shard_plan, entries, facts)
    accounting.check_kept(stats, write_report(run))
    return stats


def write_report(run: SparkRun) -> Any:
    """OUT/report.html, by the one report builder both engines share (it reads either engine's folder)."""
    from curate.report.build import build_report

    return build_report(run.out)  # through the storage layer: a local folder or any fsspec URL (s3a://, gs://, …)
