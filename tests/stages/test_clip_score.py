"""clip_score in the score stage: the cosine of the image and caption embeddings, null where there is no caption."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate.config import Config
from curate.models.testing import write_tiny_weights
from curate.schema import CAPTION, CLIP_SCORE, DROP_REASON
from curate.stages.score import Scorer, load_scorer, score_images
from curate.stages.verdict import with_reason, with_verdict_columns


def jpeg(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1] // 2, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


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
