"""The pipeline, declared once: PIPELINE is the ordered list of steps both executors loop over.

A step is one declaration: its name, the schema files of the columns it adds (curate/schemas/NAME.arrow.json, the
one source), the Config fields it reads, when a rerun redoes it, and what runs:
- a map step: `bind(config, facts) -> (table -> table)`, applied to every part (local) or batch (Spark mapInArrow);
- a global step: a `Global` triple, signature -> group -> apply. The signature function turns live rows (and the
  entries of any reference files the step joins, with ROW = -1) into signature rows carrying an int64 GROUP column;
  every signature row of one GROUP value reaches one call of the group function (the local executor spills them
  into hash partitions on disk, Spark groups them with groupBy/applyInArrow), which returns verdicts
  (row, drop_stage, drop_reason, drop_detail); the executor sets the first verdict per row (in detail order) on the
  rows. Memory is one partition, never the run.
A step where streaming matters names its own runner per executor (`local`/`spark`: "module:function"); no executor
names a stage. Checkpoint edges (a step reads the previous enabled step's checkpoint), resume, retry, re-cuts and
`curate <stage> OUT` all come from this list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from curate.config import Config
from curate.pipeline import plan
from curate.pipeline.plan import RunFacts
from curate.pipeline.protocol import GROUP, REFERENCE_ROW, Batch, Global, Step, runner
from curate.schema import PASSES_THRESHOLDS
from curate.steps import blocklist, decontaminate

__all__ = ["GROUP", "REFERENCE_ROW", "Batch", "Global", "Step", "runner", "PIPELINE"]

# The metadata thresholds: prefilter applies them before the download (with --scores metadata, and --min-size on the
# claimed size always), select after. A rerun may change them: select then says how many rows prefilter dropped that
# the new values would keep (they are not brought back).
METADATA_THRESHOLDS = frozenset({"min_size", "threshold", "max_watermark", "max_unsafe"})
# Thresholds on what only the models measure: read by dedup's survivor rule and select, so a rerun may change them.
MODEL_THRESHOLDS = frozenset({"min_clip_score"})
_DOWNLOAD = plan.DOWNLOAD_OPTIONS
_MODELS = frozenset({"device", "precision", "batch_size", "model_cache", "clip_weights", "aesthetic_weights",
                     "aesthetic_head", "watermark_weights", "safety_weights"})
_CAPTIONS = frozenset({"min_caption_words", "max_caption_tokens", "junk_captions", "languages"})
_SHARD = frozenset({"world_size", "workers_per_rank", "target_shard_size", "global_batch_size", "seed", "shard_name"})
_LOCAL, _SPARK = "curate.executors.local.runners", "curate.executors.spark.runners"


def _steps() -> list[Step]:
    return [
        Step("ingest", ("metadata",), frozenset({"batch_size_rows", "input_format", "caption_field"}),
             drops_rows=False, bind=plan.bind_ingest, local=f"{_LOCAL}:ingest", spark=f"{_SPARK}:ingest"),
        Step("prefilter", ("verdict",), METADATA_THRESHOLDS | _CAPTIONS | {"scores", "dedup"},
             bind=plan.bind_prefilter, local=f"{_LOCAL}:prefilter", spark=f"{_SPARK}:prefilter"),
        blocklist.URL_STEP,
        Step("download", ("download",), _DOWNLOAD, bind=plan.bind_download, holds_images=True,
             local=f"{_LOCAL}:download", spark=f"{_SPARK}:download"),
        Step("score", ("score",), _MODELS | {"scores"}, bind=plan.bind_score, local=f"{_LOCAL}:score",
             spark=f"{_SPARK}:score"),
        blocklist.IMAGE_STEP,
        *decontaminate.STEPS,
        Step("dedup", ("verdict",), METADATA_THRESHOLDS | MODEL_THRESHOLDS | {
             "dedup", "phash_distance", "semdedup_threshold", "semdedup_clusters", "seed"},
             bind=plan.bind_survivor_rule, redo="changed", internal=(PASSES_THRESHOLDS,), local=f"{_LOCAL}:dedup",
             spark=f"{_SPARK}:dedup"),
        Step("select", ("verdict",), METADATA_THRESHOLDS | MODEL_THRESHOLDS, drops_rows=False, bind=plan.bind_select,
             redo="always", rerun_from="dedup", local=f"{_LOCAL}:select", spark=f"{_SPARK}:select"),
        Step("shard", ("samples",), _SHARD | {"buckets"}, drops_rows=False, bind=plan.bind_shard, redo="always",
             local=f"{_LOCAL}:shard", spark=f"{_SPARK}:shard"),
    ]


PIPELINE: tuple[Step, ...] = tuple(_steps())
STAGES = PIPELINE  # the name plan.py gave the list before the steps ran from it
STAGE_NAMES = [step.name for step in PIPELINE]
# Steps whose dropped rows leave the run there (select's and shard's verdicts stay in their checkpoints).
DROPPING_STAGES = [step.name for step in PIPELINE if step.drops_rows]


def spec(name: str) -> Step:
    return PIPELINE[STAGE_NAMES.index(name)]


def enabled(config: Config) -> list[Step]:
    """The steps a run with this config has, in order."""
    return [step for step in PIPELINE if step.enabled(config)]


def previous(name: str, config: Config) -> Step:
    """The enabled step before `name`: the checkpoint it reads."""
    return [step for step in enabled(config) if STAGE_NAMES.index(step.name) < STAGE_NAMES.index(name)][-1]


def images_step(config: Config) -> Step:
    """The step whose checkpoint holds the image bytes."""
    return next(step for step in enabled(config) if step.holds_images)


def after(name: str, config: Config) -> list[Step]:
    """The enabled steps after `name` (itself enabled or not)."""
    return [step for step in enabled(config) if STAGE_NAMES.index(step.name) > STAGE_NAMES.index(name)]


def bound(name: str, config: Config, facts: RunFacts, **extra: Any) -> Callable[..., Any]:
    """The function step `name` applies to each batch under this config (a custom runner's, given the grouping's
    result in `extra` or as its arguments)."""
    bind = spec(name).bind
    if bind is None:
        raise ValueError(f"step {name} is a global step: it has no per-batch function")
    return bind(config, facts, **extra)


def options_read_by(*names: str) -> frozenset[str]:
    return frozenset().union(*(spec(name).options for name in names))


def options_changeable_after(stage: str) -> frozenset[str]:
    """Options a rerun that keeps every checkpoint up to `stage` may change: read only by later steps, or a
    metadata threshold."""
    done = STAGE_NAMES[: STAGE_NAMES.index(stage) + 1]
    every = frozenset(f.name for f in dataclasses.fields(Config))
    undeclared = every - options_read_by(*STAGE_NAMES)  # an option no step declares is never assumed harmless
    return (every - options_read_by(*done) - undeclared) | METADATA_THRESHOLDS


def last_resumed() -> str:
    """The last step a rerun keeps as it is: the steps after it are redone when their options changed."""
    first_redone = next(i for i, step in enumerate(PIPELINE) if step.redo != "resume")
    return PIPELINE[first_redone - 1].name


# `curate run` into a finished output resumes every checkpoint up to the last resumable step, then redoes the rest.
RERUN_OPTIONS = options_changeable_after(last_resumed())
# The Spark job resumes after the checkpoint that holds the images and redoes the rest.
AFTER_DOWNLOAD_OPTIONS = options_changeable_after(next(step.name for step in PIPELINE if step.holds_images))
