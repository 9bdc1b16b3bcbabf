"""download_stream: one fetch session and one thread pool across consecutive tables, so a table's slowest URL never
leaves the other threads idle; the local engine's workers report their span without their start-up."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import Config
from curate.executors.local.engine import LocalRun
from curate.net.fetch import FetchPolicy
from curate.stages.download import DownloadOptions, download_stream
from curate.storage.checkpoint import Checkpoint
from curate.testing.server import ImageServer, Response
from tests.conftest import make_jpeg

FAST = [f"/b{i}.jpg" for i in range(6)]


class _SlowUntilTheNextTable(dict):  # type: ignore[type-arg]
    """Routes whose /slow.jpg answers only once every URL of the next table has been asked for (10 s at most)."""

    def __init__(self, routes: dict[str, Response], seen: list[str]) -> None:
        super().__init__(routes)
        self.seen, self.waited_for_the_next_table = seen, False

    def get(self, key: str, default: Any = None) -> Any:
        if key == "/slow.jpg":
            give_up = time.monotonic() + 10
            while not set(FAST) <= set(self.seen) and time.monotonic() < give_up:
                time.sleep(0.01)
            self.waited_for_the_next_table = set(FAST) <= set(self.seen)
        return super().get(key, default)


def test_the_next_table_is_fetched_while_the_slowest_url_of_the_one_before_is_out() -> None:
    body = make_jpeg(64, 48, seed=1)
    with ImageServer() as server:
        routes = _SlowUntilTheNextTable({path: Response(body) for path in ["/slow.jpg", "/a.jpg", *FAST]},
                                        server.requests)
        server.httpd.RequestHandlerClass.routes = routes  # type: ignore[attr-defined]
        first = pa.table({"url": [server.url("/slow.jpg"), server.url("/a.jpg")], "row": [0, 1]})
        second = pa.table({"url": [server.url(path) for path in FAST], "row": list(range(2, 8))})
        options = DownloadOptions(image_size=64, threads=4, max_per_host=8,
                                  policy=FetchPolicy(allow_loopback=True, timeout=30))
        out = list(download_stream([first, second], options, rows=3))
    assert routes.waited_for_the_next_table  # the slow URL answered after the next table's URLs were all asked for
    assert [number for number, _ in out] == [0, 1, 1]  # each table's slices, in order, the tables in order
    rows = pa.concat_tables([chunk.select(["row", "status"]) for _, chunk in out]).to_pylist()
    assert rows == [{"row": i, "status": "success"} for i in range(8)]


def test_the_local_workers_write_every_part_and_report_their_span(tmp_path: Path) -> None:
    rows = [{"URL": None, "TEXT": f"caption {i}", "WIDTH": 96.0, "HEIGHT": 64.0, "AESTHETIC_SCORE": 6.0,
             "pwatermark": 0.1} for i in range(40)]
    with ImageServer() as server:
        for i, row in enumerate(rows):
            server.routes[f"/{i}.jpg"] = Response(make_jpeg(96, 64, seed=i))
            row["URL"] = server.url(f"/{i}.jpg")
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")
        config = Config(scores="metadata", min_size=1, image_size=64, batch_size_rows=10, processes=2, threads=4,
                        allow_loopback=True).validate()
        run = LocalRun(tmp_path / "out", config)
        run.ingest([str(tmp_path / "input.parquet")])
        run.prefilter()
        seen: list[int] = []
        run.progress = lambda stage, done, total: seen.append(done)
        meta = run.download()
    target = Checkpoint(tmp_path / "out", "download")
    statuses = pa.concat_tables(pq.read_table(path) for path in target.parts())["status"].to_pylist()
    assert len(target.parts()) == 4 and statuses == ["success"] * 40
    assert seen[-1] == 4  # every written part was reported to the parent
    assert 0 < meta["work_seconds"] <= meta["seconds"]  # the workers' span leaves out their start-up
    start, end = meta["work_span"]  # where it lies in time (time.time()): the bench measures the tool's CPU there
    assert end - start == pytest.approx(meta["work_seconds"]) and end <= time.time()
    assert Checkpoint(tmp_path / "out", "download").meta()["work_span"] == [start, end]



# A fresh worker's view: the table is read as the workers read their parts (pq.read_table or any pa.array of Python
# values would load pandas before the measurement, and hide it).
_NOTHING_LOADED_MID_STREAM = """
import sys
import pyarrow.parquet as pq
from curate.net.fetch import FetchPolicy
from curate.stages.download import DownloadOptions, download_stream, warm_up

table = pq.ParquetFile(sys.argv[1]).read()
options = DownloadOptions(image_size=64, threads=2, policy=FetchPolicy(allow_loopback=True, timeout=30))
warm_up()
before = set(sys.modules)
statuses = [s for _, chunk in download_stream([table], options) for s in chunk["status"].to_pylist()]
assert statuses.count("success") == 3, statuses
print(sorted(set(sys.modules) - before))
"""


def test_a_warmed_up_worker_loads_no_module_mid_stream(tmp_path: Path) -> None:
    """warm_up is the download workers' start-up: what a first image or first slice would load lazily (OpenCV,
    scipy's DCT, pandas under pyarrow) is loaded there, not mid-stream with every thread queued on the import lock
    and inside the span the bench measures."""
    with ImageServer() as server:
        for i in range(3):
            server.routes[f"/{i}.jpg"] = Response(make_jpeg(96, 64, seed=i))
        urls = [server.url(f"/{i}.jpg") for i in range(3)] + [server.url("/missing.jpg")]
        pq.write_table(pa.table({"url": urls, "row": list(range(4))}), tmp_path / "part.parquet")
        done = subprocess.run([sys.executable, "-c", _NOTHING_LOADED_MID_STREAM, str(tmp_path / "part.parquet")],
                              capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
