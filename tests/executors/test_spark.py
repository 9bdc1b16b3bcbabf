"""The Spark engine against the local engine on one served sample: same samples, shards, ledger and tar bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.config import Config
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response
from curate.tools.demo import add_hostile_rows, generated_image, jpeg

ROOT = Path(__file__).resolve().parents[2]
OPTIONS: dict[str, Any] = {
    "scores": "metadata", "world_size": 4, "workers_per_rank": 1, "allow_private_network": True, "min_size": 64,
    "image_size": 96, "threads": 8, "batch_size_rows": 64, "target_shard_size": 40_000, "seed": 7, "max_unsafe": 0.5,
    "timeout": 5.0}


def sample_rows(rows: int, seed: int = 3) -> tuple[dict[str, Response], list[dict[str, Any]]]:
    """Small generated images; every tenth a re-encoded copy of the one before (a pHash near-duplicate)."""
    rng = np.random.default_rng(seed)
    routes: dict[str, Response] = {}
    table: list[dict[str, Any]] = []
    image = generated_image(rng, 80, 80)
    for i in range(rows):
        width, height = (int(rng.integers(48, 160)), int(rng.integers(48, 160))) if i else (120, 100)
        near = i % 10 == 9
        image = image if near else generated_image(rng, width, height)
        routes[f"/img/{i:05d}.jpg"] = Response(jpeg(image, quality=70 if near else 90))
        table.append({"URL": f"/img/{i:05d}.jpg", "TEXT": f"a photo of thing #{i}", "WIDTH": float(image.width),
                      "HEIGHT": float(image.height), "AESTHETIC_SCORE": float(rng.uniform(4.0, 7.5)),
                      "pwatermark": float(rng.beta(0.6, 2.0)), "punsafe": float(rng.beta(0.5, 8)),
                      "LANGUAGE": "en"})
    table[0].update(AESTHETIC_SCORE=6.5, pwatermark=0.1, punsafe=0.0)  # the hostile rows copy row 0's metadata
    add_hostile_rows(routes, table, rng)
    return routes, table


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The sample as two parquet files on a live 127.0.0.1 server, and the local engine's output over it."""
    folder = tmp_path_factory.mktemp("spark-sample")
    routes, rows = sample_rows(180)
    with ImageServer(routes) as server:
        served_rows = [dict(r, URL=server.url(r["URL"]) if r["URL"].startswith("/") else r["URL"]) for r in rows]
        (folder / "input").mkdir()
        half = len(served_rows) // 2
        pq.write_table(pa.Table.from_pylist(served_rows[:half]), folder / "input" / "part-a.parquet")
        pq.write_table(pa.Table.from_pylist(served_rows[half:]), folder / "input" / "part-b.parquet")
        inputs = [str(folder / "input")]
        config = Config(**OPTIONS).validate()
        stats = run_local(inputs, folder / "local", config)
        yield {"inputs": inputs, "folder": folder, "local": folder / "local", "config": config, "stats": stats}


def read_books(out: Path) -> dict[str, Any]:
    ledger = pq.read_table(out / "ledger.parquet").sort_by("row")
    samples = pq.read_table(out / "samples.parquet").sort_by("key")
    tars = {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}
    return {"ledger": ledger.select(["row", "key", "stage", "reason", "detail"]).to_pylist(),
            "samples": samples.select(["key", "shard", "position", "row"]).to_pylist(),
            "index": json.loads((out / "shards" / "index.json").read_text()), "tars": tars,
            "sizes": json.loads((out / "shards" / "sizes.json").read_text())}


def assert_same_dataset(local: Path, spark_out: Path) -> None:
    expected, got = read_books(local), read_books(spark_out)
    assert got["samples"] == expected["samples"]
    assert got["ledger"] == expected["ledger"]
    assert got["index"] == expected["index"]
    assert got["sizes"] == expected["sizes"] == {e["url"]: e["nsamples"] for e in expected["index"]["shardlist"]}
    assert list(got["tars"]) == list(expected["tars"])
    for name, data in expected["tars"].items():
        assert got["tars"][name] == data, f"{name} differs"
    assert not list((spark_out / "shards").glob(".*.tmp"))


