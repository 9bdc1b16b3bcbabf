"""curate.loader over a real curated output: bucket batches, caption dropout, seeds, and 4 gloo ranks that agree."""

from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import Config
from curate.pipeline.run import run_local
from curate.schema import json_schema
from curate.testing.server import ImageServer, Response

torch = pytest.importorskip("torch")
from curate.loader import iter_samples, make_loader, read_shardlist  # noqa: E402

# Stored at buckets of base 64: (64, 64), (128, 64), (64, 128); the 48 px squares stay smaller than their bucket.
SHAPES = [(80, 80), (150, 70), (70, 150), (48, 48)]


def _jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)).resize((width, height))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """400 rows of four shapes through `curate run` with --resize-mode bucket --buckets 64: 8 equal shards."""
    folder = tmp_path_factory.mktemp("loader")
    with ImageServer() as server:
        rows = []
        for i in range(400):
            width, height = SHAPES[i % len(SHAPES)]
            server.routes[f"/{i}.jpg"] = Response(_jpeg(width, height, i))
            rows.append({"URL": server.url(f"/{i}.jpg"), "TEXT": f"photo number {i}", "WIDTH": float(width),
                         "HEIGHT": float(height), "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1})
        pq.write_table(pa.Table.from_pylist(rows), folder / "input.parquet")
        config = Config(scores="metadata", world_size=4, workers_per_rank=2, min_size=32, allow_loopback=True,
                        threads=8, resize_mode="bucket", buckets=64, dedup=["url", "exact"], seed=1).validate()
        run_local([str(folder / "input.parquet")], folder / "out", config)
    return folder / "out"


def test_samples_carry_the_sdxl_conditioning(curated: Path):
    index = json.loads((curated / "shards" / "index.json").read_text())
    sizes = json.loads((curated / "shards" / "sizes.json").read_text())
    assert index["buckets"] == 64 and len(index["shardlist"]) == 8
    assert sizes == {entry["url"]: entry["nsamples"] for entry in index["shardlist"]}
    # open_clip's training code sizes its epochs from sizes.json beside the shards
    from open_clip_train.data import get_dataset_size

    urls = [str(curated / "shards" / entry["url"]) for entry in index["shardlist"]]
    assert get_dataset_size("::".join(urls)) == (sum(sizes.values()), 8)  # --train-data joins shards with ::
    assert get_dataset_size("::".join(urls[:3])) == (sum(sizes[Path(u).name] for u in urls[:3]), 3)
    samples = pq.read_table(curated / "samples.parquet").to_pylist()
    shapes = {(s["bucket_width"], s["bucket_height"], s["stored_width"], s["stored_height"], s["smaller_than_bucket"])
              for s in samples}
    assert shapes == {(64, 64, 64, 64, False), (128, 64, 128, 64, False), (64, 128, 64, 128, False),
                      (64, 64, 48, 48, True)}
    wide = next(s for s in samples if s["original_width"] == 150)
    assert (wide["crop_top"], wide["crop_left"]) == (0, 4)  # 150x70 scaled to 137x64 covers 128x64: 4 px off the left
    for entry in index["shardlist"]:
        assert sum(entry["buckets"].values()) == entry["nsamples"]
    shard = read_shardlist(str(curated / "shards" / "index.json"))[0]
    documents = [sample["json"] for sample in iter_samples(shard.url)]
    assert documents and all(set(json_schema("sample")["required"]) <= set(d) for d in documents)
    assert shard.buckets == read_shardlist([shard.url])[0].buckets == index["shardlist"][0]["buckets"]


def test_batches_hold_one_bucket_and_captions_drop_at_the_rate(curated: Path):
    loader = make_loader(str(curated / "shards"), batch_size=4, rank=0, world_size=1, num_workers=0,
                         caption_dropout=0.1, seed=5, tokenizers={"input_ids": "ViT-L-14"})
    assert loader.options.base == 64 or loader.shards[0].buckets  # base read from index.json
    seen = dropped = 0
    first_epoch: list[str] = []
    for epoch in range(12):
        loader.set_epoch(epoch)
        count = 0
        for batch in loader:
            count += 1
            width, height = batch["bucket"]
            assert batch["image"].shape == (4, 3, height, width) and batch["image"].dtype == torch.uint8
            assert {(d["bucket_width"], d["bucket_height"]) for d in batch["json"]} == {(width, height)}
            assert batch["input_ids"].shape == (4, 77)
            assert batch["target_size"].tolist() == [[height, width]] * 4
            seen += 4
            dropped += sum(caption == "" for caption in batch["caption"])
            if epoch == 0:
                first_epoch += batch["key"]
        assert count == len(loader)
    # 10 % of captions dropped, within 5 standard deviations of the binomial
    assert abs(dropped - 0.1 * seen) < 5 * math.sqrt(seen * 0.1 * 0.9), (dropped, seen)
    loader.set_epoch(0)
    assert [key for batch in loader for key in batch["key"]] == first_epoch  # same seed and epoch, same order


RANK_SCRIPT = r"""
import datetime, json, os, sys
import torch
import torch.distributed as dist
from curate.loader import make_loader

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
rank = dist.get_rank()
loader = make_loader(sys.argv[1], batch_size=3, num_workers=2, seed=11)
report = {"rank": rank, "epochs": []}
for epoch in (0, 1, 0):
    loader.set_epoch(epoch)
    keys, steps = [], 0
    for batch in loader:
        ones = torch.ones(1)
        dist.all_reduce(ones)  # a rank with fewer batches would leave the others waiting here until the timeout
        assert ones.item() == dist.get_world_size()
        assert len({(d["bucket_width"], d["bucket_height"]) for d in batch["json"]}) == 1
        assert batch["image"].shape[2:] == (batch["bucket"][1], batch["bucket"][0])
        keys += batch["key"]
        steps += 1
    total = torch.tensor([steps])
    dist.all_reduce(total)
    report["epochs"].append({"epoch": epoch, "keys": keys, "steps": steps, "total": int(total.item()),
                             "remainder": loader.plan().remainder(rank, 3)})
json.dump(report, open(os.path.join(sys.argv[2], f"rank-{rank}.json"), "w"))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_four_gloo_ranks_get_the_same_batches_and_every_sample_once(curated: Path, tmp_path: Path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "4",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, str(script), str(curated / "shards" / "index.json"), str(tmp_path)],
                              env={**env, "RANK": str(rank)}, stderr=subprocess.PIPE, text=True) for rank in range(4)]
    deadline = time.monotonic() + 240
    try:
        for process in ranks:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
    failures = [p.stderr.read()[-3000:] for p in ranks if p.returncode != 0]  # type: ignore[union-attr]
    assert not failures, failures
    reports = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(4)]
    kept = pq.read_table(curated / "samples.parquet", columns=["key"])["key"].to_pylist()
    for round_ in range(3):
        epochs = [report["epochs"][round_] for report in reports]
        steps = {epoch["steps"] for epoch in epochs}
        assert len(steps) == 1 and steps.pop() > 0 and epochs[0]["total"] == 4 * epochs[0]["steps"]
        keys = [key for epoch in epochs for key in epoch["keys"]]
        assert len(keys) == len(set(keys)) and set(keys) <= set(kept)  # no sample twice in an epoch
        assert len(kept) - len(keys) == sum(epoch["remainder"] for epoch in epochs)  # the rest is the remainder
        assert sum(epoch["remainder"] for epoch in epochs) < len(kept) // 2
    assert [e["keys"] for e in reports[0]["epochs"]][0] == reports[0]["epochs"][2]["keys"]  # epoch 0 again: same
    assert reports[0]["epochs"][0]["keys"] != reports[0]["epochs"][1]["keys"]  # another epoch, another order


def _photo(width: int, height: int) -> bytes:
    """A smooth photo-like gradient with a bright stripe, so a crop 1 px off shows in the pixels."""
    x, y = np.meshgrid(np.linspace(0, 255, width), np.linspace(0, 255, height))
    pixels = np.stack([x, y, (x + y) / 2], axis=-1)
    pixels[:, width // 3:width // 3 + 40] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_center_crop_records_its_crop_and_the_loader_passes_it_on(tmp_path: Path):
    """A 1100x520 original stored at 512x512 had crop_top/crop_left null, and the loader yielded [0, 0]."""
    shapes = [(1100, 520), (520, 1100), (400, 300), (512, 512)]
    with ImageServer() as server:
        rows = []
        for i, (width, height) in enumerate(shapes):
            server.routes[f"/{i}.jpg"] = Response(_photo(width, height))
            rows.append({"URL": server.url(f"/{i}.jpg"), "TEXT": f"photo number {i}", "WIDTH": float(width),
                         "HEIGHT": float(height), "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1})
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "input.parquet")
        config = Config(scores="metadata", world_size=1, workers_per_rank=1, min_size=32, allow_loopback=True,
                        image_size=512, resize_mode="center_crop", buckets=512, dedup=[]).validate()
        run_local([str(tmp_path / "input.parquet")], tmp_path / "out", config)
    samples = {s["original_width"]: s for s in pq.read_table(tmp_path / "out" / "samples.parquet").to_pylist()}
    # 1100x520 scales to 1083x512 (shorter side 512), whose centre 512 columns start at (1083 - 512) // 2 = 285
    assert (samples[1100]["crop_top"], samples[1100]["crop_left"]) == (0, 285)
    assert (samples[520]["crop_top"], samples[520]["crop_left"]) == (285, 0)
    assert (samples[400]["crop_top"], samples[400]["crop_left"]) == (0, 0)  # no larger than 512: left as it is
    import cv2

    scaled = cv2.resize(np.asarray(Image.open(io.BytesIO(_photo(1100, 520)))), (1083, 512),
                        interpolation=cv2.INTER_AREA).astype(float)
    stored = np.zeros(0)
    loader = make_loader(str(tmp_path / "out" / "shards"), batch_size=1, rank=0, world_size=1, num_workers=0,
                         shuffle_buffer=1, caption_dropout=0.0)
    crops = {}
    for batch in loader:
        crops[batch["json"][0]["original_width"]] = batch["crop_top_left"][0].tolist()
        if batch["json"][0]["original_width"] == 1100:
            stored = batch["image"][0].permute(1, 2, 0).numpy().astype(float)
    assert crops[1100] == [0, 285] and crops[520] == [285, 0]
    error = {left: np.abs(stored - scaled[:, left:left + 512]).mean() for left in (0, 284, 285, 286)}
    assert min(error, key=error.__getitem__) == 285, error  # the pixels stored are the ones the crop names


def test_the_loader_never_invents_a_crop(tmp_path: Path):
    import tarfile

    path = tmp_path / "plain-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", _jpeg(64, 64, 0)), ("a.txt", b"a cat"),
                           ("a.json", json.dumps({"width": 64, "height": 64, "crop_top": None}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    from curate.loader import UnknownCrop

    loader = make_loader([str(path)], batch_size=1, rank=0, world_size=1, num_workers=0, base=64)
    with pytest.raises(UnknownCrop, match="sample a: .*records no crop_top/crop_left.*assume_uncropped=True"):
        next(iter(loader))
    stated = make_loader([str(path)], batch_size=1, rank=0, world_size=1, num_workers=0, base=64,
                         assume_uncropped=True)
    assert next(iter(stated))["crop_top_left"].tolist() == [[0, 0]]
