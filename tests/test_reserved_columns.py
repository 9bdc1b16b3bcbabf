"""Input columns named like curate's own are carried through under source_NAME; they never crash a run."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.pipeline.run import run_local
from curate.stages.ingest import SOURCE_PREFIX, canonical_names, reserved_columns
from curate.testing.server import Response
from tests.conftest import make_jpeg


def test_every_column_the_schema_files_add_is_reserved() -> None:
    for name in ("position", "shard", "jpg", "jpg_bytes", "download_bytes", "scores_source", "sha256", "phash",
                 "status", "key", "row", "drop_reason", "watermark_prob", "embedding"):
        assert name in reserved_columns(), name
    assert not {"url", "caption", "aesthetic_score"} & reserved_columns()  # LAION spellings keep their meaning


def test_two_spellings_of_one_column_are_refused_naming_both() -> None:
    with pytest.raises(ValueError, match="'URL' and 'url' both mean 'url'"):
        canonical_names(["URL", "url", "TEXT"])
    with pytest.raises(ValueError, match="'position' and 'source_position'"):
        canonical_names(["url", "position", "source_position"])


def test_a_corpus_with_every_reserved_name_runs_and_carries_them(tmp_path, server, config_factory) -> None:
    reserved = sorted(reserved_columns())
    rows = []
    for i in range(6):
        server.routes[f"/r{i}.jpg"] = Response(make_jpeg(300, 300, 700 + i))
        row = {"URL": server.url(f"/r{i}.jpg"), "TEXT": f"reserved {i}", "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1}
        row.update({name: f"input {name} {i}" for name in reserved})
        row["download_bytes"] = 123
        rows.append(row)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "out"
    stats = run_local([str(tmp_path / "in.parquet")], out, config_factory(world_size=2, workers_per_rank=1))
    assert stats["kept"] + stats["dropped"] == 6 and stats["kept"] >= 4
    samples = pq.read_table(out / "samples.parquet")
    for name in reserved:
        assert f"{SOURCE_PREFIX}{name}" in samples.column_names, name
    assert set(samples[f"{SOURCE_PREFIX}download_bytes"].to_pylist()) == {123}
    with tarfile.open(next((out / "shards").glob("*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        sample = json.load(io.BytesIO(tar.extractfile(member).read()))
    carried = sample["metadata"]
    assert all(carried[f"{SOURCE_PREFIX}{name}"] is not None for name in reserved if name != "download_bytes")
    assert carried["source_position"].startswith("input position") and carried["source_download_bytes"] == 123
    assert carried["download_bytes"] in {len(server.routes[f"/r{i}.jpg"].body) for i in range(6)}  # measured

