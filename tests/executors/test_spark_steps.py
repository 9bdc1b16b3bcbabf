"""Steps added through the protocol alone run on Spark through its generic map/global runners: same books and
byte-identical tars as the local engine."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from curate.cli import app
from curate.config import Config
from curate.pipeline.run import run_local
from curate.storage.checkpoint import Checkpoint
from curate.testing.server import ImageServer, Response
from curate.tools.demo import generated_image, jpeg

OPTIONS: dict[str, Any] = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "allow_loopback": True,
                           "min_size": 16, "image_size": 64, "threads": 4, "processes": 1, "batch_size_rows": 8,
                           "target_shard_size": 20_000, "seed": 3, "dedup": ["url", "exact", "phash"]}


def corpus(folder: Path, server: ImageServer, rows: int = 24) -> tuple[list[str], list[bytes]]:
    rng = np.random.default_rng(6)
    urls, images = [], []
    for i in range(rows):
        image = jpeg(generated_image(rng, 48 + i, 40 + 2 * i))
        server.routes[f"/{i}.jpg"] = Response(image)
        urls.append(server.url(f"/{i}.jpg"))
        images.append(image)
    table = pa.table({"URL": urls, "TEXT": [f"thing {i}" for i in range(rows)], "AESTHETIC_SCORE": [6.0] * rows,
                      "pwatermark": [0.1] * rows})
    pq.write_table(table.slice(0, rows // 2), folder / "a.parquet")
    pq.write_table(table.slice(rows // 2), folder / "b.parquet")
    return urls, images


def books(out: Path) -> dict[str, Any]:
    return {"ledger": pq.read_table(out / "ledger.parquet").sort_by("row").to_pylist(),
            "samples": pq.read_table(out / "samples.parquet").sort_by("key").select(["key", "shard", "position", "row"])
            .to_pylist(), "index": json.loads((out / "shards" / "index.json").read_text()),
            "tars": {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}}


def assert_same(local: Path, spark_out: Path) -> None:
    expected, got = books(local), books(spark_out)
    for name in ("ledger", "samples", "index"):
        assert got[name] == expected[name], name
    assert list(got["tars"]) == list(expected["tars"]) and got["tars"] == expected["tars"]


def test_blocklist_on_spark_gives_the_local_engines_dataset(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import run_spark

    with ImageServer() as server:
        (tmp_path / "input").mkdir()
        urls, images = corpus(tmp_path / "input", server)
        (tmp_path / "urls.txt").write_text("\n".join(hashlib.sha256(u.encode()).hexdigest() for u in urls[3:5]))
        pq.write_table(pa.table({"sha256": [hashlib.sha256(images[i]).hexdigest() for i in (7, 15)]}),
                       tmp_path / "images.parquet")
        config = Config(**OPTIONS, blocklist=[str(tmp_path / "urls.txt"), str(tmp_path / "images.parquet")])
        inputs = [str(tmp_path / "input")]
        local = run_local(inputs, tmp_path / "local", config.validate())
        spark_stats = run_spark(spark, inputs, str(tmp_path / "spark"), config.validate())
    assert local["dropped_by_stage"]["blocklist_url"] == {"blocklisted_url": 2}
    assert local["dropped_by_stage"]["blocklist_image"] == {"blocklisted_image": 2}
    assert spark_stats["dropped_by_stage"] == local["dropped_by_stage"]
    assert spark_stats["funnel"] == local["funnel"]
    assert_same(tmp_path / "local", tmp_path / "spark")
    # the Spark output in the local layout: the new steps' dropped parts are there, so a re-cut keeps every row
    assert Checkpoint(tmp_path / "spark", "blocklist_url").dropped_parts()
    assert Checkpoint(tmp_path / "spark", "blocklist_image").done
    for out in ("local", "spark"):
        for command in (["select", str(tmp_path / out), "--threshold", "5.5"], ["shard", str(tmp_path / out)]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 0, result.output
    recut = [json.loads((tmp_path / out / "stats.json").read_text()) for out in ("local", "spark")]
    assert recut[1]["dropped_by_stage"] == recut[0]["dropped_by_stage"]
    assert recut[0]["dropped_by_stage"]["blocklist_image"] == {"blocklisted_image": 2}
    assert recut[1]["config"]["threshold"] == 5.5 and recut[1]["input_rows"] == recut[1]["kept"] + recut[1]["dropped"]
    assert_same(tmp_path / "local", tmp_path / "spark")


def test_decontamination_on_spark_gives_the_local_engines_dataset(spark: Any, tmp_path: Path) -> None:
    from PIL import Image

    from curate.executors.spark.engine import run_spark

    with ImageServer() as server:
        (tmp_path / "input").mkdir()
        _, images = corpus(tmp_path / "input", server)
        reference = tmp_path / "eval"
        reference.mkdir()
        for i in (2, 13, 20):  # re-encoded copies of three of the run's images
            with Image.open(io.BytesIO(images[i])) as image:
                (reference / f"{i}.jpg").write_bytes(jpeg(image.convert("RGB"), quality=55))
        config = Config(**OPTIONS, decontaminate=str(reference))
        inputs = [str(tmp_path / "input")]
        local = run_local(inputs, tmp_path / "local", config.validate())
        spark_stats = run_spark(spark, inputs, str(tmp_path / "spark"), config.validate())
    assert local["dropped_by_stage"]["decontaminate_phash"] == {"contaminates_reference_phash": 3}
    assert spark_stats["dropped_by_stage"] == local["dropped_by_stage"]
    assert_same(tmp_path / "local", tmp_path / "spark")
