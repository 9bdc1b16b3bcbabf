"""`curate run` on a corpus served from 127.0.0.1, read back with webdataset's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from typer.testing import CliRunner

from curate.cli import app
from curate.pipeline.run import rerun_stage, run_local
from curate.wds.verify import verify


def _shards(out: Path) -> list[Path]:
    index = json.loads((out / "shards" / "index.json").read_text())
    return [out / "shards" / entry["url"] for entry in index["shardlist"]]


def _read_back(out: Path) -> list[dict]:
    dataset = wds.WebDataset([str(p) for p in _shards(out)], shardshuffle=False)
    return list(dataset)


@pytest.fixture
def finished_run(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(100)
    out = tmp_path / "out"
    stats = run_local([str(corpus.path)], out, config_factory())
    return corpus, out, stats


def test_kept_set_is_exactly_what_the_rules_say(finished_run):
    corpus, out, stats = finished_run
    samples = _read_back(out)
    keys = [s["__key__"] for s in samples]
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    remainder = {r["key"] for r in ledger if r["reason"] == "shard_remainder"}
    assert len(keys) == len(set(keys))
    assert set(keys) | remainder == corpus.expected_kept
    assert not set(keys) & remainder
    reasons = {r["row"]: r["reason"] for r in ledger if r["reason"] != "shard_remainder"}
    assert reasons == corpus.expected_reason
    duplicate = next(r for r in ledger if r["reason"] == "duplicate_exact")
    assert duplicate["detail"] in set(keys) | remainder  # the survivor is kept (or fell in the shard remainder)
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and sample["txt"].decode() == meta["caption"]
        assert min(meta["original_width"], meta["original_height"]) >= 256 and meta["aesthetic_score"] >= 5.0
        assert meta["watermark_prob"] <= 0.8 and meta["scores_source"] == "metadata"
        assert max(meta["width"], meta["height"]) <= max(meta["original_width"], meta["original_height"])
        assert sample["jpg"][:2] == b"\xff\xd8"
    assert stats["input_rows"] == len(corpus.rows) == stats["kept"] + stats["dropped"]


def test_shards_are_equal_and_a_multiple_of_the_readers(finished_run):
    _, out, stats = finished_run
    index = json.loads((out / "shards" / "index.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert len(index["shardlist"]) % (4 * 2) == 0
    assert len({e["nsamples"] for e in index["shardlist"]}) == 1
    assert sum(e["nsamples"] for e in index["shardlist"]) == stats["kept"]
    assert verify(out) == []


def test_every_rank_and_worker_reads_the_same_number_once(finished_run):
    """webdataset's split_by_node / split_by_worker semantics: rank r takes shards[r::R], worker w [w::W]."""
    _, out, _ = finished_run
    shards, world, workers = _shards(out), 4, 2
    seen, per_worker = [], []
    for rank in range(world):
        for worker in range(workers):
            mine = shards[rank::world][worker::workers]
            samples = [s["__key__"] for s in wds.WebDataset([str(p) for p in mine], shardshuffle=False)]
            per_worker.append(len(samples))
            seen += samples
    assert len(set(per_worker)) == 1
    assert sorted(seen) == sorted(set(seen)) and len(seen) == sum(per_worker)


def test_256_ranks_by_8_workers_split_evenly():
    from curate.stages.shard import plan_shards

    plan = plan_shards(3_000_000, 3_000_000 * 500_000, 256, 8, 1 << 30)
    shard_ids = list(range(plan.num_shards))
    counts = []
    covered = 0
    for rank in range(256):
        for worker in range(8):
            mine = shard_ids[rank::256][worker::8]
            counts.append(len(mine) * plan.samples_per_shard)
            covered += len(mine)
    assert len(set(counts)) == 1 and covered == plan.num_shards


