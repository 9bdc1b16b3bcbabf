"""WebDataset input on Spark: img2dataset's output gives the local engine's books and byte-identical tars."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curate.config import Config
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer
from tests.executors.test_spark import assert_same_dataset
from tests.test_img2dataset_shapes import PER_SHARD, caption_field_tar, crashed_copy, expected_failures, failing
from tests.test_img2dataset_shapes import ROWS as SHAPE_ROWS
from tests.test_webdataset_input import ODD_CAPTIONS, ROWS, RUN, _img2dataset, write_caption_tar


def test_spark_curates_img2dataset_output_as_the_local_engine_does(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import run_spark

    with ImageServer() as server:
        tars, _ = _img2dataset(tmp_path, server)
    write_caption_tar(tars / "odd.tar")  # Latin-1, binary and Japanese captions
    config = Config(**{**RUN, "batch_size_rows": 16, "seed": 3}).validate()
    local = run_local([str(tars)], tmp_path / "local", config)
    stats = run_spark(spark, [str(tars)], str(tmp_path / "spark"), config)
    rows = ROWS + len(ODD_CAPTIONS)
    assert stats["input_rows"] == local["input_rows"] == rows == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_stage"]["prefilter"].get("undecodable_caption") == 1
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    assert stats["dropped_by_stage"]["ingest"] == {"img2dataset_failed_to_download": ROWS // 10}
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")


def test_spark_reads_every_img2dataset_shape_as_the_local_engine_does(spark: Any, img2dataset_shapes: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    """One folder of every shape: a crashed webdataset output (a missing, an empty and a 0-byte tar), a files and a
    parquet output, and a tar whose captions only --caption-field text finds; the same books and tars."""
    from curate.executors.spark.engine import run_spark

    root = tmp_path / "shapes"
    crashed_copy(img2dataset_shapes["webdataset"], root / "wds")
    for name in ("files", "parquet"):
        shutil.copytree(img2dataset_shapes[name], root / name)
    caption_field_tar(root / "text-000.tar")
    # url duplicates only: the formats share their images, and every shape's samples should reach the shards
    config = Config(**{**RUN, "dedup": ["url"], "caption_field": "text", "batch_size_rows": 64, "seed": 3}).validate()
    local = run_local([str(root)], tmp_path / "local", config)
    stats = run_spark(spark, [str(root)], str(tmp_path / "spark"), config)
    rows = 3 * SHAPE_ROWS + 6
    assert stats["input_rows"] == local["input_rows"] == rows == stats["kept"] + stats["dropped"]
    assert stats["dropped_by_stage"] == local["dropped_by_stage"]
    lost = sum(not failing(i) for i in range(SHAPE_ROWS) if i // PER_SHARD in (0, 2))
    assert stats["dropped_by_stage"]["ingest"] == {"img2dataset_failed_to_download": 3 * expected_failures(),
                                                   "img2dataset_shard_missing": lost}
    metas = [json.loads((tmp_path / out / "stages" / "ingest" / "_SUCCESS").read_text()) for out in ("local", "spark")]
    assert metas[0]["damaged_inputs"] == metas[1]["damaged_inputs"] and len(metas[0]["damaged_inputs"]) == 2
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")
    urls = pq.read_table(tmp_path / "spark" / "samples.parquet", columns=["url"])["url"].to_pylist()
    assert {url.split("/")[3] for url in urls if url} >= {"files", "parquet", "webdataset"}
    assert sum(url is None for url in urls) >= 2  # the hand-made tar's samples, captioned from their json
    shutil.copy(img2dataset_shapes["webdataset"].parent / "files-list.parquet", root / "meta.parquet")
    with pytest.raises(ValueError, match=r"meta\.parquet.*--input-format webdataset"):  # before any Spark job
        run_spark(spark, [str(root)], str(tmp_path / "mixed"), config)
    assert not (tmp_path / "mixed").exists()
