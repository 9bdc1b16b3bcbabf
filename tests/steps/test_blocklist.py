"""--blocklist: rows whose URL or image digest is listed leave the run with a ledger reason, by a partitioned join."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config import Config
from curate.executors.local import generic
from curate.executors.local.engine import LocalRun
from curate.pipeline import steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.run import run_local
from curate.steps import blocklist
from curate.steps.hashes import hex_groups
from curate.testing.server import ImageServer, Response
from curate.tools.demo import generated_image, jpeg

OPTIONS: dict[str, Any] = {"scores": "metadata", "world_size": 2, "workers_per_rank": 1, "allow_loopback": True,
                           "min_size": 16, "image_size": 64, "threads": 4, "processes": 1, "batch_size_rows": 8,
                           "target_shard_size": 20_000, "seed": 3, "dedup": ["url", "exact"]}


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def served_corpus(folder: Path, server: ImageServer, rows: int = 20) -> tuple[list[str], list[bytes]]:
    import numpy as np

    rng = np.random.default_rng(4)
    urls, images = [], []
    for i in range(rows):
        image = jpeg(generated_image(rng, 48 + i, 40 + i))
        server.routes[f"/{i}.jpg"] = Response(image)
        urls.append(server.url(f"/{i}.jpg"))
        images.append(image)
    table = pa.table({"URL": urls, "TEXT": [f"thing {i}" for i in range(rows)], "AESTHETIC_SCORE": [6.0] * rows,
                      "pwatermark": [0.1] * rows})
    pq.write_table(table, folder / "input.parquet")
    return urls, images


def test_hex_groups_are_the_first_sixteen_digits() -> None:
    values = ["0" * 15 + "1" + "f" * 48, "ffffffffffffffff" + "0" * 48]
    assert hex_groups(pa.array(values)).tolist() == [1, -1]


def test_a_list_entry_that_is_no_digest_is_refused_naming_its_line(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text(f"# a comment\n{'a' * 64}\n\nnot-a-digest\n")
    with pytest.raises(ValueError, match=r"list.txt: line 4 is not a hex sha256 digest"):
        list(blocklist.read_list(Config(), str(path)))
    with pytest.raises(ValueError, match="no such file"):
        blocklist.check(Config(blocklist=[str(tmp_path / "missing.txt")]))


def test_the_group_flags_only_listed_digests() -> None:
    listed, other = digest(b"listed"), digest(b"other")
    signature = blocklist.URL_STEP.global_step.signature(Config(), RunFacts())  # type: ignore[union-attr]
    rows = signature(pa.table({"row": [0, 1, 2], "url": ["a", None, "b"]}))
    assert rows["row"].to_pylist() == [0, 2]  # no URL: no digest to look up
    entries = pa.concat_tables([blocklist._entries(pa.array([digest(b"a"), listed, other]))])
    group = blocklist.URL_STEP.global_step.group(Config(), RunFacts())  # type: ignore[union-attr]
    found = group(pa.concat_tables([rows, entries]))
    assert found["row"].to_pylist() == [0] and found["drop_reason"].to_pylist() == ["blocklisted_url"]


def test_listed_urls_are_never_fetched_and_listed_images_are_dropped(tmp_path: Path) -> None:
    with ImageServer() as server:
        urls, images = served_corpus(tmp_path, server)
        (tmp_path / "urls.txt").write_text(f"{digest(urls[2].encode()).upper()}\n# opt-out\n{digest(b'x')}\n")
        pq.write_table(pa.table({"sha256": [digest(images[5]), digest(images[9])]}), tmp_path / "images.parquet")
        lists = [str(tmp_path / "urls.txt"), str(tmp_path / "images.parquet")]
        config = Config(**OPTIONS, blocklist=lists).validate()
        stats = run_local([str(tmp_path / "input.parquet")], tmp_path / "out", config)
        assert "/2.jpg" not in server.requests and "/5.jpg" in server.requests
    ledger = pq.read_table(tmp_path / "out" / "ledger.parquet").to_pylist()
    reasons = {row["row"]: (row["stage"], row["reason"]) for row in ledger}
    assert reasons[2] == ("blocklist_url", "blocklisted_url")
    assert reasons[5] == reasons[9] == ("blocklist_image", "blocklisted_image")
    assert stats["dropped_by_stage"]["blocklist_url"] == {"blocklisted_url": 1}
    assert stats["dropped_by_stage"]["blocklist_image"] == {"blocklisted_image": 2}
    assert stats["kept"] + stats["dropped"] == stats["input_rows"] == 20
    kept = set(pq.read_table(tmp_path / "out" / "samples.parquet")["row"].to_pylist())
    assert not kept & {2, 5, 9}
    # the same join over partitions of two signature rows each (many spilled partitions) flags the same rows
    run = LocalRun(tmp_path / "out", config)
    before = run.checkpoint("blocklist_image").read().sort_by("row")
    step = steps.spec("blocklist_image")
    small = dataclasses.replace(step, global_step=dataclasses.replace(step.global_step, rows_per_partition=2))
    assert generic.global_step(run, small, force=True)["partitions"] > 5
    assert run.checkpoint("blocklist_image").read().sort_by("row").equals(before)


def test_the_steps_are_in_the_pipeline_only_when_asked_for() -> None:
    names = [step.name for step in steps.enabled(Config())]
    assert "blocklist_url" not in names and "blocklist_image" not in names
    asked = [step.name for step in steps.enabled(Config(blocklist=["x.txt"]))]
    assert asked.index("prefilter") < asked.index("blocklist_url") < asked.index("download")
    assert asked.index("score") < asked.index("blocklist_image") < asked.index("dedup")
