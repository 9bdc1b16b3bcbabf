"""PIPELINE: the steps' declarations and what derives from them (edges, resume, the options a global step reads)."""

from __future__ import annotations

import pyarrow as pa

from curate.config import Config
from curate.pipeline import steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.steps import STAGES
from tests.test_plan import Recording


def test_a_global_steps_signature_and_group_read_only_the_options_it_declares() -> None:
    config = Recording(Config(blocklist=["list.txt"], decontaminate="ref", decontaminate_distance=3))
    for step in STAGES:
        if step.global_step is None:
            continue
        config.read.clear()
        signature = step.global_step.signature(config, RunFacts())  # type: ignore[arg-type]
        step.global_step.group(config, RunFacts())(signature(pa.table({  # type: ignore[arg-type]
            "row": pa.array([0], pa.int64()), "url": ["http://127.0.0.1:9/a.jpg"], "sha256": ["ab" * 32],
            "phash": pa.array([5], pa.int64())})))
        assert config.read <= step.options, (step.name, config.read - step.options)


def test_every_step_reads_the_checkpoint_of_the_enabled_step_before_it() -> None:
    every = Config(blocklist=["list.txt"], decontaminate="ref")
    names = [step.name for step in steps.enabled(every)]
    assert names == steps.STAGE_NAMES  # every optional step is in this run
    assert steps.previous("download", every).name == "blocklist_url"
    assert steps.previous("download", Config()).name == "prefilter"  # without --blocklist, the edge skips it
    assert steps.images_step(Config()).name == "download"
    assert steps.last_resumed() == "decontaminate_semantic"
    assert steps.after("decontaminate_semantic", Config())[0].name == "dedup"


def test_rerun_options_are_those_no_resumed_step_reads() -> None:
    assert "blocklist" not in steps.RERUN_OPTIONS and "decontaminate" not in steps.RERUN_OPTIONS
    assert {"min_clip_score", "threshold", "seed", "world_size"} <= steps.RERUN_OPTIONS
    assert "decontaminate_cosine" in steps.AFTER_DOWNLOAD_OPTIONS  # Spark redoes every step after the images'


def test_every_step_runs_through_its_own_runner_or_a_generic_one() -> None:
    for step in STAGES:
        assert (step.bind is None) != (step.global_step is None) or step.local is not None, step.name
        for path in (step.local, step.spark):
            if path is not None:
                assert callable(steps.runner(path)), path