def test_same_seed_gives_byte_identical_tars(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(60)
    first, second = tmp_path / "a", tmp_path / "b"
    run_local([str(corpus.path)], first, config_factory())
    run_local([str(corpus.path)], second, config_factory())
    assert [p.read_bytes() for p in _shards(first)] == [p.read_bytes() for p in _shards(second)]
    third = tmp_path / "c"
    run_local([str(corpus.path)], third, config_factory(seed=1))
    assert [p.read_bytes() for p in _shards(first)] != [p.read_bytes() for p in _shards(third)]


def test_cli_run_then_recut_with_a_higher_threshold(tmp_path, corpus_factory):
    corpus = corpus_factory(60)
    out = tmp_path / "out"
    config = tmp_path / "curate.toml"
    config.write_text('world-size = 4\nworkers-per-rank = 1\nmin-size = 256\nimage-size = 256\nscores = "metadata"\n')
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(corpus.path), "--output", str(out), "--config", str(config),
                                 "--allow-private-network", "--threshold", "5.0"])
    assert result.exit_code == 0, result.output
    before = json.loads((out / "stats.json").read_text())
    assert before["config"]["world_size"] == 4 and before["config"]["threshold"] == 5.0
    result = runner.invoke(app, ["select", str(out), "--threshold", "6.0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["shard", str(out)])
    assert result.exit_code == 0, result.output
    after = json.loads((out / "stats.json").read_text())
    assert after["input_rows"] == before["input_rows"] == after["kept"] + after["dropped"]
    assert 0 < after["kept"] < before["kept"]
    assert after["dropped_by_stage"]["select"]["low_aesthetic"] > 0
    assert all(json.loads(s["json"])["aesthetic_score"] >= 6.0 for s in _read_back(out))
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0


def test_verify_catches_a_damaged_shard(finished_run):
    _, out, _ = finished_run
    shard = _shards(out)[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(out)
    assert any("sha256" in p for p in problems)
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 1


def test_missing_scores_fail_before_any_download(tmp_path, server, config_factory):
    import pyarrow as pa

    path = tmp_path / "no-scores.parquet"
    pq.write_table(pa.table({"url": [server.url("/a.jpg")], "caption": ["a"]}), path)
    with pytest.raises(ValueError, match="no-scores.parquet: no AESTHETIC_SCORE.*--scores metadata needs"):
        run_local([str(path)], tmp_path / "out", config_factory())
    assert not (tmp_path / "out" / "stages").exists()  # refused before any work


def test_too_few_survivors_is_a_clear_error(tmp_path, corpus_factory, config_factory):
    """After select nothing can be checked earlier: the shard plan names the options that fit and the re-cut."""
    corpus = corpus_factory(20)
    out = tmp_path / "out"
    stats = run_local([str(corpus.path)], out, config_factory(world_size=2, workers_per_rank=1))
    with pytest.raises(ValueError, match=r"samples survived.*e\.g\. --world-size 4 --workers-per-rank.*curate shard"):
        rerun_stage("shard", out, config_factory(world_size=4, workers_per_rank=stats["kept"]))


def test_parts_and_processes_do_not_change_the_output(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(60)
    one, many = tmp_path / "one", tmp_path / "many"
    run_local([str(corpus.path)], one, config_factory())
    run_local([str(corpus.path)], many, config_factory(processes=2, batch_size_rows=16))
    assert len(list((many / "stages" / "download").glob("part-*.parquet"))) > 1
    assert [p.read_bytes() for p in _shards(one)] == [p.read_bytes() for p in _shards(many)]
    assert pq.read_table(one / "ledger.parquet").equals(pq.read_table(many / "ledger.parquet"))


def test_too_few_survivors_still_leaves_the_ledger(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(20)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no sample was kept.*report"):
        run_local([str(corpus.path)], out, config_factory(threshold=11.0))
    reasons = set(pq.read_table(out / "ledger.parquet")["reason"].to_pylist())
    assert "metadata_low_aesthetic" in reasons
