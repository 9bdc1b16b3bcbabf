"""clip_score in the score stage: the cosine of the image and caption embeddings, null where there is no caption."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.config import Config
from curate.models.testing import two_tone_jpeg as jpeg
from curate.models.testing import write_tiny_weights
from curate.schema import CAPTION, CLIP_SCORE, DROP_REASON
from curate.stages.score import Scorer, load_scorer, score_images
from curate.stages.verdict import with_reason, with_verdict_columns


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    weights = write_tiny_weights(tmp_path_factory.mktemp("weights"))
    return load_scorer(Config(device="cpu", batch_size=2, model_cache=str(tmp_path_factory.mktemp("cache")),
                              **weights))


CAPTIONS = ["a red square on green", None, "   ", "a photo of a cat", "flagged before scoring", "broken image",
            "a blue poster " * 40, "x"]


@pytest.fixture()
def table() -> pa.Table:
    images = [jpeg((30 * i, 200 - 20 * i, 90), (320 + 40 * i, 240)) for i in range(len(CAPTIONS))]
    images[5] = b"\xff\xd8 not a jpeg"
    table = pa.table({"key": [f"{i:03d}" for i in range(len(images))], "jpg": pa.array(images, pa.binary()),
                      CAPTION: pa.array(CAPTIONS, pa.string())})
    return with_reason(with_verdict_columns(table), np.arange(len(images)) == 4, "prefilter", "too_small")


def test_clip_score_is_the_cosine_of_the_image_and_its_caption(table: pa.Table, scorer: Scorer) -> None:
    out = score_images(table, scorer)
    assert out.schema.field(CLIP_SCORE).type == pa.float32()
    scores = out[CLIP_SCORE].to_pylist()
    with_caption = [0, 3, 6, 7]
    assert [i for i, value in enumerate(scores) if value is not None] == with_caption
    assert out[DROP_REASON].to_pylist()[5] == "decode_failed"
    assert scorer.clip.text is not None
    images = scorer.clip.encode([Image.open(io.BytesIO(table["jpg"][i].as_py())) for i in with_caption])
    texts = scorer.clip.text.encode([CAPTIONS[i] for i in with_caption])
    expected = (images * texts).sum(axis=1)
    np.testing.assert_allclose([scores[i] for i in with_caption], expected, atol=1e-4)
    assert all(-1.0 <= scores[i] <= 1.0 for i in with_caption)


def test_the_score_does_not_depend_on_the_batch(table: pa.Table, scorer: Scorer) -> None:
    whole = score_images(table, scorer)[CLIP_SCORE].to_pylist()
    alone = score_images(table.slice(3, 1), scorer)[CLIP_SCORE].to_pylist()
    assert alone[0] == pytest.approx(whole[3], abs=1e-5)


def test_no_caption_column_gives_null_scores(table: pa.Table, scorer: Scorer) -> None:
    out = score_images(table.drop_columns([CAPTION]), scorer)
    assert out[CLIP_SCORE].null_count == out.num_rows
    assert out["aesthetic_score"].null_count < out.num_rows  # the images were still scored


def test_min_clip_score_drops_below_and_uncaptioned_rows_with_reasons() -> None:
    from curate.stages.select import flag_low_clip_score

    values = pa.array([0.31, 0.2, None, float(np.float32(0.25)), 0.2500001], pa.float32())
    table = with_verdict_columns(pa.table({"key": list("abcde"), CLIP_SCORE: values}))
    out = flag_low_clip_score(table, 0.25)
    assert out[DROP_REASON].to_pylist() == [None, "low_clip_score", "no_clip_score", None, None]
    assert out["drop_detail"].to_pylist()[1:3] == ["0.2", "no caption"]  # the value as its column stored it
    assert flag_low_clip_score(table, None)[DROP_REASON].null_count == table.num_rows  # off by default


def test_min_clip_score_without_the_column_says_why() -> None:
    from curate.stages.select import select

    table = with_verdict_columns(pa.table({"key": ["a"], "original_width": [800], "original_height": [800],
                                           "aesthetic_score": pa.array([6.0], pa.float32()),
                                           "watermark_prob": pa.array([0.1], pa.float32())}))
    out = select(table, 512, 5.0, 0.8, None, min_clip_score=0.2)
    assert out[DROP_REASON].to_pylist() == ["no_clip_score"] and "text tower" in out["drop_detail"][0].as_py()
    assert select(table, 512, 5.0, 0.8)[DROP_REASON].to_pylist() == [None]


def test_min_clip_score_option_is_checked() -> None:
    from curate.config import load_config
    from curate.pipeline.steps import RERUN_OPTIONS, options_read_by

    assert load_config(None, {"min_clip_score": 0.2}).min_clip_score == 0.2
    with pytest.raises(ValueError, match=r"--min-clip-score must be a finite number in \[-1, 1\]"):
        load_config(None, {"min_clip_score": 1.5})
    with pytest.raises(ValueError, match="--min-clip-score needs --scores model"):
        load_config(None, {"min_clip_score": 0.2, "scores": "metadata"})
    assert "min_clip_score" in RERUN_OPTIONS and "min_clip_score" not in options_read_by("score")
