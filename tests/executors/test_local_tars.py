"""The local engine's tars, laid out at offsets and filled from the download parts (curate.wds.placed), are the bytes
of writing every sample's members in position order (stages.shard.sample_bytes, then tar_end), as the Spark engine's
TarSink does; index.json hashes what is on disk, and webdataset reads every sample back."""

from __future__ import annotations

import hashlib
import json

import pyarrow.compute as pc
import webdataset as wds

from curate.executors.local.engine import LocalRun
from curate.pipeline.run import rerun_stage, run_local
from curate.schema import CAPTION, JPG, KEY, POSITION, ROW, SHARD
from curate.stages import shard as shard_stage
from curate.wds import placed
from curate.wds.writer import CARRIED_SKIP, PLACEMENT_COLUMNS, sample_document


def _reference_tars(out, config) -> dict[str, tuple[bytes, list[dict]]]:
    """Each tar written the sequential way, from the checkpoints: (bytes, its rows in position order) by name."""
    run = LocalRun(out, config)
    shard_table = run.checkpoint("shard").read()
    metadata_columns = [name for name in shard_table.column_names if name not in CARRIED_SKIP]
    assigned = shard_table.filter(pc.greater_equal(shard_table[SHARD], 0)).select(list(PLACEMENT_COLUMNS))
    downloaded = run.checkpoint("download").read()
    by_row = {row[ROW]: row for row in downloaded.drop_columns(
        [c for c in assigned.column_names if c != ROW and c in downloaded.column_names]).to_pylist()}
    shards: dict[int, list[dict]] = {}
    for placement in assigned.to_pylist():
        shards.setdefault(placement[SHARD], []).append({**by_row[placement[ROW]], **placement})
    tars = {}
    for number, rows in shards.items():
        rows.sort(key=lambda row: row[POSITION])
        body = b"".join(shard_stage.sample_bytes(row[KEY], row[JPG], row.get(CAPTION) or "",
                                                 sample_document(row, metadata_columns)) for row in rows)
        tars[shard_stage.shard_name(config.shard_name, number)] = (body + shard_stage.tar_end(len(body)), rows)
    return tars


def test_tars_are_the_sequential_writers_bytes_and_read_back(tmp_path, corpus_factory, config_factory, monkeypatch):
    corpus = corpus_factory(80)
    out = tmp_path / "out"
    config = config_factory(batch_size_rows=16, world_size=2, workers_per_rank=2)  # several download parts
    run_local([str(corpus.path)], out, config)
    expected = _reference_tars(out, config)
    index = json.loads((out / "shards" / "index.json").read_text())
    assert len(LocalRun(out, config).checkpoint("download").parts()) >= 4
    assert sorted(expected) == sorted(entry["url"] for entry in index["shardlist"]) and len(expected) >= 4

    for entry in index["shardlist"]:
        data, rows = expected[entry["url"]]
        written = (out / "shards" / entry["url"]).read_bytes()
        assert written == data
        assert entry["sha256"] == hashlib.sha256(written).hexdigest()
        assert entry["filesize"] == len(written) and entry["nsamples"] == len(rows)
        samples = list(wds.WebDataset(str(out / "shards" / entry["url"]), shardshuffle=False))
        assert [sample["__key__"] for sample in samples] == [row[KEY] for row in rows]
        assert [sample["jpg"] for sample in samples] == [row[JPG] for row in rows]
        assert [sample["txt"].decode() for sample in samples] == [row.get(CAPTION) or "" for row in rows]
        assert [json.loads(sample["json"])["sha256"] for sample in samples] == [row["sha256"] for row in rows]
    assert not list((out / "shards").glob(".*"))  # no temporary left beside the tars
    assert not (out / "stages" / "shard-buckets").exists()

    # One tar open at a time (the groups a run with more shards than open files takes): the same bytes.
    monkeypatch.setattr(placed, "FILES_PER_GROUP", 1)
    rerun_stage("shard", out, config)
    assert json.loads((out / "shards" / "index.json").read_text()) == index
    for name, (data, _) in expected.items():
        assert (out / "shards" / name).read_bytes() == data
