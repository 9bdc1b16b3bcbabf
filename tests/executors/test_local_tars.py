"""The local engine's tars, laid out at offsets and filled from the download parts (curate.wds.placed), are the bytes
of writing every sample's members in position order (stages.shard.sample_bytes, then tar_end), as the Spark engine's
TarSink does; index.json hashes what is on disk, and webdataset reads every sample back."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import webdataset as wds

from curate.executors.local.engine import LocalRun
from curate.pipeline.run import rerun_stage, run_local
from curate.schema import CAPTION, JPG, KEY, POSITION, ROW, SHARD
from curate.stages import shard as shard_stage
from curate.stages.buckets import BUCKET_HEIGHT, BUCKET_WIDTH, CROP_LEFT, CROP_TOP, SMALLER_THAN_BUCKET
from curate.stages.download import JPG_BYTES
from curate.storage import files as storage
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


def _download_part(rows: range, with_lengths: bool, lie: bool = False) -> pa.Table:
    images = [bytes([row % 251]) * (700 + 97 * row) for row in rows]  # lengths that cross 512-byte blocks
    columns = {KEY: [f"{row:016x}" for row in rows], ROW: list(rows), "url": [f"http://x/{row}" for row in rows],
               CAPTION: [f"caption {row} é" for row in rows], "original_width": [300] * len(rows),
               "original_height": [200] * len(rows), "stored_width": [300] * len(rows),
               "stored_height": [200] * len(rows), "sha256": [f"{row:064x}" for row in rows],
               CROP_TOP: [0] * len(rows), CROP_LEFT: [0] * len(rows), "width": list(rows), JPG: images}
    if with_lengths:
        columns[JPG_BYTES] = [len(image) + (1 if lie else 0) for image in images]
    return pa.table(columns)


def _placement(rows: list[int], shards: int) -> pa.Table:
    positions = [(row * 7) % len(rows) for row in range(len(rows))]  # shuffled, each position once
    return pa.table({ROW: rows, SHARD: [p % shards for p in positions], POSITION: positions,
                     "aesthetic_score": [5.5] * len(rows), "watermark_prob": [0.1] * len(rows),
                     "scores_source": ["metadata"] * len(rows), BUCKET_WIDTH: [256] * len(rows),
                     BUCKET_HEIGHT: [256] * len(rows), SMALLER_THAN_BUCKET: [False] * len(rows)})


def _write(tmp_path, parts: list[pa.Table], assignment: pa.Table, shards: int) -> list[dict]:
    paths = []
    for index, part in enumerate(parts):
        paths.append(tmp_path / f"download-{index}.parquet")
        storage.write_table(part, paths[-1])  # the checkpoint's layout: plain images in row groups
    buckets, out = tmp_path / "buckets", tmp_path / "shards"
    out.mkdir()
    for index, path in enumerate(paths):
        placed.record(placed.metadata_groups(path), index, assignment, buckets, ["width"])
    return placed.write_tars(buckets, paths, shards, lambda n: out / shard_stage.shard_name("s", n), 2)


def test_placed_tars_from_parts_with_and_without_stored_lengths(tmp_path) -> None:
    parts = [_download_part(range(0, 13), True), _download_part(range(13, 30), False)]  # an old part: no jpg_bytes
    assignment = _placement(list(range(30)), 3)
    entries = _write(tmp_path, parts, assignment, 3)
    rows = {row[ROW]: row for part in parts for row in part.to_pylist()}
    for number, entry in enumerate(entries):
        placed_here = sorted((p for p in assignment.to_pylist() if p[SHARD] == number), key=lambda p: p[POSITION])
        body = b"".join(shard_stage.sample_bytes(rows[p[ROW]][KEY], rows[p[ROW]][JPG], rows[p[ROW]][CAPTION],
                                                 sample_document({**rows[p[ROW]], **p}, ["width"]))
                        for p in placed_here)
        data = (tmp_path / "shards" / entry["url"]).read_bytes()
        assert data == body + shard_stage.tar_end(len(body))
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["nsamples"] == len(placed_here)


def test_an_image_whose_stored_length_is_wrong_fails_and_leaves_no_tar(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="jpg_bytes says"):
        _write(tmp_path, [_download_part(range(0, 6), True, lie=True)], _placement(list(range(6)), 2), 2)
    assert not list((tmp_path / "shards").iterdir())
