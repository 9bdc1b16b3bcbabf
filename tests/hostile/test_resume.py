"""A `curate run` killed with SIGKILL at points spread over its stages, restarted each time with the same
arguments, ends byte-identical to one that never stopped, and leaves no temporary file behind."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.pipeline.run import retry_failed
from curate.testing.server import ImageServer, Response
from tests.hostile.conftest import hostile_config, jpeg, outcomes, row, run_rows, serve, write_rows

log = logging.getLogger(__name__)
ROWS = 120
PART_ROWS = 12  # ten checkpoint parts
COMPARED = ["ledger.parquet", "samples.parquet", "shards/index.json"]
Condition = Callable[[Path], bool]


def corpus(server: ImageServer, path: Path) -> Path:
    """Mostly good images, slow enough to kill mid-download, with failures and duplicates for the ledger."""
    rows = []
    for i in range(ROWS):
        if i % 10 == 9:
            url = serve(server, f"/missing/{i}", Response(b"gone", status=404))
        elif i % 10 == 8:
            url = serve(server, f"/html/{i}", Response(b"<html></html>", delay=0.02))
        else:
            url = serve(server, f"/img/{i}.jpg", Response(jpeg(i % 50, 64 + i % 7, 48), delay=0.04))
        rows.append(row(url, f"caption {i % 100}", AESTHETIC_SCORE=4.0 + (i % 5)))
    return write_rows(path, rows)


def command(sample: Path, out: Path) -> list[str]:
    return [str(Path(sys.executable).parent / "curate"), "run", str(sample), "--output", str(out),
            "--scores", "metadata",
            "--world-size", "2", "--workers-per-rank", "2", "--target-shard-size", "20000", "--min-size", "1",
            "--allow-private-network", "--dedup", "url,exact,phash", "--batch-size-rows", str(PART_ROWS),
            "--threads", "4", "--timeout", "3", "--image-size", "64"]


def _parts(stage: str, count: int) -> Condition:
    return lambda out: len(list((out / "stages" / stage).glob("part-*.parquet"))) >= count


def _exists(relative: str) -> Condition:
    return lambda out: (out / relative).exists()


def _any(pattern: str) -> Condition:
    return lambda out: any(out.glob(pattern))


KILL_POINTS: list[tuple[str, Condition]] = [
    ("ingest written", _exists("stages/ingest/_SUCCESS")),
    ("download, 2 parts", _parts("download", 2)),
    ("download, 5 parts", _parts("download", 5)),
    ("download, 9 parts", _parts("download", 9)),
    ("score", _parts("score", 3)),
    ("dedup", _exists("stages/score/_SUCCESS")),
    ("shard buckets", _exists("stages/shard-buckets")),
    ("tar written", _any("shards/*.tar")),
    ("manifest", _exists("shards/index.json")),
    ("books", _exists("ledger.parquet")),
]


def run_until(cmd: list[str], out: Path, condition: Condition, limit: float = 120.0) -> bool:
    """Start cmd; SIGKILL it as soon as condition holds. True when it was killed before finishing."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < limit:
        if condition(out):
            children = descendants(process.pid)
            process.send_signal(signal.SIGKILL)
            process.wait()
            assert_exit(children)
            return True
        time.sleep(0.005)
    _, stderr = process.communicate(timeout=limit)
    assert process.returncode == 0, stderr.decode()[-3000:]
    return False


def descendants(pid: int) -> set[int]:
    """Every process under pid (download workers), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while listed
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_exit(pids: set[int], limit: float = 20.0) -> None:
    """A killed run's worker processes exit by themselves: none is left waiting on its queue."""
    deadline = time.monotonic() + limit
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if running(pid)]
    for pid in left:  # do not leak them into the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} worker processes outlived the killed run"


def snapshot(out: Path) -> dict[str, bytes]:
    files = {name: (out / name).read_bytes() for name in COMPARED}
    files.update({f"shards/{p.name}": p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))})
    return files


@pytest.mark.slow
def test_killed_and_restarted_run_matches_an_uninterrupted_one(tmp_path: Path, server: ImageServer) -> None:
    sample = corpus(server, tmp_path / "input.parquet")
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert not run_until(command(sample, clean), clean, lambda out: False)
    killed = []
    for name, condition in KILL_POINTS:
        if run_until(command(sample, resumed), resumed, condition):
            killed.append(name)
    assert not run_until(command(sample, resumed), resumed, lambda out: False)
    log.info("killed at %d of %d points: %s", len(killed), len(KILL_POINTS), killed)
    assert len(killed) >= 7, f"only {killed} interrupted a run"
    expected, got = snapshot(clean), snapshot(resumed)
    assert sorted(got) == sorted(expected)
    different = [name for name in expected if expected[name] != got[name]]
    assert not different, f"differ after {killed}: {different}"
    assert json.loads((resumed / "stats.json").read_text())["input_rows"] == ROWS
    leftovers = [p for p in resumed.rglob("*") if p.name.endswith(".tmp") or "shard-buckets" in str(p)]
    assert not leftovers


def test_retry_failed_refetches_only_transient_failures(tmp_path: Path, server: ImageServer) -> None:
    flaky = serve(server, "/flaky.jpg", Response(b"busy", status=503))
    rows = [row(serve(server, "/fine.jpg", Response(jpeg(1))), "fine"), row(flaky, "flaky"),
            row(serve(server, "/gone.jpg", Response(b"no", status=404)), "gone"),
            row(serve(server, "/late.jpg", Response(jpeg(2), delay=5)), "late")]
    first = run_rows(tmp_path, rows, timeout=0.5)
    assert outcomes(first, rows) == {0: "kept", 1: "http_error", 2: "http_error", 3: "timeout"}
    server.routes["/flaky.jpg"] = Response(jpeg(3))
    server.routes["/late.jpg"] = Response(jpeg(4))
    server.routes["/gone.jpg"] = Response(jpeg(5))  # a 404 is final: not asked again
    stats = retry_failed(first["out"], hostile_config(timeout=0.5))
    ledger = pq.read_table(first["out"] / "ledger.parquet").to_pylist()
    assert stats["kept"] == 3 and [(r["row"], r["reason"]) for r in ledger] == [(2, "http_error")]
    assert stats["input_rows"] == stats["kept"] + stats["dropped"]
