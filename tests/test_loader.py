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
