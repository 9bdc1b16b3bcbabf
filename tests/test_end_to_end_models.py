"""`curate run --scores model`: tiny configs of the real CLIP/aesthetic/watermark architectures, semantic dedup on."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from curate.models.testing import write_tiny_weights
from curate.pipeline.run import run_local
from curate.wds.verify import verify


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


def test_model_scores_drive_select_and_reach_the_sample_json(tmp_path, corpus_factory, config_factory, tiny_models):
    corpus = corpus_factory(24)
    out = tmp_path / "out"
    # Random tiny CLIP towers map different pictures close together: a strict cosine keeps them apart.
    config = config_factory(scores="model", device="cpu", batch_size=8, threshold=0.0, max_watermark=1.0,
                            world_size=2, workers_per_rank=1, semdedup_threshold=0.99999, **tiny_models)
    stats = run_local([str(corpus.path)], out, config)
    assert stats["scores_source"] == "model"
    assert stats["input_rows"] == stats["kept"] + stats["dropped"]
    assert stats["dedup"]["semantic"] == "ran"
    ledger = pq.read_table(out / "ledger.parquet")
    # Metadata scores are not used with --scores model: nothing is dropped for them before download.
    assert not {"metadata_low_aesthetic", "metadata_watermark"} & set(ledger["reason"].to_pylist())
    scored = pq.read_table(out / "stages" / "score").to_pandas()
    alive = scored[scored["drop_reason"].isna()]
    assert alive["aesthetic_score"].notna().all() and alive["watermark_prob"].between(0, 1).all()
    assert alive["embedding"].map(len).eq(768).all()
    for later in ("dedup", "select", "shard"):  # no later stage reads them: 1.5 KB a row left behind
        assert all("embedding" not in pq.read_schema(p).names for p in (out / "stages" / later).glob("*.parquet"))
    samples = pq.read_table(out / "samples.parquet").to_pandas()
    assert set(samples["scores_source"]) == {"model"}
    assert verify(out) == []
    assert json.loads((out / "stats.json").read_text())["dropped_by_stage"]


def test_auto_uses_metadata_when_every_row_has_it(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(30)
    stats = run_local([str(corpus.path)], tmp_path / "out", config_factory(scores="auto", world_size=2))
    assert stats["scores_source"] == "metadata"


def test_missing_weights_stop_the_run_before_download(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(10)
    config = config_factory(scores="model", clip_weights=str(tmp_path / "nope.pt"), model_cache=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="--clip-weights"):
        run_local([str(corpus.path)], tmp_path / "out", config)
    assert not (tmp_path / "out" / "stages" / "download").exists()
