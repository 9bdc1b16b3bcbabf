"""--decontaminate: images near a reference set (pHash distance, CLIP cosine) leave the run with a ledger reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import Config
from curate.pipeline.accounting import NothingKept
from curate.pipeline.plan import RunFacts
from curate.pipeline.run import run_local
from curate.steps import decontaminate
from curate.testing.server import ImageServer, Response
from curate.tools.demo import generated_image, jpeg

OPTIONS: dict[str, Any] = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "allow_loopback": True,
                           "min_size": 16, "image_size": 64, "threads": 4, "processes": 1, "batch_size_rows": 8,
                           "target_shard_size": 20_000, "seed": 3, "dedup": ["url", "exact", "phash"]}


def test_a_row_within_the_distance_of_a_reference_hash_is_flagged_with_the_closest() -> None:
    config = Config(decontaminate="ref", decontaminate_distance=4)
    reference = np.array([0x0F0F_0F0F_0F0F_0F0F], np.int64)
    rows = np.array([0x0F0F_0F0F_0F0F_0F0E, 0x0F0F_0F0F_0F0F_0F00, 0x7FFF_0000_0000_0000], np.int64)  # 1, 4, far
    signature = decontaminate.bind_signature(config, RunFacts())(pa.table({"row": [0, 1, 2], "phash": rows}))
    entries = decontaminate._bands(np.full(1, -1, np.int64), reference, 4)
    found = decontaminate.bind_group(config, RunFacts())(pa.concat_tables([signature, entries]))
    by_row = {}
    for row, detail in zip(found["row"].to_pylist(), found["drop_detail"].to_pylist(), strict=True):
        by_row.setdefault(row, set()).add(detail)
    assert by_row == {0: {"pHash 01 bits from a reference image"}, 1: {"pHash 04 bits from a reference image"}}


def test_embeddings_near_a_reference_embedding_are_flagged(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(5, 8)).astype(np.float32)
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(reference.ravel()), 8)}),
                   tmp_path / "ref.parquet")
    near = reference[3] + 0.01 * rng.normal(size=8).astype(np.float32)
    rows = np.stack([near, rng.normal(size=8).astype(np.float32)])
    table = pa.table({"row": [0, 1], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel()), 8)})
    config = Config(decontaminate=str(tmp_path / "ref.parquet"), decontaminate_cosine=0.95)
    judged = decontaminate.bind_semantic(config, RunFacts("model"))(table)
    assert judged["drop_reason"].to_pylist() == ["contaminates_reference_semantic", None]
    detail = judged["drop_detail"][0].as_py()
    assert detail.startswith("CLIP cosine ") and 0.95 <= float(detail.split()[2]) <= 1.0
    wrong = pa.table({"row": [0], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 4)})
    with pytest.raises(ValueError, match="another CLIP model"):
        decontaminate.bind_semantic(config, RunFacts("model"))(wrong)


def test_a_missing_reference_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images, tars or parquet files"):
        decontaminate.check(Config(decontaminate=str(tmp_path / "empty")))


def served(folder: Path, server: ImageServer, rows: int = 20) -> list[Image.Image]:
    rng = np.random.default_rng(8)
    images = [generated_image(rng, 60 + 3 * i, 50 + 2 * i) for i in range(rows)]
    urls = []
    for i, image in enumerate(images):
        server.routes[f"/{i}.jpg"] = Response(jpeg(image, quality=90))
        urls.append(server.url(f"/{i}.jpg"))
    pq.write_table(pa.table({"URL": urls, "TEXT": [f"thing {i}" for i in range(rows)], "AESTHETIC_SCORE": [6.0] * rows,
                             "pwatermark": [0.1] * rows}), folder / "input.parquet")
    return images


def test_reference_images_and_a_previous_runs_samples_decontaminate_a_run(tmp_path: Path) -> None:
    with ImageServer() as server:
        images = served(tmp_path, server)
        reference = tmp_path / "eval"
        reference.mkdir()
        for i in (3, 11):  # the evaluation set holds re-encoded copies of two of the run's images
            (reference / f"{i}.jpg").write_bytes(jpeg(images[i], quality=60))
        config = Config(**OPTIONS, decontaminate=str(reference)).validate()
        stats = run_local([str(tmp_path / "input.parquet")], tmp_path / "out", config)
        assert stats["dropped_by_stage"]["decontaminate_phash"] == {"contaminates_reference_phash": 2}
        ledger = {r["row"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()}
        assert ledger[3] == ledger[11] == "contaminates_reference_phash"
        assert stats["kept"] + stats["dropped"] == stats["input_rows"]
        # a previous run's samples.parquet (its pHashes) as the reference: none of its kept images comes back
        previous = tmp_path / "out" / "samples.parquet"
        kept = set(pq.read_table(previous)["row"].to_pylist())
        assert len(decontaminate.reference_hashes(config, str(previous))) == len(kept) > 0
        try:
            run_local([str(tmp_path / "input.parquet")], tmp_path / "again",
                      Config(**{**OPTIONS, "world_size": 1}, decontaminate=str(previous)).validate())
        except NothingKept:
            pass  # the books are written either way
    again = {r["row"]: r["reason"] for r in pq.read_table(tmp_path / "again" / "ledger.parquet").to_pylist()}
    assert all(again.get(row) == "contaminates_reference_phash" for row in kept)