def test_spark_engine_builds_the_local_engines_dataset(spark: Any, served: dict[str, Any]) -> None:
    from curate.executors.spark.engine import run_spark

    out = served["folder"] / "spark"
    stats = run_spark(spark, served["inputs"], str(out), served["config"])
    local = served["stats"]
    assert stats["input_rows"] == local["input_rows"] == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    reasons = {r for stage in local["dropped_by_stage"].values() for r in stage}
    assert {"duplicate_url", "duplicate_exact", "duplicate_phash", "shard_remainder", "invalid_url"} <= reasons
    assert len(local["dropped_by_stage"]["download"]) >= 2
    assert local["shards"]["num_shards"] >= 8
    assert_same_dataset(served["local"], out)
    # one stats.json: the same keys, and the same values for all but the timings, versions and engine
    assert set(stats) == set(local) and stats["engine"] == "spark" and local["engine"] == "local"
    for name in ("kept", "dropped", "judged_by", "not_reconsidered", "funnel", "scores_source", "config", "shards"):
        same = (lambda d: {k: v for k, v in d.items() if k != "seconds"}) if name == "shards" else (lambda d: d)
        assert same(stats[name]) == same(local[name]), name
    assert {k: v for k, v in stats["dedup"].items() if k != "seconds"} == {
        k: v for k, v in local["dedup"].items() if k != "seconds"}
    from curate.wds.verify import verify

    assert (out / "report.html").stat().st_size > 10_000 and verify(out) == []  # one report, one verify
    # A re-cut with another seed resumes after the download checkpoint and still matches the local engine.
    reseeded = Config(**{**OPTIONS, "seed": 8}).validate()
    run_local(served["inputs"], served["folder"] / "local-seed-8", reseeded)
    assert run_spark(spark, served["inputs"], str(out), reseeded)["timings"].get("download") is None
    assert_same_dataset(served["folder"] / "local-seed-8", out)
    # A lower threshold on a resume: both engines say how many rows prefilter dropped that it would keep.
    lower = Config(**{**OPTIONS, "seed": 8, "threshold": 4.5}).validate()
    local_lower = run_local(served["inputs"], served["folder"] / "local-seed-8", lower)
    spark_lower = run_spark(spark, served["inputs"], str(out), lower)
    assert local_lower["not_reconsidered"].get("metadata_low_aesthetic", 0) > 0
    assert spark_lower["not_reconsidered"] == local_lower["not_reconsidered"]
    assert spark_lower["judged_by"] == local_lower["judged_by"]
    assert spark_lower["judged_by"]["prefilter"]["aesthetic_threshold"] == 5.0  # the run that downloaded
    assert_same_dataset(served["folder"] / "local-seed-8", out)


def test_a_spark_run_that_keeps_nothing_writes_the_local_engines_books(spark: Any, served: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    """None kept is a result on both engines (one shard plan rule): books and report that say why, then the error."""
    from curate.executors.spark.engine import run_spark
    from curate.pipeline.accounting import NothingKept

    config = Config(**{**OPTIONS, "threshold": 9.9}).validate()
    with pytest.raises(NothingKept):
        run_local(served["inputs"], tmp_path / "local", config)
    with pytest.raises(NothingKept, match="report.html"):
        run_spark(spark, served["inputs"], str(tmp_path / "spark"), config)
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")
    stats = json.loads((tmp_path / "spark" / "stats.json").read_text())
    assert stats["kept"] == 0 and stats["dropped"] == stats["input_rows"] > 0
    assert (tmp_path / "spark" / "report.html").exists()


def mixed_release_files(folder: Path, server: ImageServer, rows: int = 24) -> None:
    """Two LAION files as releases spell them: A with int64 sizes and float64 scores; B (laion2B-en-aesthetic) with
    int32 sizes, float32 scores and a hash column. B also repeats A's first row and holds one URL that is gone."""
    rng = np.random.default_rng(11)
    records: list[dict[str, Any]] = []
    for i in range(rows):
        width, height = int(rng.integers(48, 140)), int(rng.integers(48, 140))
        server.routes[f"/mixed/{i}.jpg"] = Response(jpeg(generated_image(rng, width, height)))
        records.append({"url": server.url(f"/mixed/{i}.jpg"), "caption": f"a mixed photo #{i}", "width": width,
                        "height": height, "aesthetic": float(rng.uniform(4.0, 7.5)),
                        "pwatermark": float(rng.beta(0.6, 2.0))})
    gone = {"url": server.url("/mixed/gone.jpg"), "caption": "gone", "width": 120, "height": 90, "aesthetic": 6.0,
            "pwatermark": 0.1}
    records += [dict(records[0]), gone]
    a, b = records[:rows // 2], records[rows // 2:]

    def column(part: list[dict[str, Any]], name: str, kind: pa.DataType) -> pa.Array:
        return pa.array([r[name] for r in part], kind)

    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "URL": column(a, "url", pa.string()), "TEXT": column(a, "caption", pa.string()),
        "WIDTH": column(a, "width", pa.int64()), "HEIGHT": column(a, "height", pa.int64()),
        "AESTHETIC_SCORE": column(a, "aesthetic", pa.float64()), "pwatermark": column(a, "pwatermark", pa.float64()),
    }), folder / "part-a.parquet")
    pq.write_table(pa.table({
        "url": column(b, "url", pa.string()), "caption": column(b, "caption", pa.string()),
        "width": column(b, "width", pa.int32()), "height": column(b, "height", pa.int32()),
        "aesthetic": column(b, "aesthetic", pa.float32()), "pwatermark": column(b, "pwatermark", pa.float32()),
        "hash": pa.array([mmh3.hash64(r["url"] + r["caption"])[0] for r in b], pa.int64()),
    }), folder / "part-b.parquet")


