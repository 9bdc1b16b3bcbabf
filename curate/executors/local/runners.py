"""The local executor's own runners for the steps where streaming or spilling matters (PIPELINE names them on each
step as "curate.executors.local.runners:NAME"): each takes (run, step, force) and returns the step's meta."""

from __future__ import annotations

from typing import Any

from curate.executors.local.engine import LocalRun
from curate.pipeline.steps import Step


def ingest(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """Every input row to the canonical table (run.inputs and run.files: set by the caller that checked them)."""
    return run.ingest(run.inputs, run.files)


def prefilter(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """url+caption duplicates as spilled signatures, then the per-row checks, part by part."""
    return run.prefilter(force)


def download(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """The streaming download pool: no part waits for its slowest URL; a killed run resumes per part."""
    return run.download(force)


def score(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """The models (or the metadata) a slice of images at a time; a killed run resumes per part."""
    return run.score(force)


def dedup(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """Exact, pHash and semantic duplicates as spilled partitions, embeddings from a memory map."""
    return run.dedup(force)


def select(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    return run.select(force)


def shard(run: LocalRun, step: Step, force: bool) -> dict[str, Any]:
    """The partitioned shuffle and the tar writer (curate.executors.local.shard)."""
    from curate.executors.local.shard import shard as write_shards

    return write_shards(run)
