"""What `curate run` and the per-stage commands do, on the local engine."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from curate import io
from curate.config import Config
from curate.engines.local import STAGES, LocalRun, Progress
from curate.engines.local_shard import finish, shard
from curate.stages.download import retry_transient

log = logging.getLogger(__name__)
# Options that only select and shard read: changing them re-cuts a run instead of refusing it.
RECUT_OPTIONS = {"threshold", "max_watermark", "world_size", "workers_per_rank", "target_shard_size",
                 "global_batch_size", "seed", "shard_name"}


def finish_and_report(run: LocalRun, started: float) -> dict[str, Any]:
    """Ledger, samples and stats, then OUT/report.html from them."""
    from curate.report import build_report

    stats = finish(run, started)
    build_report(run.out)
    return stats


def check_same_run(out: Path, config: Config, inputs: list[str]) -> None:
    """A rerun into an existing output must use the same arguments (it resumes); refuse anything else."""
    path = out / "stages" / "run.json"
    settings = config.to_dict()
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier["inputs"] != inputs:
            raise ValueError(f"{out} holds a run over {earlier['inputs']}; use another --output for {inputs}")
        changed = sorted(k for k, v in earlier["config"].items()
                         if settings.get(k) != v and k not in RECUT_OPTIONS)
        if changed:
            raise ValueError(f"{out} holds a run with other values of {changed}; use another --output, "
                             "or `curate select`/`curate shard` to re-cut it")
    io.write_json({"inputs": inputs, "config": settings}, path)


def run_local(inputs: list[str], output: str | Path, config: Config,
              progress: Progress | None = None) -> dict[str, Any]:
    """Every stage, resuming after the last finished one; returns stats.json's content."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    check_same_run(run.out, config, inputs)
    for leftover in io.remove_temporaries(run.out):  # a killed run's half-written files
        log.info("removed %s, left by an interrupted run", leftover)
    run.ingest(inputs)
    scores = run.resolve_scores()
    if scores == "metadata":
        run.require_metadata_scores()
    else:
        from curate.engines.local import _load_scorer

        _load_scorer(config)  # a missing weight stops the run before any download
    run.prefilter(scores)
    run.download()
    run.score(scores)
    run.dedup()
    run.select(force=True)
    shard(run)
    return finish_and_report(run, started)


def recut(output: str | Path, config: Config, progress: Progress | None = None,
          reselect: bool = True) -> dict[str, Any]:
    """Select again with new thresholds and/or shard again, from the checkpoints of a finished run."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    if not run.checkpoint("dedup").done:
        raise ValueError(f"{output}: no finished dedup stage to re-cut; run `curate run` first")
    if reselect:
        run.select(force=True)
    shard(run)
    record_config(run.out, config)
    return finish_and_report(run, started)


def retry_failed(output: str | Path, config: Config, progress: Progress | None = None) -> dict[str, Any]:
    """Fetch again only the rows whose download failed with a transient error, then redo the later stages."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    downloads = run.checkpoint("download")
    if not downloads.done:
        raise ValueError(f"{output}: no finished download stage; run `curate run` (it resumes) first")
    io.remove_temporaries(run.out)
    for later in ("score", "dedup", "select", "shard"):  # first, so a crash here can never leave them stale
        run.checkpoint(later).reset()
    options, retried = run.download_options(), 0
    for index, path in enumerate(downloads.parts()):
        part, count = retry_transient(pq.read_table(path), options)
        if count:
            downloads.write_part(index, part)
            retried += count
    log.info("retried %d rows whose download failed with a transient error", retried)
    run.score(run.resolve_scores())
    run.dedup()
    run.select(force=True)
    shard(run)
    return finish_and_report(run, started)


def record_config(out: Path, config: Config) -> None:
    """Keep the run's inputs and store the settings a re-cut or re-run used, so a later resume compares to them."""
    path = out / "stages" / "run.json"
    io.write_json({"inputs": json.loads(path.read_text())["inputs"], "config": config.to_dict()}, path)


def load_run_config(output: str | Path) -> Config:
    """The configuration a finished run used."""
    path = Path(output) / "stages" / "run.json"
    if not path.exists():
        raise ValueError(f"{output}: not a curate output folder (no stages/run.json)")
    return Config(**json.loads(path.read_text())["config"])


def rerun_stage(stage: str, output: str | Path, config: Config) -> dict[str, Any] | None:
    """Re-run one stage from the previous stage's checkpoint; later checkpoints are marked stale."""
    run = LocalRun(output, config)
    for later in STAGES[STAGES.index(stage):]:
        marker = run.checkpoint(later).path / "_SUCCESS"
        marker.unlink(missing_ok=True)
    started = time.perf_counter()
    if stage == "shard":
        shard(run)
        return finish_and_report(run, started)
    scores = run.resolve_scores()
    if stage == "download":
        run.checkpoint("download").reset()
    if stage == "score":
        run.checkpoint("score").reset()
    getattr(run, stage)(*([scores] if stage in ("prefilter", "score") else []))
    record_config(run.out, config)
    return None