def tar_documents(out: Path) -> list[dict[str, Any]]:
    documents = []
    for path in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            documents += [json.load(tar.extractfile(m)) for m in tar if m.name.endswith(".json")]  # type: ignore[arg-type]
    return documents


def test_spark_engine_reads_files_whose_types_and_spellings_differ(spark: Any, tmp_path: Path) -> None:
    """Each file is read with its own schema, then the canonical one: same rows, samples and tar bytes as local."""
    from curate.executors.spark.engine import run_spark

    config = Config(**{**OPTIONS, "world_size": 2}).validate()
    with ImageServer() as server:
        mixed_release_files(tmp_path / "input", server)
        inputs = [str(tmp_path / "input")]
        local = run_local(inputs, tmp_path / "local", config)
        stats = run_spark(spark, inputs, str(tmp_path / "spark"), config)
    assert stats["input_rows"] == local["input_rows"] == 26
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    reasons = {r for stage in local["dropped_by_stage"].values() for r in stage}
    assert {"duplicate_url", "metadata_low_resolution"} <= reasons and len(local["dropped_by_stage"]["download"]) == 1
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")
    hashes = [d["metadata"]["hash"] for d in tar_documents(tmp_path / "spark")]
    assert None in hashes and any(h is not None for h in hashes)  # only file B has a hash column


def test_spark_ingest_reads_numbers_and_strings_of_one_column_as_the_local_ingest(spark: Any, tmp_path: Path) -> None:
    """A size given as text in one file and as int32 in the other, a float32 score against a text one: the rows
    Spark ingests equal the local ingest's, file by file."""
    from curate.executors.spark.engine import _ingest, read_input
    from curate.executors.spark.frames import map_stage
    from curate.stages.ingest import normalize

    files = [pa.table({"URL": ["http://a/1", "http://a/2"], "TEXT": ["one", None], "WIDTH": ["120", "wide"],
                       "AESTHETIC_SCORE": pa.array([5.1, 6.3], pa.float32()), "LANGUAGE": ["en", "de"]}),
             pa.table({"url": ["http://b/1"], "caption": ["three"],
                       "width": pa.array([77], pa.int32()), "aesthetic": ["4.25"], "hash": pa.array([-5], pa.int64())}),
             pa.table({"URL": ["http://c/1", "http://c/2", "http://c/3"],  # captions that are no UTF-8, as bytes
                       "TEXT": pa.array([b"caf\xe9 cr\xe8me", b"\xff\xd8\xff\xe0\x00\x10JFIF", "一只黑猫".encode()],
                                        pa.binary())})]
    (tmp_path / "in").mkdir()
    for index, table in enumerate(files):
        pq.write_table(table, tmp_path / "in" / f"part-{index}.parquet")
    local = pa.concat_tables([normalize(files[0], 0), normalize(files[1], 2), normalize(files[2], 3)],
                             promote_options="permissive")
    assert local["caption_repair"].to_pylist()[3:] == ["cp1252", "undecodable", None]
    raw, rows = read_input(spark, [str(tmp_path / "in")])
    got = map_stage(raw, _ingest).toArrow().sort_by("row")
    assert rows == 6
    assert got.select(local.column_names).to_pylist() == local.to_pylist()


