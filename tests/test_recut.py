"""Re-cuts that cannot lie, settings that stick, plans checked before the download, and runs that keep nothing."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.cli import app
from curate.pipeline.accounting import NothingKept
from curate.pipeline.run import TooFewRows, load_run_config, rerun_stage, run_local
from curate.stages.ingest import key_of
from curate.testing.server import ImageServer, Response
from tests.conftest import make_jpeg


def _jpeg_resized(body: bytes, width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(body)).resize((width, height), Image.Resampling.LANCZOS).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_a_recut_below_the_metadata_threshold_says_what_it_cannot_bring_back(tmp_path, corpus_factory,
                                                                              config_factory, caplog):
    corpus = corpus_factory(60)
    out = tmp_path / "out"
    run_local([str(corpus.path)], out, config_factory(threshold=5.0))
    cannot = sum(1 for reason in corpus.expected_reason.values() if reason == "metadata_low_aesthetic")
    assert cannot > 0
    with caplog.at_level(logging.WARNING):
        rerun_stage("select", out, config_factory(threshold=4.0))
    assert f"{cannot} rows that these thresholds would keep" in caplog.text
    stats = rerun_stage("shard", out, load_run_config(out))
    assert stats is not None
    assert stats["not_reconsidered"] == {"metadata_low_aesthetic": cannot}
    assert stats["judged_by"]["prefilter"]["aesthetic_threshold"] == 5.0
    assert stats["judged_by"]["select"]["threshold"] == 4.0
    assert stats["input_rows"] == stats["kept"] + stats["dropped"]


def test_a_recut_above_the_metadata_threshold_reports_nothing_lost(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(60)
    out = tmp_path / "out"
    run_local([str(corpus.path)], out, config_factory(threshold=5.0))
    rerun_stage("select", out, config_factory(threshold=5.5))
    stats = rerun_stage("shard", out, load_run_config(out))
    assert stats is not None and stats["not_reconsidered"] == {}


def test_a_shard_recut_records_its_options_for_the_next_one(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(60)
    out = tmp_path / "out"
    run_local([str(corpus.path)], out, config_factory())
    runner = CliRunner()
    result = runner.invoke(app, ["shard", str(out), "--world-size", "1", "--workers-per-rank", "1"])
    assert result.exit_code == 0, result.output
    assert load_run_config(out).world_size == 1
    result = runner.invoke(app, ["shard", str(out), "--shard-name", "foo"])
    assert result.exit_code == 0, result.output
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["world_size"] == 1 and index["workers_per_rank"] == 1
    assert [Path(s["url"]).name for s in index["shardlist"]] == ["foo-000000.tar"]


def test_a_recut_resolves_duplicates_again_under_the_new_thresholds(tmp_path, config_factory):
    """A 600x450 copy claiming 1200x900 scores 7.0; the 1200x900 original 6.0; their pHashes match."""
    original = make_jpeg(1200, 900, seed=11)
    routes = {"/original.jpg": Response(original), "/copy.jpg": Response(_jpeg_resized(original, 600, 450))}
    with ImageServer(routes) as server:
        rows = [{"URL": server.url("/copy.jpg"), "TEXT": "a copy", "AESTHETIC_SCORE": 7.0},
                {"URL": server.url("/original.jpg"), "TEXT": "the original", "AESTHETIC_SCORE": 6.0}]
        for row in rows:
            row.update(WIDTH=1200.0, HEIGHT=900.0, pwatermark=0.1)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
        out = tmp_path / "out"
        config = config_factory(min_size=800, world_size=1, workers_per_rank=1, dedup=["phash"])
        stats = run_local([str(tmp_path / "in.parquet")], out, config)
    copy, kept = key_of(rows[0]["URL"], "a copy"), key_of(rows[1]["URL"], "the original")
    assert stats["kept"] == 1 and stats["dropped_by_stage"] == {"dedup": {"duplicate_phash": 1}}
    assert pq.read_table(out / "samples.parquet")["key"].to_pylist() == [kept]
    rerun_stage("select", out, config_factory(min_size=400, world_size=1, workers_per_rank=1, dedup=["phash"]))
    stats = rerun_stage("shard", out, load_run_config(out))
    assert stats is not None and stats["kept"] == 1
    assert pq.read_table(out / "samples.parquet")["key"].to_pylist() == [copy]  # both pass now: 7.0 wins


def test_too_few_rows_for_the_shard_plan_stop_before_any_download(tmp_path, server, corpus_factory, config_factory):
    corpus = corpus_factory(40)
    requests_before = len(server.requests)
    with pytest.raises(TooFewRows, match=r"after prefilter.*--world-size 256 x --workers-per-rank 8.*nothing was"):
        run_local([str(corpus.path)], tmp_path / "out", config_factory(world_size=256, workers_per_rank=8))
    assert len(server.requests) == requests_before
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(corpus.path), "--output", str(tmp_path / "cli"), "--allow-loopback",
                                 "--scores", "metadata", "--min-size", "256"])
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and "--world-size 256 x --workers-per-rank 8" in message, message
    early = ("invalid_url", "empty_caption", "duplicate_url")
    live = len(corpus.rows) - sum(reason.startswith("metadata_") or reason in early
                                  for reason in corpus.expected_reason.values())
    assert f"only {live} rows are left after prefilter" in message
    assert "e.g. --world-size 16 --workers-per-rank 1" in message
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(server.requests) == requests_before


def test_the_plan_advice_names_only_options_a_rerun_resumes_with(tmp_path, corpus_factory, config_factory):
    """The advice said "rerun with the new values and it resumes", but a rerun with another --dedup is refused."""
    import re

    corpus = corpus_factory(40)
    out = tmp_path / "out"
    with pytest.raises(TooFewRows) as stopped:
        run_local([str(corpus.path)], out, config_factory(world_size=256, workers_per_rank=8))
    named = re.search(r"changing only (.*?) and it resumes", str(stopped.value))
    assert named is not None, str(stopped.value)
    flags = {flag.strip()[2:].replace("-", "_") for flag in named.group(1).split(",")}
    assert {"world_size", "workers_per_rank", "threshold"} <= flags and "dedup" not in flags
    assert "--dedup" in str(stopped.value).split("and it resumes")[1]  # named as what needs another --output
    with pytest.raises(ValueError, match=r"other values of \['dedup'\]"):
        run_local([str(corpus.path)], out, config_factory(world_size=256, workers_per_rank=8, dedup=["exact"]))
    stats = run_local([str(corpus.path)], out, config_factory(world_size=4, workers_per_rank=1, threshold=4.5))
    assert stats["kept"] > 0  # the options it names resume the stopped run in the same output


def test_a_run_that_keeps_nothing_writes_its_books_and_report(tmp_path, server, corpus_factory, config_factory):
    corpus = corpus_factory(30)
    out = tmp_path / "out"
    with pytest.raises(NothingKept, match="report.html"):
        run_local([str(corpus.path)], out, config_factory(threshold=9.9))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["dropped"] == stats["input_rows"] == len(corpus.rows)
    assert pq.read_table(out / "ledger.parquet").num_rows == len(corpus.rows)
    assert (out / "report.html").exists()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
