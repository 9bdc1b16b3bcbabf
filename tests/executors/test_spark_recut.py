"""A Spark output is a curate output folder: `curate select/shard/retry/verify/report` work on it as on a local one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from curate.cli import app
from curate.config import Config
from curate.pipeline.run import run_local
from curate.storage.checkpoint import Checkpoint
from curate.testing.server import ImageServer
from tests.executors.test_spark import OPTIONS, assert_same_dataset, sample_rows


def curate(*args: str) -> None:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output


def same_stats(local: Path, spark_out: Path) -> None:
    a, b = (json.loads((out / "stats.json").read_text()) for out in (local, spark_out))
    for name in ("input_rows", "kept", "dropped", "dropped_by_stage", "judged_by", "not_reconsidered", "config"):
        assert a[name] == b[name], name


def test_curate_recuts_a_spark_output_as_it_recuts_a_local_one(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import run_spark

    routes, rows = sample_rows(70, seed=5)
    config = Config(**{**OPTIONS, "world_size": 2, "batch_size_rows": 24}).validate()
    local, spark_out = tmp_path / "local", tmp_path / "spark"
    with ImageServer(routes) as server:
        served = [dict(r, URL=server.url(r["URL"]) if r["URL"].startswith("/") else r["URL"]) for r in rows]
        (tmp_path / "in").mkdir()
        pq.write_table(pa.Table.from_pylist(served[:40]), tmp_path / "in" / "a.parquet")
        pq.write_table(pa.Table.from_pylist(served[40:]), tmp_path / "in" / "b.parquet")
        inputs = [str(tmp_path / "in")]
        run_local(inputs, local, config)
        run_spark(spark, inputs, str(spark_out), config)
        # the run record and the checkpoints the local engine reads, in its layout: a part-i per part, every stage
        assert json.loads((spark_out / "stages" / "run.json").read_text()) == json.loads(
            (local / "stages" / "run.json").read_text())
        for stage in ("ingest", "download", "score", "dedup", "select", "shard"):
            checkpoint = Checkpoint(spark_out, stage)
            assert checkpoint.done and [p.name for p in checkpoint.parts()] == [
                f"part-{i:06d}.parquet" for i in range(len(Checkpoint(local, stage).parts()))], stage
        assert Checkpoint(spark_out, "prefilter").dropped_parts() and Checkpoint(spark_out, "download").dropped_parts()
        for out in (local, spark_out):
            curate("select", str(out), "--threshold", "6.0")
            curate("shard", str(out), "--seed", "9")
        assert_same_dataset(local, spark_out)
        same_stats(local, spark_out)
        assert json.loads((spark_out / "stats.json").read_text())["config"]["threshold"] == 6.0
        for out in (local, spark_out):
            curate("retry", str(out))
        assert_same_dataset(local, spark_out)
        same_stats(local, spark_out)
    curate("verify", str(spark_out))
    (spark_out / "report.html").unlink()
    curate("report", str(spark_out))
    assert (spark_out / "report.html").stat().st_size > 10_000
