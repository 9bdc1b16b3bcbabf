"""The Spark executor's own runners for the steps where a Spark aggregation, a checkpoint or a GPU profile matters
(PIPELINE names them on each step as "curate.executors.spark.runners:NAME"): each takes (run, step, frame) and
returns the step's frame."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from curate.executors.spark import dedup as spark_dedup
from curate.executors.spark import shard as spark_shard
from curate.executors.spark.books import write_ledger
from curate.executors.spark.engine import (
    FIRSTS,
    PAIR,
    SparkRun,
    _ingest,
    _pair_hashes,
    _prefilter,
    _score,
    read_input,
    read_tar_input,
    score_profile,
)
from curate.executors.spark.frames import apply_flags, arrow_schema, map_stage, output_schema
from curate.pipeline import plan, steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.steps import Step
from curate.schema import CLIP_SCORE, DROP_STAGE, EMBEDDING, KEY, PASSES_THRESHOLDS, PUNSAFE, ROW
from curate.stages import prefilter as prefilter_stage
from curate.stages.shard import ShardPlanError
from curate.stages.verdict import with_verdict_columns
from curate.storage import files as storage

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

log = logging.getLogger(__name__)


def ingest(run: SparkRun, step: Step, frame: DataFrame | None) -> DataFrame:
    """The input rows (parquet read by Spark, WebDataset tars by the driver's reader) and the run's facts."""
    stored = plan.stored_input(run.config, run.inputs)  # images already downloaded, in tars
    if stored:
        raw, run.input_rows = read_tar_input(run, run.inputs)
        ingested = map_stage(raw, _pair_hashes)
    else:
        raw, run.input_rows = read_input(run.spark, run.inputs)
        ingested = map_stage(raw, _ingest)
    run.facts = RunFacts(run.resolve_scores(ingested), stored)
    return ingested


def prefilter(run: SparkRun, step: Step, ingested: DataFrame) -> DataFrame:
    """The url+caption first rows as a Spark aggregation, then the per-row checks (the thresholds recorded first: a
    download killed after its checkpoint is whole still finds them on resume)."""
    from pyspark.sql import functions as F

    c = run.config
    storage.write_json(plan.prefilter_arguments(c, run.facts), run.prefiltered_by)
    url_dedup = "url" in c.dedup
    rows = ingested
    if url_dedup:
        pairs = ingested.groupBy(KEY, PAIR).agg(F.min(ROW).alias(prefilter_stage.FIRST_ROW_OF_PAIR))
        per_key = pairs.groupBy(KEY).agg(F.min(prefilter_stage.FIRST_ROW_OF_PAIR).alias(prefilter_stage.FIRST_ROW))
        rows = ingested.join(pairs.join(per_key, KEY), [KEY, PAIR]).select(*ingested.columns, *FIRSTS)
    kept = [f for f in arrow_schema(rows) if f.name not in (PAIR, *FIRSTS)]
    schema = with_verdict_columns(pa.schema(kept).empty_table()).schema  # prefilter only adds the verdict columns
    return map_stage(rows, _prefilter(c, run.facts, url_dedup), schema)


def download(run: SparkRun, step: Step, judged: DataFrame) -> DataFrame:
    """Rows spread over tasks by key, fetched (or read from the input tars), checkpointed with their images."""
    c = run.config
    parts = max(run.spark.sparkContext.defaultParallelism, -(-run.input_rows // max(c.batch_size_rows, 1)))
    spread = judged.repartition(parts, KEY)  # keys are hashes of url+caption: one host's URLs land in every task
    fetched = map_stage(spread, steps.bound(step.name, c, run.facts))
    run.images = run.checkpoint(step.name, fetched)
    return run.images


def score(run: SparkRun, step: Step, downloaded: DataFrame) -> DataFrame:
    """The models' scores (one GPU per task under stage-level scheduling) or the metadata's, checkpointed."""
    c, scores = run.config, run.facts.scores
    scored_schema = output_schema(_score(c, "metadata"), arrow_schema(downloaded))
    if scores == "model":
        scored_schema = scored_schema.append(pa.field(EMBEDDING, pa.list_(pa.float32())))
        scored_schema = scored_schema.append(pa.field(CLIP_SCORE, pa.float32()))
        unsafe = pa.field(PUNSAFE, pa.float32())  # the detector's replaces the metadata's float64, as in local runs
        names = scored_schema.names
        scored_schema = (scored_schema.set(names.index(PUNSAFE), unsafe) if PUNSAFE in names
                         else scored_schema.append(unsafe))
    profile = score_profile(run.spark, scores)
    return run.checkpoint(step.name, map_stage(downloaded, _score(c, scores), scored_schema, profile))


def dedup(run: SparkRun, step: Step, scored: DataFrame) -> DataFrame:
    """Exact and pHash duplicates as aggregations (checkpointed), then semantic per cluster."""
    c, kinds = run.config, run.config.dedup
    # Copies that pass the select thresholds survive before copies that fail them (the survivor rule).
    judged = map_stage(scored, steps.bound(step.name, c, run.facts),
                       arrow_schema(scored).append(pa.field(PASSES_THRESHOLDS, pa.bool_())))
    if "exact" in kinds:
        judged = apply_flags(judged, spark_dedup.exact_flags(judged))
    if "phash" in kinds:
        judged = apply_flags(judged, spark_dedup.phash_flags(run.spark, judged, c.phash_distance))
    judged = run.checkpoint(step.name, judged)
    semantic = "semantic" in kinds and EMBEDDING in judged.columns
    if semantic:
        flags = spark_dedup.semantic_flags(run.spark, judged, c.semdedup_threshold, c.semdedup_clusters, c.seed,
                                           run.path("stages", "semantic-sample"))
        judged = apply_flags(judged, flags)
    run.meta["dedup"] = {"kinds": kinds, "semantic": "ran" if semantic else
                         "skipped: no embeddings (scores from metadata)"}
    return judged.drop(PASSES_THRESHOLDS)


def not_reconsidered(run: SparkRun) -> dict[str, int]:
    """Rows prefilter dropped on metadata that this run's thresholds would keep (after a resume that changed them):
    prefilter.recoverable per batch over the prefilter-dropped rows' few columns, summed."""
    from pyspark.sql import functions as F

    thresholds = plan.metadata_thresholds(run.config)
    schema = pa.schema([("reason", pa.string()), ("rows", pa.int64())])

    def count(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            found = prefilter_stage.recoverable(pa.Table.from_batches([batch]), **thresholds)
            if found:
                yield pa.RecordBatch.from_pydict({"reason": list(found), "rows": list(found.values())}, schema)

    downloaded = run.images
    assert downloaded is not None, "no checkpoint holds the images"
    names = [c for c in prefilter_stage.RECOVERABLE_COLUMNS if c in downloaded.columns]
    dropped = downloaded.filter(F.col(DROP_STAGE) == prefilter_stage.STAGE).select(*names)
    rows = dropped.mapInArrow(count, "reason string, rows long").groupBy("reason").agg(F.sum("rows").alias("rows"))
    lost = {row["reason"]: int(row["rows"]) for row in rows.collect()}
    if lost:
        log.warning("%d rows that these thresholds would keep were dropped on their metadata before the download "
                    "(%s) and are not brought back; a new run into another output with these thresholds fetches them",
                    sum(lost.values()), lost)
    return dict(sorted(lost.items()))


def select(run: SparkRun, step: Step, judged: DataFrame) -> DataFrame:
    run.meta["not_reconsidered"] = not_reconsidered(run)
    selected = map_stage(judged, steps.bound(step.name, run.config, run.facts), arrow_schema(judged))
    return run.checkpoint(step.name, selected)


def shard(run: SparkRun, step: Step, selected: DataFrame) -> DataFrame:
    """The global order as a Spark sort, the plan from counts, the tars written from the images' checkpoint."""
    c = run.config
    try:
        placed, shard_plan = spark_shard.plan(run.spark, selected, c, run.facts, run.path("stages", "order"))
    except ShardPlanError as error:  # still show why rows went: the ledger of everything dropped so far
        write_ledger(run, selected)
        raise ShardPlanError(f"{error}; the dropped rows are in {run.path('ledger.parquet')}") from None
    placed = run.checkpoint(step.name, placed)
    storage.remove(run.path("shards"))
    run.placed, run.shard_plan, run.entries = placed, shard_plan, []
    assert run.images is not None, "no checkpoint holds the images"
    if shard_plan.num_shards:  # nothing kept: no tar, and books that say why
        run.entries = spark_shard.write_shards(placed, run.images, shard_plan, c, run.path("shards"))
    return placed
