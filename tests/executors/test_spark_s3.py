"""The Spark job's fsspec writes against moto's S3 server on 127.0.0.1: Spark tasks write the tars, the driver the
JSON and report.html, and `curate verify`/`curate report` read the folder there.

Spark's own parquet I/O (checkpoints, ledger, samples) on S3 goes through Hadoop's s3a connector, whose hadoop-aws
jar cannot be fetched here (docs/spark.md): those parts are written locally by a real Spark run, then uploaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.config import Config
from curate.executors.spark import shard as spark_shard
from curate.executors.spark.books import write_json
from curate.executors.spark.engine import SparkRun, run_spark, write_report
from curate.stages.shard import ShardPlan
from curate.storage import files as storage
from curate.wds.verify import verify

OPTIONS: dict[str, Any] = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "min_size": 256,
                           "image_size": 128, "allow_private_network": True, "threads": 8, "timeout": 30.0}


def test_spark_job_writes_tars_json_and_report_to_s3(spark: Any, tmp_path: Path, corpus_factory, s3_endpoint: str,
                                                     s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"):
        # Spark's Python workers get the driver's spark.executorEnv settings, not its later os.environ.
        monkeypatch.setitem(spark.sparkContext.environment, name, os.environ[name])
    corpus, config = corpus_factory(40), Config(**OPTIONS).validate()
    local = tmp_path / "spark"
    stats = run_spark(spark, [str(corpus.path)], str(local), config)
    url = f"s3://{s3_bucket}/spark"
    fs = fsspec.filesystem("s3")
    for name in ("ledger.parquet", "samples.parquet", "stats.json", "stages"):  # Spark's parquet, as s3a would
        fs.put(str(local / name), f"{s3_bucket}/spark/{name}", recursive=True)

    index = json.loads((local / "shards" / "index.json").read_text())
    plan = ShardPlan(len(index["shardlist"]), index["samples_per_shard"], stats["shards"]["remainder"],
                     index["world_size"], index["workers_per_rank"], index["global_batch_size"])
    placed = spark.read.parquet(str(local / "stages" / "shard"))
    downloaded = spark.read.parquet(str(local / "stages" / "download"))
    entries = spark_shard.write_shards(placed, downloaded, plan, config, f"{url}/shards")  # Spark tasks, to S3
    assert [{k: e[k] for k in ("url", "nsamples", "filesize", "sha256")} for e in entries] == [
        {k: e[k] for k in ("url", "nsamples", "filesize", "sha256")} for e in index["shardlist"]]
    remote = storage.location(url)
    for entry in index["shardlist"]:
        assert (remote / "shards" / entry["url"]).read_bytes() == (local / "shards" / entry["url"]).read_bytes()

    run = SparkRun(spark, url, config)
    write_json(run, "shards/index.json", index)
    write_json(run, "shards/sizes.json", json.loads((local / "shards" / "sizes.json").read_text()))
    assert not (remote / "report.html").exists()
    write_report(run)
    assert "curate report" in (remote / "report.html").read_text()
    assert (remote / "shards" / "index.json").read_bytes() == (local / "shards" / "index.json").read_bytes()
    assert not [p for p in fs.find(f"{s3_bucket}/spark") if p.endswith(".tmp")]
    assert verify(url) == []
    runner = CliRunner()
    assert runner.invoke(app, ["verify", url]).exit_code == 0
    assert runner.invoke(app, ["report", url]).exit_code == 0
