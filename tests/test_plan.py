"""The stage declarations: what each stage's per-batch function reads of Config is what the stage declares (the rerun
and resume rules are computed from the declarations), and the executors hold no option mapping of their own."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import curate
from curate.config import Config
from curate.pipeline import plan, steps
from curate.pipeline.plan import RunFacts
from curate.pipeline.steps import STAGES
from curate.schema import (
    AESTHETIC,
    CLIP_SCORE,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    POSITION,
    PWATERMARK,
    SHARD,
    STORED_HEIGHT,
    STORED_WIDTH,
)
from curate.stages.ingest import normalize
from curate.stages.select import scores_from_metadata
from curate.stages.verdict import with_reason, with_verdict_columns

FIELDS = {field.name for field in dataclasses.fields(Config)}


class Recording:
    """A Config that notes every field read."""

    def __init__(self, config: Config) -> None:
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "read", set())

    def __getattr__(self, name: str) -> Any:
        if name in FIELDS:
            self.read.add(name)
        return getattr(self._config, name)


def rows(downloaded: bool = False) -> pa.Table:
    table = pa.table({"URL": ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/b.jpg"], "TEXT": ["a cat", "a dog"],
                      "WIDTH": [512.0, 64.0], "HEIGHT": [512.0, 64.0], "AESTHETIC_SCORE": [6.1, 4.0],
                      "pwatermark": [0.1, 0.9], "punsafe": [0.1, 0.7]})
    table = with_verdict_columns(normalize(table, 0))
    if downloaded:  # what the download stage measured, and the scores
        table = table.append_column(ORIGINAL_WIDTH, pa.array([512, 64], pa.int32()))
        table = table.append_column(ORIGINAL_HEIGHT, pa.array([512, 64], pa.int32()))
        table = scores_from_metadata(table).append_column(CLIP_SCORE, pa.array([0.3, 0.1], pa.float32()))
    return table


@pytest.mark.parametrize("stage", [s.name for s in STAGES if s.name != "download" and s.bind is not None])
@pytest.mark.parametrize("scores", ["metadata", "model"])
def test_a_stage_reads_only_the_options_it_declares(stage: str, scores: str, tmp_path: Path) -> None:
    config = Recording(Config(scores=scores, min_caption_words=1, languages=["en"], max_caption_tokens=77,
                              junk_captions=True, min_clip_score=0.2, max_unsafe=0.5, world_size=1,
                              workers_per_rank=1))
    if stage == "ingest":
        path = tmp_path / "input.parquet"
        pq.write_table(pa.table({"URL": ["http://127.0.0.1:9/a.jpg"] * 3, "TEXT": ["a", "b", "c"]}), path)
        read = steps.bound(stage, config, RunFacts(scores))  # type: ignore[arg-type]
        assert [t["row"].to_pylist() for t in read(str(path), 5, [])] == [[5, 6, 7]]
    elif stage == "shard":
        shard_plan = plan.shard_plan(config, 2, 1000)  # type: ignore[arg-type]
        apply = steps.bound(stage, config, RunFacts(scores), plan=shard_plan)  # type: ignore[arg-type]
        table = rows(downloaded=True)
        for name in (STORED_WIDTH, STORED_HEIGHT):
            table = table.append_column(name, pa.array([512, 64], pa.int32()))
        placed = apply(table.append_column(POSITION, pa.array([1, 0], pa.int64())))
        assert placed[SHARD].to_pylist() == [0, 0] and placed["bucket_width"].to_pylist() == [1024, 1024]
    else:
        apply = steps.bound(stage, config, RunFacts(scores))  # type: ignore[arg-type]
        if stage == "prefilter":
            apply(rows(), None)
        elif stage != "score":  # score's model half needs weights (load_scorer reads the model options, lazily)
            apply(rows(downloaded=True))
    assert config.read or stage == "score", f"{stage} read no option"
    assert config.read <= steps.spec(stage).options, config.read - steps.spec(stage).options


def test_download_options_read_only_download_options() -> None:
    config = Recording(Config())
    steps.bound("download", config, RunFacts("metadata"))  # type: ignore[arg-type]
    assert config.read and config.read <= steps.spec("download").options, config.read - steps.spec("download").options


def test_shard_places_the_remainder_and_keeps_nothing_kept_a_result() -> None:
    config = Config(world_size=2, workers_per_rank=1)
    assert plan.shard_plan(config, 0, 0).num_shards == 0  # none kept: books that say why, not an error
    shard_plan = plan.shard_plan(config, 5, 1000)  # 2 shards of 2, one left over
    apply = steps.bound("shard", config, RunFacts(), plan=shard_plan)
    table = with_verdict_columns(pa.table({STORED_WIDTH: pa.array([64] * 6, pa.int32()),
                                           STORED_HEIGHT: pa.array([64] * 6, pa.int32()),
                                           POSITION: pa.array([0, 1, 2, 3, 4, -1], pa.int64())}))
    dropped_before = [False] * 5 + [True]  # a row without a position was dropped by an earlier stage
    placed = apply(with_reason(table, pa.array(dropped_before), "dedup", "duplicate_exact"))
    assert placed[SHARD].to_pylist() == [0, 0, 1, 1, -1, -1]
    assert placed["drop_reason"].to_pylist() == [None] * 4 + ["shard_remainder", "duplicate_exact"]


def test_the_executors_map_no_threshold_themselves() -> None:
    """No executor reads a threshold off Config: the thresholds reach the stages only through the plan's bindings."""
    thresholds = steps.METADATA_THRESHOLDS | steps.MODEL_THRESHOLDS
    root = Path(curate.__file__).parent / "executors"
    reads = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in thresholds and isinstance(node.value, ast.Name) \
                    and node.value.id in {"c", "config", "cfg"}:
                reads.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
    assert reads == []


def test_scores_auto_is_decided_once_for_both_executors() -> None:
    def never() -> dict[str, int]:
        raise AssertionError("the input was read though the answer did not depend on it")

    assert plan.resolve_scores(Config(scores="metadata"), never) == "metadata"
    assert plan.resolve_scores(Config(scores="auto", min_clip_score=0.2), never) == "model"
    every_row = {AESTHETIC: 0, PWATERMARK: 0}
    assert plan.resolve_scores(Config(scores="auto"), lambda: every_row) == "metadata"
    assert plan.resolve_scores(Config(scores="auto"), lambda: {**every_row, PWATERMARK: 3}) == "model"
    assert plan.resolve_scores(Config(scores="auto"), lambda: {AESTHETIC: 0}) == "model"
