"""What `curate run` and the per-stage commands do, on the local engine."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.executors.local.engine import LocalRun, Progress
from curate.executors.local.shard import finish
from curate.pipeline import accounting, plan, steps
from curate.pipeline.steps import DROPPING_STAGES, RERUN_OPTIONS, STAGE_NAMES, Step
from curate.schema import ROW
from curate.stages.download import retry_transient
from curate.stages.shard import fitting_plan
from curate.stages.verdict import alive
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.storage.files import Location

log = logging.getLogger(__name__)



def finish_and_report(run: LocalRun, started: float) -> dict[str, Any]:
    """Ledger, samples and stats, then OUT/report.html from them."""
    from curate.report.build import build_report

    for name in ("ledger.parquet", "samples.parquet"):  # a Spark run's are folders of parts; this engine's one file
        if (run.out / name).is_dir():
            storage.remove(run.out / name)
    stats = finish(run, started)
    accounting.check_kept(stats, build_report(run.out))
    return stats


def check_same_run(out: Location, config: Config, inputs: list[str]) -> set[str]:
    """A rerun into an existing output resumes it: only options later stages read may change (stage_plan); refuse
    anything else. Returns the options that changed."""
    path = out / "stages" / "run.json"
    settings, changed = config.to_dict(), set()
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier["inputs"] != inputs:
            raise ValueError(f"{out} holds a run over {earlier['inputs']}; use another --output for {inputs}")
        changed = {k for k, v in earlier["config"].items() if settings.get(k) != v}
        refused = sorted(changed - RERUN_OPTIONS)
        if refused:
            raise ValueError(f"{out} holds a run with other values of {refused}; use another --output, "
                             "or `curate select`/`curate shard` to re-cut it")
    io.write_json({"inputs": inputs, "config": settings}, path)
    return changed


def check_shard_plan_fits(run: LocalRun, stage: str) -> None:
    """Stop after a stage when the rows still alive cannot fill one sample per shard (before more is downloaded)."""
    c = run.config
    unit = c.world_size * c.workers_per_rank
    live = run.live_rows(stage)
    if 0 < live < unit:
        raise TooFewRows(
            f"only {live} rows are left after {stage}, fewer than the {unit} shards that --world-size "
            f"{c.world_size} x --workers-per-rank {c.workers_per_rank} need (one sample per data-loader worker at "
            f"least); stopped before the next stage. Choose values that fit, e.g. "
            f"{fitting_plan(live, c.world_size, c.workers_per_rank)}, or loosen the thresholds; {resume_advice(stage)}")


def resume_advice(stage: str) -> str:
    """What a rerun into the same output may change and still resume: RERUN_OPTIONS, named; the rest is refused."""
    done = "nothing was downloaded yet" if stage == "prefilter" else "the stages so far are checkpointed"
    flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(RERUN_OPTIONS))
    return (f"{done}: rerun the same `curate run` command changing only {flags} and it resumes"
            f"{'' if stage == 'prefilter' else ' without downloading again'}; a change to any other option (e.g. "
            "--dedup, the caption checks, the download or model options) is refused there: use another --output")


class TooFewRows(ValueError):
    """The live rows cannot fill the shard plan the options ask for."""


def run_steps(run: LocalRun, todo: list[Step], changed: set[str] | frozenset[str] = frozenset(),
              force: bool = False) -> None:
    """Each step in turn: a finished checkpoint is resumed unless the step is redone (always, or when an option it
    reads changed, or because an earlier step was redone); stops early when the rows left cannot fill the shards."""
    for number, step in enumerate(todo):
        force = force or step.redo == "always" or (step.redo == "changed" and bool(set(changed) & step.options))
        run.run_step(step, force)
        if step is PIPELINE_FIRST:
            run.prepare()
        if step.drops_rows and number < len(todo) - 1:
            check_shard_plan_fits(run, step.name)


PIPELINE_FIRST = steps.PIPELINE[0]


def run_local(inputs: list[str], output: str | Path, config: Config,
              progress: Progress | None = None) -> dict[str, Any]:
    """Every step of PIPELINE, resuming after the last finished one; returns stats.json's content."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    if run.out.exists() and not run.out.is_dir():
        raise ValueError(f"--output {run.out} is a file; give a folder (it is created)")
    run.inputs, run.files = inputs, run.check_inputs(inputs)  # a bad input leaves no trace in OUT
    for step in steps.enabled(config):  # what each step can know before any work (a missing list file)
        step.check(config)
    changed = check_same_run(run.out, config, inputs)
    for leftover in io.remove_temporaries(run.out):  # a killed run's half-written files
        log.info("removed %s, left by an interrupted run", leftover)
    run_steps(run, steps.enabled(config), changed)
    return finish_and_report(run, started)


