"""Consent and face blurring on Spark: robots.txt, tdmrep.json and --blur-faces give the local engine's dataset."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import skimage.data
from PIL import Image

from curate.config import Config
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response
from tests.executors.test_spark import assert_same_dataset

ROBOTS = "User-agent: *\nDisallow: /private/\n\nUser-agent: GPTBot\nDisallow: /ai/\n"


def _png(pixels: np.ndarray) -> Response:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return Response(buffer.getvalue(), headers={"Content-Type": "image/png"})


def test_consent_and_blur_on_spark_match_the_local_engine(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import run_spark

    rng = np.random.default_rng(5)
    routes = {"/people/astronaut.png": _png(skimage.data.astronaut())}
    paths = ["/people/astronaut.png", "/private/a.png", "/reserved/b.png", "/ai/c.png"]
    for i in range(8):
        routes[f"/img/{i}.png"] = _png(rng.integers(0, 256, (80 + 8 * i, 96, 3), dtype=np.uint8))
        paths.append(f"/img/{i}.png")
    for path in paths[1:4]:
        routes[path] = routes["/img/0.png"]
    with ImageServer(routes) as server:
        server.serve_robots(ROBOTS)
        server.serve_tdmrep([{"location": "/reserved/", "tdm-reservation": 1}])
        rows = [{"URL": server.url(p), "TEXT": f"thing {i}", "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1,
                 "WIDTH": 512.0, "HEIGHT": 512.0} for i, p in enumerate(paths)]
        (tmp_path / "input").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input" / "part.parquet")
        config = Config(scores="metadata", world_size=3, workers_per_rank=1, allow_loopback=True, min_size=64,
                        image_size=256, threads=4, dedup=["url"], blur_faces=True, robots_agents=["GPTBot"],
                        timeout=10.0).validate()
        local = run_local([str(tmp_path / "input")], tmp_path / "local", config)
        spark_stats = run_spark(spark, [str(tmp_path / "input")], str(tmp_path / "spark"), config)
    assert local["dropped_by_stage"]["download"] == {"robots_disallowed": 2, "tdm_reserved": 1}
    assert spark_stats["dropped_by_stage"] == local["dropped_by_stage"]
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")  # byte-identical tars, blurred faces included
    for out in ("local", "spark"):
        samples = pq.read_table(tmp_path / out / "samples.parquet")
        blurred = dict(zip(samples["url"].to_pylist(), samples["faces_blurred"].to_pylist(), strict=True))
        assert blurred.pop(server.url("/people/astronaut.png")) == 1 and set(blurred.values()) == {0}
        assert set(samples["consent_robots"].to_pylist()) == {"allowed"}
