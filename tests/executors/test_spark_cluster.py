"""jobs/aesthetics_filter.py on a real Spark standalone cluster (a Master and two Workers on 127.0.0.1, executors in
their own work folders, curate shipped as a wheel with --py-files): the bytes of `curate run`, even when a worker
and its executor are SIGKILLed while the job runs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curate.config import Config
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response
from tests.executors.standalone import SPARK_BIN, Cluster, clean_env
from tests.executors.test_spark import OPTIONS, assert_same_dataset, sample_rows

ROOT = Path(__file__).resolve().parents[2]
JOB_OPTIONS = {**OPTIONS, "world_size": 2, "batch_size_rows": 16}


def build_wheel(folder: Path) -> Path:
    """curate as a wheel, built from a copy of the checkout, under a .zip name: what a user ships with --py-files
    (pyspark puts only .zip, .egg and .jar py-files on the executors' sys.path; a wheel is a zip)."""
    tree = folder / "tree"
    shutil.copytree(ROOT / "curate", tree / "curate", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(folder / "dist"), str(tree)], check=True, capture_output=True, timeout=300)
    (wheel,) = (folder / "dist").glob("curate-*.whl")
    return Path(shutil.copy(wheel, folder / "dist" / "curate.zip"))


def job_arguments(options: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        else:
            flags += [flag, str(value)]
    return flags


def submit(cluster: Cluster, wheel: Path, inputs: list[str], output: Path, log: Path) -> subprocess.Popen[bytes]:
    command = [str(SPARK_BIN / "spark-submit"), "--master", cluster.url, "--py-files", str(wheel),
               "--driver-memory", "1g", "--executor-memory", "1g", "--executor-cores", "1",
               "--total-executor-cores", "2",
               "--conf", f"spark.pyspark.python={sys.executable}", "--conf", "spark.ui.enabled=false",
               "--conf", "spark.sql.shuffle.partitions=4", "--conf", "spark.default.parallelism=4",
               "--conf", "spark.task.maxFailures=8",
               str(ROOT / "jobs" / "aesthetics_filter.py"), "--input", *inputs, "--output", str(output),
               *job_arguments(JOB_OPTIONS)]
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=clean_env(), cwd=log.parent)


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))}


def test_the_job_on_a_standalone_cluster_writes_curate_runs_bytes_through_a_lost_worker(
        standalone_cluster: Cluster, tmp_path: Path) -> None:
    cluster = standalone_cluster
    wheel = build_wheel(tmp_path)
    routes, rows = sample_rows(48, seed=9)
    for name, response in routes.items():  # slow enough that the download is still running when a worker dies
        routes[name] = Response(response.body, response.status, response.headers, delay=0.5)
    with ImageServer(routes) as server:
        served = [dict(r, URL=server.url(r["URL"]) if r["URL"].startswith("/") else r["URL"]) for r in rows]
        (tmp_path / "in").mkdir()
        pq.write_table(pa.Table.from_pylist(served[:30]), tmp_path / "in" / "a.parquet")
        pq.write_table(pa.Table.from_pylist(served[30:]), tmp_path / "in" / "b.parquet")
        inputs = [str(tmp_path / "in")]
        run_local(inputs, tmp_path / "local", Config(**JOB_OPTIONS).validate())
        out, log = tmp_path / "cluster-out", tmp_path / "driver.log"
        job = submit(cluster, wheel, inputs, out, log)
        deadline, fetched = time.monotonic() + 300, len(server.requests)
        while len(server.requests) < fetched + 2:  # the executors are downloading
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)
        killed = cluster.kill_worker(0)
        assert job.poll() is None, "the job ended before the worker was killed"
        code = job.wait(timeout=450)
    driver = log.read_text(errors="replace")
    assert code == 0, driver[-6000:]
    assert len(killed) >= 2 and "Lost executor" in driver  # the worker and its executor; Spark saw it go
    # the executors ran in the workers' own folders and were given the wheel there
    for work in cluster.work_dirs:
        assert list(work.glob(f"app-*/*/{wheel.name}")), f"no executor of {work} received the wheel"
    assert shard_digests(out) == shard_digests(tmp_path / "local") != {}
    assert_same_dataset(tmp_path / "local", out)
