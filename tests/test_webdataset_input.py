"""Curate what is already downloaded: img2dataset's webdataset output (and plain tars) in, the same books out."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response
from tests.conftest import make_jpeg

ROWS = 40
RUN = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "min_size": 200, "image_size": 512,
       "dedup": ["url", "exact", "phash"]}


def _img2dataset(tmp_path: Path, server: ImageServer) -> tuple[Path, list[dict[str, Any]]]:
    """The real img2dataset downloads a LAION-style list from 127.0.0.1 into webdataset tars (some URLs fail)."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(ROWS):
        width, height = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        path = f"/w/{i}.jpg"
        if i % 10 != 7:  # every tenth URL is missing: img2dataset records it as failed_to_download
            server.routes[path] = Response(make_jpeg(width, height, 5000 + i))
        rows.append({"URL": server.url(path), "TEXT": f"a picture of thing {i}", "WIDTH": float(width),
                     "HEIGHT": float(height), "AESTHETIC_SCORE": float(rng.uniform(4.5, 7.0)),
                     "pwatermark": float(rng.uniform(0, 0.5))})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "list.parquet")
    out = tmp_path / "downloaded"
    command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(tmp_path / "list.parquet"),
               "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
               "--save_additional_columns", '["WIDTH","HEIGHT","AESTHETIC_SCORE","pwatermark"]',
               "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", "1",
               "--thread_count", "4", "--number_sample_per_shard", "16", "--image_size", "400",
               "--resize_mode", "keep_ratio", "--resize_only_if_bigger", "True", "--encode_quality", "95",
               "--timeout", "5", "--retries", "0", "--distributor", "multiprocessing", "--enable_wandb", "False"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={"NO_ALBUMENTATIONS_UPDATE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    return out, rows


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("wds")
    with ImageServer() as server:
        out, rows = _img2dataset(folder, server)
    return {"folder": folder, "tars": out, "rows": rows}


def _samples(tar_path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, _, extension = member.name.partition(".")
            handle = tar.extractfile(member)
            if handle is not None:
                samples.setdefault(key, {})[extension] = handle.read()
    return samples


def test_img2dataset_output_is_curated_with_its_failures_in_the_books(downloaded, tmp_path, config_factory):
    tars = sorted(downloaded["tars"].glob("*.tar"))
    assert len(tars) >= 2
    out = tmp_path / "out"
    stats = run_local([str(downloaded["tars"])], out, config_factory(**RUN))
    assert stats["input_rows"] == ROWS == stats["kept"] + stats["dropped"]  # img2dataset's failures included
    failed = stats["dropped_by_stage"]["ingest"]
    assert failed == {"img2dataset_failed_to_download": ROWS // 10}
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    assert all("404" in r["detail"] or "Not Found" in r["detail"] for r in ledger if r["stage"] == "ingest")
    inputs = {}
    for tar in tars:
        for sample in _samples(tar).values():
            meta = json.loads(sample["json"])
            inputs[meta["url"]] = (sample, meta)
    kept = _samples(next((out / "shards").glob("*.tar")))
    for path in (out / "shards").glob("*.tar"):
        kept.update(_samples(path))
    assert len(kept) == stats["kept"] > 0
    for sample in kept.values():
        document = json.loads(sample["json"])
        source, meta = inputs[document["url"]]
        assert sample["txt"] == source["txt"]  # caption as img2dataset stored it
        assert document["metadata"]["aesthetic"] == pytest.approx(meta["AESTHETIC_SCORE"])
        # the true original size is img2dataset's, measured before it resized
        assert (document["original_width"], document["original_height"]) == (meta["original_width"],
                                                                              meta["original_height"])
        assert sample["jpg"] == source["jpg"]  # already small enough, a clean JPEG: byte for byte


def test_broken_tars_end_in_the_ledger_or_a_clear_error(downloaded, tmp_path, config_factory):
    first = sorted(downloaded["tars"].glob("*.tar"))[0]
    data = first.read_bytes()
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "truncated.tar").write_bytes(data[: len(data) // 2 + 100])
    buffer = io.BytesIO()
    Image.new("RGB", (300, 300), (20, 90, 160)).save(buffer, "PNG")
    with tarfile.open(folder / "odd.tar", "w") as tar:
        scores = json.dumps({"AESTHETIC_SCORE": 6.0, "pwatermark": 0.1}).encode()
        for name, payload in [("a.png", buffer.getvalue()), ("a.txt", b"a png with a caption"), ("a.json", scores),
                              ("b.txt", b"a caption, no image"), ("b.json", scores), ("c.png", buffer.getvalue()),
                              ("c.json", scores), ("d.png", buffer.getvalue()), ("d.txt", b"first"),
                              ("d.txt", b"second"), ("d.json", scores)]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    out = tmp_path / "out"
    stats = run_local([str(folder)], out, config_factory(**{**RUN, "dedup": ["exact"], "world_size": 1}))
    ledger = {r["reason"]: r for r in pq.read_table(out / "ledger.parquet").to_pylist()}
    assert {"no_image", "duplicate_member", "empty_caption"} <= set(ledger)
    damaged = json.loads((out / "stages" / "ingest" / "_SUCCESS").read_text())["damaged_inputs"]
    assert [d["file"].endswith("truncated.tar") for d in damaged] == [True] and damaged[0]["offset"] > 0
    assert stats["input_rows"] == stats["kept"] + stats["dropped"] and stats["kept"] >= 2
    (folder / "not-a.tar").write_text("hello, I am no tar")
    with pytest.raises(ValueError, match="not-a.tar: not a tar file"):
        run_local([str(folder / "not-a.tar")], tmp_path / "out2", config_factory(**RUN))


# Captions a tar may hold: Latin-1 bytes (decoded as Windows-1252), a JPEG header (no text: ledgered), Japanese.
ODD_CAPTIONS = {"a": b"caf\xe9 cr\xe8me au lait", "b": b"\xff\xd8\xff\xe0\x00\x10JFIF",
                "c": "東京タワーの夜景".encode()}


def write_caption_tar(path: Path) -> None:
    """One tar of three samples whose .txt members are ODD_CAPTIONS (the Spark parity corpus adds it too)."""
    scores = json.dumps({"AESTHETIC_SCORE": 6.0, "pwatermark": 0.1}).encode()
    with tarfile.open(path, "w") as tar:
        for i, (key, caption) in enumerate(ODD_CAPTIONS.items()):
            for name, payload in ((f"odd{key}.jpg", make_jpeg(300 + 7 * i, 300, 50 + i)), (f"odd{key}.txt", caption),
                                  (f"odd{key}.json", scores)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_a_latin_1_caption_in_a_tar_is_decoded_and_marked_and_binary_is_ledgered(tmp_path, config_factory):
    """A Latin-1 .txt member became "caf\ufffd cr\ufffdme" and was kept as if nothing happened."""
    folder = tmp_path / "tars"
    folder.mkdir()
    write_caption_tar(folder / "odd.tar")
    out = tmp_path / "out"
    stats = run_local([str(folder)], out, config_factory(**{**RUN, "dedup": [], "world_size": 1}))
    assert stats["input_rows"] == 3 and stats["kept"] == 2
    samples = pq.read_table(out / "samples.parquet").to_pydict()
    assert dict(zip(samples["caption"], samples["caption_repair"], strict=True)) == {
        "café crème au lait": "cp1252", "東京タワーの夜景": None}
    (ledger,) = pq.read_table(out / "ledger.parquet").to_pylist()
    assert ledger["reason"] == "undecodable_caption" and ledger["detail"].startswith("not text: \\xff\\xd8")
    texts = {s["txt"] for tar in out.glob("shards/*.tar") for s in _samples(tar).values()}
    assert "café crème au lait".encode() in texts  # stored as UTF-8
