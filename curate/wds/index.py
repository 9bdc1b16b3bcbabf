"""shards/index.json (webdataset's wids index plus the training facts) and shards/sizes.json, for both executors."""

from __future__ import annotations

from typing import Any

from curate.config import Config
from curate.stages.shard import ShardPlan


def index_document(config: Config, plan: ShardPlan, entries: list[dict[str, Any]]) -> dict[str, Any]:
    """webdataset's wids shard index, plus the training facts a 256-GPU job needs."""
    c = config
    return {
        "__kind__": "wids-shard-index-v1", "wids_version": 1, "name": c.shard_name, "shardlist": entries,
        "world_size": c.world_size, "workers_per_rank": c.workers_per_rank,
        "samples_per_shard": plan.samples_per_shard, "samples_per_rank": plan.samples_per_rank,
        "global_batch_size": plan.global_batch_size, "steps_per_epoch": plan.steps_per_epoch, "seed": c.seed,
        "buckets": c.buckets,
    }


def sizes_document(entries: list[dict[str, Any]]) -> dict[str, int]:
    """shards/sizes.json as open_clip's get_dataset_size reads it: shard file name -> samples."""
    return {entry["url"].rsplit("/", 1)[-1]: entry["nsamples"] for entry in entries}
