"""GPU scheduling of the score stage, checked on CPU: the discovery script, the two documented spark-submit forms,
and a task that Spark gave no usable GPU scoring on the configured device."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from curate.config import Config
from curate.executors.spark.engine import assigned_device, score_profile, task_device, wants_score_profile

SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "gpu_discovery.sh"


def discover(path: str) -> dict[str, Any]:
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30, env={**os.environ, "PATH": path},
                          check=True)
    return dict(json.loads(done.stdout))


def test_the_discovery_script_prints_spark_resource_json(tmp_path: Path) -> None:
    assert discover("/usr/bin:/bin") == {"name": "gpu", "addresses": []}  # no nvidia-smi: no GPU, still valid JSON
    smi = tmp_path / "nvidia-smi"  # what nvidia-smi --query-gpu=index --format=csv,noheader prints on 2 GPUs
    smi.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    smi.chmod(0o755)
    assert discover(f"{tmp_path}:/usr/bin:/bin") == {"name": "gpu", "addresses": ["0", "1"]}
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")  # a driver problem: no GPU
    assert discover(f"{tmp_path}:/usr/bin:/bin") == {"name": "gpu", "addresses": []}


def test_the_score_stage_asks_for_gpus_only_in_the_documented_forms(spark: Any) -> None:
    gpu_executors = {"spark.executor.resource.gpu.amount": "1"}
    every_task = {**gpu_executors, "spark.task.resource.gpu.amount": "1"}
    assert wants_score_profile(gpu_executors.get, "model")  # form 2: the score step alone takes a GPU
    assert not wants_score_profile(every_task.get, "model")  # form 1: every task has one already
    assert not wants_score_profile(gpu_executors.get, "metadata")  # nothing to score on a GPU
    assert not wants_score_profile({}.get, "model")  # CPU executors
    assert score_profile(spark, "model") is None  # this local[2] session has no GPU executors


def test_a_task_without_a_usable_gpu_scores_on_the_configured_device(spark: Any) -> None:
    assert task_device("cpu", ["1"], 2) == "cuda:1"  # the GPU Spark assigned, never cuda:0 for every task
    assert task_device("auto", [], 0) == "auto"
    assert task_device("cpu", ["0"], 0) == "cpu"  # assigned a GPU that torch cannot see (CPU build): falls back
    config = Config(device="cpu")

    def devices(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            yield pa.RecordBatch.from_pydict({"device": [assigned_device(config)] * batch.num_rows})

    seen = {row["device"] for row in spark.range(4).mapInArrow(devices, "device string").collect()}
    assert seen == {"cpu"}  # inside real Spark tasks: TaskContext.resources() has no GPU here