def recut(output: str | Path, config: Config, progress: Progress | None = None,
          reselect: bool = True) -> dict[str, Any]:
    """Select again with new thresholds and/or shard again, from the checkpoints of a finished run: every step
    after the last resumed one (reselect), or the last step only."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    kept = steps.last_resumed()
    if not run.checkpoint(steps.after(kept, config)[0].name).done:
        raise ValueError(f"{output}: no finished {steps.after(kept, config)[0].name} stage to re-cut; run "
                         "`curate run` first")
    run_steps(run, steps.after(kept, config) if reselect else steps.enabled(config)[-1:], force=True)
    record_config(run.out, config)
    return finish_and_report(run, started)


def retry_failed(output: str | Path, config: Config, progress: Progress | None = None) -> dict[str, Any]:
    """Fetch again only the rows whose download failed with a transient error, then redo the later stages."""
    started = time.perf_counter()
    run = LocalRun(output, config, progress)
    images = steps.images_step(config)
    downloads = run.checkpoint(images.name)
    if not downloads.done:
        raise ValueError(f"{output}: no finished {images.name} stage; run `curate run` (it resumes) first")
    io.remove_temporaries(run.out)
    later = steps.after(images.name, config)
    for step in later:  # first, so a crash here can never leave them stale
        run.checkpoint(step.name).reset()
    options, retried = plan.download_options(config), 0
    for index in range(len(downloads.parts())):
        if not downloads.dropped_path(index).exists():
            continue
        redone, count = retry_transient(storage.read_table(downloads.dropped_path(index)), options)
        if count:
            fetched = redone.filter(alive(redone))
            live = storage.read_table(downloads.part_path(index))
            live = live.filter(pc.invert(pc.is_in(live[ROW], fetched[ROW])))  # a retry killed half-way ran again
            merged = pa.concat_tables([live, fetched], promote_options="permissive").sort_by(ROW)
            downloads.write_part(index, merged)  # first: a row may briefly be in both, never in neither
            io.write_table(redone.filter(pc.invert(alive(redone))), downloads.dropped_path(index))
            retried += count
    log.info("retried %d rows whose download failed with a transient error", retried)
    run_steps(run, later)
    record_config(run.out, config)
    return finish_and_report(run, started)


def funnel_parts(output: str | Path, stage: str) -> list[Location]:
    """Files that hold every input row once as of a stage: its checkpoint and the earlier stages' dropped rows."""
    run = LocalRun(output, load_run_config(output))
    earlier = [name for name in DROPPING_STAGES if STAGE_NAMES.index(name) <= STAGE_NAMES.index(stage)
               and run.checkpoint(name).path.exists()]
    return run.checkpoint(stage).parts() + [path for name in earlier for path in run.checkpoint(name).dropped_parts()]


def record_config(out: Location, config: Config) -> None:
    """Keep the run's inputs and store the settings a re-cut or re-run used, so a later resume compares to them."""
    path = out / "stages" / "run.json"
    io.write_json({"inputs": json.loads(path.read_text())["inputs"], "config": config.to_dict()}, path)


def load_run_config(output: str | Path) -> Config:
    """The configuration a finished run used."""
    path = storage.location(output) / "stages" / "run.json"
    if not path.exists():
        raise ValueError(f"{output}: not a curate output folder (no stages/run.json)")
    return Config(**json.loads(path.read_text())["config"])


def rerun_stage(stage: str, output: str | Path, config: Config) -> dict[str, Any] | None:
    """Re-run one step from the previous step's checkpoint (first its rerun_from step, when it declares one); later
    checkpoints are marked stale. The last step also writes the books."""
    run = LocalRun(output, config)
    for later in STAGE_NAMES[STAGE_NAMES.index(stage):]:
        marker = run.checkpoint(later).path / "_SUCCESS"
        marker.unlink(missing_ok=True)
    started = time.perf_counter()
    record_config(run.out, config)  # what this command used is the run's setting from now on
    step = steps.spec(stage)
    todo = [steps.spec(step.rerun_from), step] if step.rerun_from else [step]
    for each in todo:
        run.run_step(each, force=True)
    if step is steps.enabled(config)[-1]:
        return finish_and_report(run, started)
    return None
