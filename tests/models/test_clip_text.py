"""CLIP text tower: the tiny open_clip config of the real architecture, against open_clip's own encode_text."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from curate.models import ClipEncoder
from curate.models.clip_text import CONTEXT_LENGTH

CAPTIONS = [
    "a photo of a cat",
    "Vintage poster of a rocket, 1950s, red and blue, printed on paper #12",
    "ÉTÉ à Paris — la tour Eiffel la nuit",
    "x",
    " ".join(f"word{i}" for i in range(120)),  # past the 77-token context
]


@pytest.fixture(scope="module")
def encoder(tiny_weights: dict[str, str]) -> ClipEncoder:
    return ClipEncoder.load(tiny_weights["clip_weights"])


def test_text_embeddings_equal_open_clip_encode_text(tiny_weights: dict[str, str], encoder: ClipEncoder) -> None:
    reference = open_clip.create_model(f"local-dir:{tiny_weights['clip_weights']}", force_quick_gelu=True).eval()
    tokens = open_clip.get_tokenizer("ViT-L-14")(CAPTIONS)
    with torch.no_grad():
        expected = reference.encode_text(tokens, normalize=True).numpy()
    assert encoder.text is not None
    ours = encoder.text.encode(CAPTIONS)
    assert ours.shape == (len(CAPTIONS), 768) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert len({tuple(np.round(row, 4)) for row in ours}) == len(CAPTIONS)  # the captions are told apart


def test_long_captions_are_truncated_to_the_context(encoder: ClipEncoder) -> None:
    assert encoder.text is not None
    tokens = encoder.text.tokenize(CAPTIONS)
    assert tokens.shape == (len(CAPTIONS), CONTEXT_LENGTH)
    end_of_text = encoder.text.tokenizer.eot_token_id
    assert int(tokens[-1, -1]) == end_of_text  # cut at 77, the last token kept as end-of-text
    assert int(tokens[0].argmax()) == 6  # start, "a photo of a cat" (5), end: the short one is not padded to 77
    longer = CAPTIONS[-1] + " and many more words after the cut"
    np.testing.assert_allclose(encoder.text.encode([longer]), encoder.text.encode([CAPTIONS[-1]]), atol=1e-6)


def test_batches_cut_to_their_longest_caption_change_nothing(encoder: ClipEncoder) -> None:
    assert encoder.text is not None
    tokens = encoder.text.tokenize(CAPTIONS * 3)
    one_batch = encoder.text.embed(tokens).numpy()
    pairs = encoder.text.embed(tokens, batch_size=2).numpy()
    np.testing.assert_allclose(pairs, one_batch, atol=1e-6)
    np.testing.assert_allclose(one_batch[: len(CAPTIONS)], one_batch[len(CAPTIONS) : 2 * len(CAPTIONS)], atol=1e-6)
    assert encoder.text.embed(tokens[:0]).shape == (0, 768)


def test_image_only_load_leaves_the_text_tower_out(tiny_weights: dict[str, str]) -> None:
    assert ClipEncoder.load(tiny_weights["clip_weights"], text=False).text is None


def test_bf16_text_tower_stays_close_to_fp32(tiny_weights: dict[str, str], encoder: ClipEncoder) -> None:
    bf16 = ClipEncoder.load(tiny_weights["clip_weights"], precision="bf16")
    assert bf16.text is not None and encoder.text is not None
    block = bf16.text.tower.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16 and block.ln_1.weight.dtype == torch.float32
    ours, reference = bf16.text.encode(CAPTIONS), encoder.text.encode(CAPTIONS)
    assert ours.dtype == np.float32 and np.abs(ours - reference).max() > 0  # bf16 did run
    assert (ours * reference).sum(axis=1).min() > 0.999


def test_the_tokenizer_sees_only_what_the_first_77_tokens_come_from() -> None:
    """bounded(caption) tokenizes as the whole caption does, for long captions of every kind of word (spaces,
    punctuation, entities, digits, long words); a megabyte word is cut before BPE."""
    from open_clip.tokenizer import SimpleTokenizer

    from curate.models.clip_text import WORD_CHARS, bounded

    tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    rng = np.random.default_rng(0)
    pieces = ["sunset", "over", "the", "Alps,", "&amp;", "2019", "dog's", "x" * 300, "Café", "—", "a\tb",
              "IMG_1234.JPG", "naïve", "!!!", "supercalifragilisticexpialidocious" * 5, "  ", "\n"]
    captions = [" ".join(rng.choice(pieces, size=n).tolist()) for n in (5, 76, 77, 78, 150, 400) for _ in range(5)]
    assert torch.equal(tokenizer([bounded(c) for c in captions]), tokenizer(captions))
    huge = "a" * (1 << 20)
    assert len(bounded(huge)) == WORD_CHARS and len(bounded("word " * 100_000).split()) == CONTEXT_LENGTH