def test_spark_input_errors_name_the_file(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import read_input

    (tmp_path / "notes.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="notes.parquet.*not a readable parquet file"):
        read_input(spark, [str(tmp_path / "notes.parquet")])
    pq.write_table(pa.table({"TEXT": ["a caption"]}), tmp_path / "no-url.parquet")
    with pytest.raises(ValueError, match="no-url.parquet.*no URL column"):
        read_input(spark, [str(tmp_path / "no-url.parquet")])


def embedding_table(rows: int, width: int = 16, seed: int = 5) -> pa.Table:
    """Unit-ish vectors around a few centers, a third of them near-copies of an earlier row."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(4, width))
    vectors = centers[rng.integers(0, 4, rows)] + rng.normal(scale=0.6, size=(rows, width))
    copies = rng.random(rows) < 0.3
    sources = rng.integers(0, rows, rows)
    vectors[copies] = vectors[sources[copies]] + rng.normal(scale=0.02, size=(int(copies.sum()), width))
    flat = pa.array(vectors.astype(np.float16).reshape(-1))
    return pa.table({"key": [f"{i:016x}" for i in range(rows)], "row": pa.array(range(rows), pa.int64()),
                     "embedding": pa.FixedSizeListArray.from_arrays(flat, width),
                     "aesthetic_score": pa.array(rng.uniform(4, 7, rows).round(1), pa.float32()),
                     "original_width": pa.array(rng.integers(64, 99, rows), pa.int32()),
                     "original_height": pa.array(np.full(rows, 64), pa.int32()),
                     "passes_thresholds": pa.array(rng.random(rows) < 0.8),  # the survivor rule's first key
                     "drop_stage": pa.nulls(rows, pa.string()), "drop_reason": pa.nulls(rows, pa.string()),
                     "drop_detail": pa.nulls(rows, pa.string())})


def test_semantic_dedup_on_spark_flags_what_the_local_stage_flags(spark: Any, tmp_path: Path) -> None:
    """k-means on a sampled subset (600 rows > 2 clusters x 256), boundary visitors, per-cluster search."""
    from curate.executors.spark.dedup import semantic_flags
    from curate.stages.semantic import flag_semantic_duplicates

    table = embedding_table(600)
    local = flag_semantic_duplicates(table, 0.97, clusters=2, seed=1)
    expected = {r["row"]: r["drop_detail"] for r in local.filter(pc.is_valid(local["drop_reason"])).to_pylist()}
    as_lists = table.set_column(2, "embedding", table["embedding"].cast(pa.list_(pa.float32())))
    flags = semantic_flags(spark, spark.createDataFrame(as_lists), 0.97, 2, 1, str(tmp_path / "sample"))
    assert flags is not None and len(expected) > 20
    got = {r["row"]: r["drop_detail"] for r in flags.collect()}
    assert got == expected
    assert {r["drop_reason"] for r in flags.collect()} == {"duplicate_semantic"}


def job_flags(options: dict[str, Any]) -> list[str]:
    flags: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def test_spark_submit_job_survives_a_failed_shard_writer(served: dict[str, Any]) -> None:
    """spark-submit, local[2,2] (one retry per task): the first shard writer dies mid-tar, its retry finishes it."""
    out, markers = served["folder"] / "submitted", served["folder"] / "markers"
    markers.mkdir()
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable,
               CURATE_SPARK_FAIL_SHARD_ONCE=str(markers))
    command = [str(Path(sys.executable).parent / "spark-submit"), "--master", "local[2,2]",
               "--conf", "spark.sql.shuffle.partitions=2", "--conf", "spark.ui.enabled=false",
               str(ROOT / "jobs" / "aesthetics_filter.py"), "--input", *served["inputs"], "--output", str(out),
               *job_flags(OPTIONS)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (markers / "failed-once").exists()
    assert_same_dataset(served["local"], out)


def test_spark_components_are_the_local_union_find(spark: Any, tmp_path: Path) -> None:
    """Min-label rounds over DataFrames label each hash with its component's smallest hash, as the local union-find
    (dedup.hash_components) does: long chains, stars and pairs, nothing collected but the count of changes."""
    import numpy as np
    import pyarrow as pa

    from curate.executors.spark.components import connected_components
    from curate.stages import dedup

    rng = np.random.default_rng(2)
    chain = np.arange(0, 300, dtype=np.int64)  # a path of 300 nodes, in shuffled order
    left = np.concatenate([chain[:-1], np.full(40, 1000), rng.integers(2000, 2400, size=200)])
    right = np.concatenate([chain[1:], np.arange(1001, 1041), rng.integers(2000, 2400, size=200)])
    shuffled = rng.permutation(len(left))
    edges = spark.createDataFrame(pa.table({"left": left[shuffled], "right": right[shuffled]}))
    found = connected_components(spark, edges, str(tmp_path / "cc")).toArrow().sort_by("node")
    named, components = dedup.hash_components(left, right)
    assert found["node"].to_numpy().tolist() == named.tolist()
    assert found["component"].to_numpy().tolist() == components.tolist()
    assert len(set(components.tolist())) > 3
