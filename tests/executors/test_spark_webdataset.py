"""WebDataset input on Spark: img2dataset's output gives the local engine's books and byte-identical tars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curate.config import Config
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer
from tests.executors.test_spark import assert_same_dataset
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
