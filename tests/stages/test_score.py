"""Score stage: tiny real-architecture models loaded from files, one decode per image, bad images as verdicts."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
from PIL import Image

from curate.config import Config
from curate.models import AestheticPredictor, ClipEncoder, WeightsError
from curate.models.testing import two_tone_jpeg as jpeg
from curate.models.testing import write_tiny_weights
from curate.pipeline.run import recut, run_local
from curate.schema import (
    AESTHETIC_SCORE,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    EMBEDDING,
    PUNSAFE,
    SCORES_SOURCE,
    WATERMARK_PROB,
)
from curate.stages.score import Scorer, load_scorer, score_images
from curate.stages.verdict import with_reason, with_verdict_columns


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    weights = write_tiny_weights(tmp_path_factory.mktemp("weights"))
    return Config(device="cpu", batch_size=2, model_cache=str(tmp_path_factory.mktemp("cache")), **weights)


@pytest.fixture(scope="module")
def scorer(tiny_config: Config) -> Scorer:
    return load_scorer(tiny_config)


@pytest.fixture()
def table() -> pa.Table:
    good = [jpeg((30 * i, 200 - 20 * i, 90), (320 + 40 * i, 240)) for i in range(6)]
    rows = [good[0], good[1], b"\xff\xd8\xff\xe0 not a jpeg", None, good[2][:300], good[3], good[4], good[5]]
    table = pa.table({"key": [f"{i:03d}" for i in range(len(rows))], "jpg": pa.array(rows, pa.binary())})
    table = with_verdict_columns(table)
    return with_reason(table, np.array([False] * 6 + [True, False]), "prefilter", "too_small")


def test_scores_embeddings_and_verdicts(table: pa.Table, scorer: Scorer) -> None:
    out = score_images(table, scorer)
    assert out.num_rows == table.num_rows and out.column_names[: len(table.column_names)] == table.column_names
    assert out.schema.field(AESTHETIC_SCORE).type == pa.float32()
    assert out.schema.field(WATERMARK_PROB).type == pa.float32()
    assert out.schema.field(EMBEDDING).type == pa.list_(pa.float16(), 768)
    scored = [0, 1, 5, 7]
    assert out[SCORES_SOURCE].to_pylist() == ["model" if i in scored else None for i in range(8)]
    assert [i for i, value in enumerate(out[EMBEDDING].to_pylist()) if value is not None] == scored
    assert out[DROP_REASON].to_pylist() == [None, None, "decode_failed", None, "decode_failed", None, "too_small", None]
    assert out[DROP_STAGE].to_pylist()[2] == "score" and out[DROP_STAGE].to_pylist()[6] == "prefilter"
    assert out[DROP_DETAIL][2].as_py() and out[DROP_DETAIL][4].as_py()  # the decoder's error text


def test_scores_equal_the_models_on_the_same_images(table: pa.Table, scorer: Scorer) -> None:
    out = score_images(table, scorer)
    images = [Image.open(io.BytesIO(table["jpg"][i].as_py())) for i in (0, 1, 5, 7)]
    embeddings = scorer.clip.encode(images)
    aesthetic = np.array(out[AESTHETIC_SCORE].to_pylist(), dtype=object)[[0, 1, 5, 7]].astype(np.float32)
    np.testing.assert_allclose(aesthetic, scorer.aesthetic.predict(embeddings), atol=1e-4)
    watermark = np.array(out[WATERMARK_PROB].to_pylist(), dtype=object)[[0, 1, 5, 7]].astype(np.float32)
    np.testing.assert_allclose(watermark, scorer.watermark.predict(images), atol=1e-5)
    stored = np.array([out[EMBEDDING][i].as_py() for i in (0, 1, 5, 7)], dtype=np.float32)
    np.testing.assert_allclose(stored, embeddings, atol=2e-3)
    assert len(set(np.round(aesthetic, 4))) > 1  # the tiny models still tell images apart


def test_nothing_to_score_still_adds_the_columns(scorer: Scorer) -> None:
    table = with_verdict_columns(pa.table({"key": pa.array([], pa.string()), "jpg": pa.array([], pa.binary())}))
    out = score_images(table, scorer)
    assert {AESTHETIC_SCORE, WATERMARK_PROB, SCORES_SOURCE, EMBEDDING} <= set(out.column_names)
    assert out.num_rows == 0


def test_existing_score_columns_keep_values_on_unscored_rows(table: pa.Table, scorer: Scorer) -> None:
    table = table.append_column(AESTHETIC_SCORE, pa.array([7.5] * table.num_rows, pa.float64()))
    out = score_images(table, scorer)
    assert out[AESTHETIC_SCORE][6].as_py() == 7.5 and out[AESTHETIC_SCORE][0].as_py() != 7.5
    assert out.schema.field(AESTHETIC_SCORE).type == pa.float32()


def test_same_models_are_reused_within_a_process(tiny_config: Config, scorer: Scorer) -> None:
    assert load_scorer(tiny_config) is scorer


def test_missing_weight_raises_before_scoring_and_names_the_option(tiny_config: Config, tmp_path) -> None:
    config = Config(**{**tiny_config.to_dict(), "watermark_weights": str(tmp_path / "absent.pt")})
    with pytest.raises(WeightsError, match="--watermark-weights"):
        load_scorer(config)


def test_run_with_model_scores_keeps_what_the_scores_say(tmp_path, corpus_factory, config_factory, tiny_config) -> None:
    corpus = corpus_factory(16)
    models = {name: getattr(tiny_config, name)
              for name in ("clip_weights", "aesthetic_weights", "watermark_weights", "safety_weights")}
    # a random tiny CLIP maps these smooth images close together: leave semantic dedup out of this run
    config = config_factory(
        scores="model", device="cpu", batch_size=8, threshold=-1e9, dedup=["url", "exact", "phash"], world_size=2,
        workers_per_rank=1, **models
    )
    out = tmp_path / "out"
    run_local([str(corpus.path)], out, config)
    everything = pq.read_table(out / "samples.parquet")["aesthetic_score"].to_numpy()
    threshold = float(np.median(everything))
    stats = recut(out, Config(**{**config.to_dict(), "threshold": threshold}))
    kept = pq.read_table(out / "samples.parquet")["aesthetic_score"].to_numpy()
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    low = [float(row["detail"]) for row in ledger if row["reason"] == "low_aesthetic"]
    assert stats["input_rows"] == stats["kept"] + stats["dropped"] == len(corpus.rows)
    assert len(kept) and len(low) and kept.min() >= threshold > max(low)
    clip = ClipEncoder.load(models["clip_weights"], precision=config.precision)  # the run's (bf16 where native)
    head = AestheticPredictor.load(models["aesthetic_weights"])
    shard = json.loads((out / "shards" / "index.json").read_text())["shardlist"][0]["url"]
    for sample in wds.WebDataset(str(out / "shards" / shard), shardshuffle=False):
        meta = json.loads(sample["json"])
        assert meta["scores_source"] == "model"
        rescored = head.predict(clip.encode([Image.open(io.BytesIO(sample["jpg"]))]))[0]
        assert abs(rescored - meta["aesthetic_score"]) < 1e-3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU exists")
def test_cuda_without_gpu_names_the_option(tiny_config: Config) -> None:
    with pytest.raises(ValueError, match="--device"):
        load_scorer(Config(**{**tiny_config.to_dict(), "device": "cuda"}))


@pytest.mark.gpu
def test_cuda_bf16_scores_close_to_cpu(tiny_config: Config, table: pa.Table) -> None:
    cpu = score_images(table, load_scorer(tiny_config))
    gpu = score_images(table, load_scorer(Config(**{**tiny_config.to_dict(), "device": "cuda", "batch_size": 64})))
    assert gpu[DROP_REASON].to_pylist() == cpu[DROP_REASON].to_pylist()
    for name, tolerance in ((AESTHETIC_SCORE, 0.1), (WATERMARK_PROB, 0.02)):
        pairs = [(a, b) for a, b in zip(cpu[name].to_pylist(), gpu[name].to_pylist(), strict=True) if a is not None]
        assert pairs and max(abs(a - b) for a, b in pairs) < tolerance


def test_punsafe_is_the_detector_on_the_embedding_and_replaces_the_metadata(table: pa.Table, scorer: Scorer) -> None:
    assert scorer.safety is not None  # load_scorer always builds it under --scores model
    table = table.append_column(PUNSAFE, pa.array([0.25] * table.num_rows, pa.float64()))
    out = score_images(table, scorer)
    assert out.schema.field(PUNSAFE).type == pa.float32()
    assert [out[PUNSAFE][i].as_py() for i in (2, 3, 4, 6)] == [0.25] * 4  # unscored rows keep the metadata's
    images = [Image.open(io.BytesIO(table["jpg"][i].as_py())) for i in (0, 1, 5, 7)]
    expected = scorer.safety.predict(scorer.clip.encode(images))
    got = np.array([out[PUNSAFE][i].as_py() for i in (0, 1, 5, 7)], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert 0.25 not in got.tolist()


def test_missing_safety_weights_stop_the_run_before_any_download(tmp_path, corpus_factory, config_factory,
                                                                  tiny_config: Config) -> None:
    corpus = corpus_factory(4)
    models = {name: getattr(tiny_config, name) for name in ("clip_weights", "aesthetic_weights", "watermark_weights")}
    config = config_factory(scores="model", device="cpu", safety_weights=str(tmp_path / "absent.zip"), **models)
    with pytest.raises(WeightsError, match="--safety-weights"):
        run_local([str(corpus.path)], tmp_path / "out", config)
    assert not (tmp_path / "out" / "stages" / "download").exists()


def test_max_unsafe_cuts_the_model_punsafe_on_a_recut(tmp_path, corpus_factory, config_factory, tiny_config) -> None:
    corpus = corpus_factory(16)
    models = {name: getattr(tiny_config, name)
              for name in ("clip_weights", "aesthetic_weights", "watermark_weights", "safety_weights")}
    config = config_factory(scores="model", device="cpu", batch_size=8, threshold=-1e9, dedup=["url"], world_size=2,
                            workers_per_rank=1, **models)
    out = tmp_path / "out"
    run_local([str(corpus.path)], out, config)
    scored = pa.concat_tables(pq.read_table(p) for p in sorted((out / "stages" / "score").glob("part-*.parquet")))
    unsafe = scored.filter(pc.equal(scored[SCORES_SOURCE], "model"))[PUNSAFE].to_numpy()
    cut = float(np.median(unsafe))
    recut(out, Config(**{**config.to_dict(), "max_unsafe": cut}))
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    dropped = [float(row["detail"]) for row in ledger if row["reason"] == "unsafe"]
    assert dropped and min(dropped) > cut
    selected = pa.concat_tables(pq.read_table(p) for p in sorted((out / "stages" / "select").glob("part-*.parquet")))
    kept = selected.filter(pc.is_null(selected[DROP_REASON]))[PUNSAFE].to_numpy()
    assert len(kept) and kept.max() <= np.float32(cut)
