"""`curate run --output s3://…` against moto's S3 server on 127.0.0.1: verify, report, a re-cut, webdataset reading
the tars through fsspec, tars byte-identical to a local run's, and a run killed mid-download resuming on S3."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import fsspec
import pytest
import webdataset as wds
from typer.testing import CliRunner

from curate.cli import app
from curate.storage import files as storage
from curate.wds.verify import verify

OPTIONS = ["--scores", "metadata", "--world-size", "4", "--workers-per-rank", "1", "--min-size", "256",
           "--image-size", "256", "--allow-private-network", "--threshold", "5.0"]


def shard_bytes(out: storage.Location) -> dict[str, bytes]:
    index = json.loads((out / "shards" / "index.json").read_text())
    return {entry["url"]: (out / "shards" / entry["url"]).read_bytes() for entry in index["shardlist"]}


def read_with_webdataset(out: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """webdataset's own reader, opening s3:// URLs through fsspec (as a training job would with s3fs)."""
    schemes = importlib.import_module("webdataset.gopen").gopen_schemes  # the package exports a function gopen
    monkeypatch.setitem(schemes, "s3", lambda url, mode="rb", bufsize=8192, **kw: fsspec.open(
        url, mode).open())
    index = json.loads(storage.read_bytes(f"{out}/shards/index.json"))
    return list(wds.WebDataset([f"{out}/shards/{e['url']}" for e in index["shardlist"]], shardshuffle=False))


def objects(url: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return [p[len(path) + 1:] for p in fs.find(path)]


def test_run_verify_report_and_recut_on_s3(tmp_path: Path, corpus_factory, s3_bucket: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = corpus_factory(60)
    url, local = f"s3://{s3_bucket}/out", tmp_path / "local"
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # a Path-mangled URL would show up here as a local "s3:" folder
    result = runner.invoke(app, ["run", str(corpus.path), "--output", url, *OPTIONS])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "s3:").exists()
    assert runner.invoke(app, ["run", str(corpus.path), "--output", str(local), *OPTIONS]).exit_code == 0

    remote = storage.location(url)
    assert isinstance(remote, storage.RemotePath)
    assert shard_bytes(remote) == shard_bytes(local) != {}
    assert (remote / "ledger.parquet").read_bytes() == (local / "ledger.parquet").read_bytes()
    written = objects(url)
    assert {"stats.json", "samples.parquet", "report.html", "shards/sizes.json", "stages/run.json",
            "stages/download/_SUCCESS"} <= set(written)
    assert not [name for name in written if name.endswith(".tmp") or "buckets" in name or "-work" in name]
    assert "curate report" in (remote / "report.html").read_text()

    samples = read_with_webdataset(url, monkeypatch)
    assert len(samples) == json.loads((remote / "stats.json").read_text())["kept"] > 0
    assert {s["__key__"] for s in samples} <= corpus.expected_kept
    assert verify(url) == []
    assert runner.invoke(app, ["verify", url]).exit_code == 0
    assert runner.invoke(app, ["report", url]).exit_code == 0

    before = json.loads((remote / "stats.json").read_text())
    result = runner.invoke(app, ["select", url, "--threshold", "6.0"])
    assert result.exit_code == 0, result.output
    assert "stale" in " ".join(verify(url))  # select re-cut, the shards not yet rewritten
    result = runner.invoke(app, ["shard", url])
    assert result.exit_code == 0, result.output
    after = json.loads((remote / "stats.json").read_text())
    assert after["input_rows"] == before["input_rows"] == after["kept"] + after["dropped"]
    assert 0 < after["kept"] < before["kept"]
    assert all(json.loads(s["json"])["aesthetic_score"] >= 6.0 for s in read_with_webdataset(url, monkeypatch))
    assert verify(url) == []


def test_a_write_that_fails_leaves_no_object(s3_bucket: str) -> None:
    target = storage.location(f"s3://{s3_bucket}/half.bin")
    with pytest.raises(RuntimeError), storage.open_write(target) as handle:
        handle.write(b"x" * (6 << 20))  # past s3fs's 5 MiB block: a multipart upload is under way
        raise RuntimeError("killed mid-write")
    assert not target.exists()
    storage.write_json({"a": 1}, target)
    assert storage.read_json(target) == {"a": 1}
    assert objects(f"s3://{s3_bucket}") == ["half.bin"]


def test_local_writes_go_through_a_temporary_name(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.bin"
    with pytest.raises(RuntimeError), storage.open_write(target) as handle:
        handle.write(b"half")
        raise RuntimeError("killed mid-write")
    assert not target.exists() and list((tmp_path / "deep").iterdir()) == []
    with storage.open_write(target) as handle:
        handle.write(b"whole")
        assert [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]  # not at its name yet
        assert not target.exists()
    assert target.read_bytes() == b"whole"


def test_unreachable_bucket_is_a_clear_error(tmp_path: Path, corpus_factory, s3_endpoint: str) -> None:
    corpus = corpus_factory(20)
    result = CliRunner().invoke(app, ["run", str(corpus.path), "--output", "s3://no-such-bucket/out", *OPTIONS])
    assert result.exit_code == 2
    assert "error" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_run_killed_mid_download_resumes_on_s3(tmp_path: Path, corpus_factory, server, s3_bucket: str) -> None:
    corpus = corpus_factory(60)
    for path, response in list(server.routes.items()):  # slow enough to be killed mid-download
        server.routes[path] = replace(response, delay=0.05)
    url, local = f"s3://{s3_bucket}/resumed", tmp_path / "clean"
    options = [*OPTIONS, "--batch-size-rows", "6", "--threads", "2"]  # 12 parts, fetched slowly
    assert CliRunner().invoke(app, ["run", str(corpus.path), "--output", str(local), *options]).exit_code == 0
    command = [str(Path(sys.executable).parent / "curate"), "run", str(corpus.path), "--output", url, *options]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    started, killed = time.monotonic(), False
    while process.poll() is None and time.monotonic() - started < 120:
        if sum(name.startswith("stages/download/part-") for name in objects(url)) >= 2:
            process.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    process.wait()
    assert killed, process.stderr.read().decode()[-2000:] if process.stderr else ""
    assert not storage.exists(f"{url}/stats.json")
    finished = subprocess.run(command, capture_output=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr.decode()[-3000:]
    remote = storage.location(url)
    assert shard_bytes(remote) == shard_bytes(local)
    assert (remote / "samples.parquet").read_bytes() == (local / "samples.parquet").read_bytes()
    assert verify(url) == []
