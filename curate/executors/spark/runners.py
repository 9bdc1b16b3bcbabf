"""The Spark executor's own runners for the steps where a Spark aggregation, a checkpoint or a GPU profile matters
(PIPELINE names them on each step as "curate.executors.spark.runners:NAME"): each takes (run, step, frame) and
returns the step's frame."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from curate.executors.spark import dedup as spark_dedup
from curate.executors.spark import shard as spark_shard
from curate.executors.spark.books import write_ledger
from curate.executors.spark.checkpoints import LocalLayout, file_starts
from curate.executors.spark.engine import (
    FIRSTS,
    PAIR,
    SparkRun,
    _ingest,
    _pair_hashes,
    _prefilter,
    _score,
    input_files,
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
    """The input rows (parquet read by Spark, WebDataset tars by the driver's reader) and the run's facts; parquet
    rows are also written as the local engine's ingest checkpoint (the tars' rows the driver wrote there)."""
    stored = plan.stored_input(run.config, run.inputs)  # images already downloaded, in tars
    if stored:
        raw, run.input_rows = read_tar_input(run, run.inputs)
        ingested = map_stage(raw, _pair_hashes)
    else:
        file_rows: list[int] = []
        raw, run.input_rows = read_input(run.spark, run.inputs, file_rows)
        ingested = map_stage(raw, _ingest)
        run.layout = LocalLayout(run.spark, run.out, file_starts(file_rows, run.config.batch_size_rows))
        if not (run.resume and storage.exists(run.path("stages", step.name, "_SUCCESS"))):
            run.layout.write(step.name, ingested.drop(PAIR), {
                "input_files": input_files(run.inputs) or run.inputs, "input_rows": run.input_rows,
                "parts": len(run.layout.starts), "input_format": "parquet", "damaged_inputs": []})
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
    """Rows spread over tasks by key, fetched (or read from the input tars), checkpointed with their images in the
    local layout, with the dropped rows of every dropping step before it (prefilter's, blocklist_url's: Spark judges
    them inside this job)."""
    c = run.config
    parts = max(run.spark.sparkContext.defaultParallelism, -(-run.input_rows // max(c.batch_size_rows, 1)))
    spread = judged.repartition(parts, KEY)  # keys are hashes of url+caption: one host's URLs land in every task
    fetched = map_stage(spread, steps.bound(step.name, c, run.facts))
    before = tuple(s.name for s in steps.enabled(c)
                   if s.drops_rows and steps.STAGE_NAMES.index(s.name) < steps.STAGE_NAMES.index(step.name))
    counts: dict[str, int] = {}
    run.images = run.stage(step.name, fetched, None, before, counts)
    assert run.layout is not None
    parts = len(run.layout.starts)
    live = sum(counts.values()) - counts[prefilter_stage.STAGE]  # alive after prefilter: every later target's rows
    storage.write_json({"parts": parts, "live_rows": live, "judged_by": plan.prefilter_arguments(c, run.facts)},
                       run.path("stages", prefilter_stage.STAGE, "_SUCCESS"))
    for name in before:
        if name != prefilter_stage.STAGE:  # the generic steps before the images: judged in this job too
            storage.write_json({"parts": parts}, run.path("stages", name, "_SUCCESS"))
    storage.write_json({"parts": parts}, run.path("stages", step.name, "_SUCCESS"))  # last: marks the resume point
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
    return run.stage(step.name, map_stage(downloaded, _score(c, scores), scored_schema, profile), {"scores": scores})


def dedup(run: SparkRun, step: Step, scored: DataFrame) -> DataFrame:
    """Exact and pHash duplicates as aggregations (checkpointed), then semantic per cluster."""
    c, kinds = run.config, run.config.dedup
    # Copies that pass the select thresholds survive before copies that fail them (the survivor rule).
    judged = map_stage(scored, steps.bound(step.name, c, run.facts),
                       arrow_schema(scored).append(pa.field(PASSES_THRESHOLDS, pa.bool_())))
    if "exact" in kinds:
        judged = apply_flags(judged, spark_dedup.exact_flags(judged))
    if "phash" in kinds:
        judged = apply_flags(judged, spark_dedup.phash_flags(run.spark, judged, c.phash_distance,
                                                              run.path("stages", "phash-components")))
    semantic = "semantic" in kinds and EMBEDDING in judged.columns
    if semantic:  # semantic dedup reads the exact and pHash verdicts several times: from a checkpoint
        judged = run.checkpoint("dedup-exact-phash", judged)
        flags = spark_dedup.semantic_flags(run.spark, judged, c.semdedup_threshold, c.semdedup_clusters, c.seed,
                                           run.path("stages", "semantic-sample"))
        judged = apply_flags(judged, flags)
    meta = {"kinds": kinds, "semantic": "ran" if semantic else "skipped: no embeddings (scores from metadata)"}
    run.meta["dedup"] = meta
    # No later step reads the embeddings (as in the local engine, they stay in score's checkpoint)
    return run.stage(step.name, judged.drop(PASSES_THRESHOLDS, EMBEDDING), meta)


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
    lost = run.meta["not_reconsidered"] = not_reconsidered(run)
    selected = map_stage(judged, steps.bound(step.name, run.config, run.facts), arrow_schema(judged))
    judged_by = plan.select_arguments(run.config)
    return run.stage(step.name, selected, {**judged_by, "judged_by": judged_by, "not_reconsidered": lost})


def shard(run: SparkRun, step: Step, selected: DataFrame) -> DataFrame:
    """The global order as a Spark sort, the plan from counts, the tars written from the images' checkpoint."""
    c, started = run.config, time.perf_counter()
    try:
        placed, shard_plan = spark_shard.plan(run.spark, selected, c, run.facts, run.path("stages", "order"))
    except ShardPlanError as error:  # still show why rows went: the ledger of everything dropped so far
        write_ledger(run, selected)
        raise ShardPlanError(f"{error}; the dropped rows are in {run.path('ledger.parquet')}") from None
    placed = run.stage(step.name, placed, None)
    storage.remove(run.path("shards"))
    run.placed, run.shard_plan, run.entries = placed, shard_plan, []
    assert run.images is not None, "no checkpoint holds the images"
    if shard_plan.num_shards:  # nothing kept: no tar, and books that say why
        run.entries = spark_shard.write_shards(placed, run.images, shard_plan, c, run.path("shards"))
    storage.write_json({"num_shards": shard_plan.num_shards, "samples_per_shard": shard_plan.samples_per_shard,
                        "remainder": shard_plan.remainder, "seconds": time.perf_counter() - started},
                       run.path("stages", step.name, "_SUCCESS"))
    return placed
