"""Every stage declared once: its name, kind, the columns it adds and the options it reads.

Both engines and the CLI take the stage order, the stages that drop rows, and which options a rerun or a resume may
change from here; no engine keeps its own list. A map works row by row over Arrow batches; a global step needs the
whole run (signature -> group -> apply).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from curate.config import Config


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str  # "map" or "global"
    adds: tuple[str, ...]  # schema files (curate/schemas/NAME.arrow.json) of the columns it adds
    options: frozenset[str]  # the Config fields it reads
    drops_rows: bool = True  # passes only live rows on (the local engine keeps the others in dropped parts)


# The metadata thresholds: prefilter applies them before the download (with --scores metadata, and --min-size on the
# claimed size always), select after. A rerun may change them: select then says how many rows prefilter dropped that
# the new values would keep (they are not brought back).
METADATA_THRESHOLDS = frozenset({"min_size", "threshold", "max_watermark", "max_unsafe"})
# Thresholds on what only the models measure: read by dedup's survivor rule and select, so a rerun may change them.
MODEL_THRESHOLDS = frozenset({"min_clip_score"})
_DOWNLOAD = frozenset({"image_size", "resize_mode", "buckets", "threads", "processes", "timeout", "max_image_bytes",
                       "allow_loopback", "allow_private_network", "allow_link_local", "disallowed_header_directives",
                       "user_agent_token", "max_per_host", "ca_bundle"})
_MODELS = frozenset({"device", "precision", "batch_size", "model_cache", "clip_weights", "aesthetic_weights",
                     "aesthetic_head", "watermark_weights", "safety_weights"})
_SHARD = frozenset({"world_size", "workers_per_rank", "target_shard_size", "global_batch_size", "seed", "shard_name"})

STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", "map", ("metadata",), frozenset({"batch_size_rows", "input_format", "caption_field"}),
              drops_rows=False),
    StageSpec("prefilter", "global", ("verdict",), METADATA_THRESHOLDS | {"scores", "dedup"}),
    StageSpec("download", "map", ("download",), _DOWNLOAD),
    StageSpec("score", "map", ("score",), _MODELS | {"scores"}),
    StageSpec("dedup", "global", ("verdict",),
              METADATA_THRESHOLDS | MODEL_THRESHOLDS | {"dedup", "phash_distance", "semdedup_threshold",
                                                        "semdedup_clusters", "seed"}),
    StageSpec("select", "map", ("verdict",), METADATA_THRESHOLDS | MODEL_THRESHOLDS, drops_rows=False),
    StageSpec("shard", "global", ("samples",), _SHARD, drops_rows=False),
)
STAGE_NAMES = [stage.name for stage in STAGES]
# Stages whose dropped rows leave the run there (select's and shard's verdicts stay in their checkpoints).
DROPPING_STAGES = [stage.name for stage in STAGES if stage.drops_rows]


def spec(name: str) -> StageSpec:
    return STAGES[STAGE_NAMES.index(name)]


def options_read_by(*names: str) -> frozenset[str]:
    return frozenset().union(*(spec(name).options for name in names))


def options_changeable_after(stage: str) -> frozenset[str]:
    """Options a rerun that keeps every checkpoint up to `stage` may change: read only by later stages, or a
    metadata threshold."""
    done = STAGE_NAMES[: STAGE_NAMES.index(stage) + 1]
    every = frozenset(field.name for field in dataclasses.fields(Config))
    undeclared = every - options_read_by(*STAGE_NAMES)  # an option no stage declares is never assumed harmless
    return (every - options_read_by(*done) - undeclared) | METADATA_THRESHOLDS


# `curate run` into a finished output resumes every checkpoint up to score, then redoes dedup, select and shard.
RERUN_OPTIONS = options_changeable_after("score")
# The Spark job resumes after its download checkpoint and redoes the rest.
AFTER_DOWNLOAD_OPTIONS = options_changeable_after("download")
