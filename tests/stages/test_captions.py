"""Caption checks: words, CLIP tokens (against open_clip's own tokenizer), junk alt-text, language; in the prefilter."""

import random
import string

import pyarrow as pa
import pytest

from curate.stages.captions import (
    REPAIR_MARGIN,
    clip_token_count,
    flag_captions,
    flag_junk_captions,
    flag_languages,
    flag_long_captions,
    flag_short_captions,
    junk_kinds,
    token_counts,
)
from curate.stages.ingest import normalize
from curate.stages.prefilter import prefilter
from curate.stages.verdict import with_verdict_columns


def _table(captions):
    return with_verdict_columns(pa.table({"caption": pa.array(captions, pa.string())}))


def test_short_captions_need_min_words_and_zero_is_off():
    table = _table(["a cat", "a black cat", "  two   words ", None, "one"])
    out = flag_short_captions(table, 3)
    assert out["drop_reason"].to_pylist() == ["short_caption", None, "short_caption", None, "short_caption"]
    assert out["drop_detail"].to_pylist() == ["2", None, "2", None, "1"]
    assert flag_short_captions(table, 0)["drop_reason"].null_count == table.num_rows


def test_junk_alt_text_kinds():
    junk = {"IMG_1234.JPG": "file_name", "my holiday photo.png": "file_name", "DSC0001": "camera_name",
            "DSC_0042": "camera_name", "PXL_20230101_123456789": "camera_name", "https://example.com/a.jpg": "url",
            "www.example.com/x": "url", "sale sale sale": "repeated_word", "Sale SALE sale sale": "repeated_word"}
    fine = ["Bora Bora", "bye bye", "a photo.jpg of a cat on a mat", "Photo 2019", "IMG of a dog", "Visit example.com",
            "dsc lens review", "a cat"]
    kinds = junk_kinds(pa.array(list(junk) + fine + [None]))
    assert kinds == [*junk.values(), *[None] * len(fine), None]
    out = flag_junk_captions(_table(["IMG_1234.JPG", "a cat"]))
    assert out["drop_reason"].to_pylist() == ["junk_caption", None]
    assert out["drop_detail"][0].as_py() == "file_name"


def test_token_counts_are_open_clips():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + "   éüßÃ©中文😀ﬁＡ&;—“”'\t\n"
    captions = ["A photo of a cat", "Schöne Landschaft &amp; Berge", "CafÃ© “quoted” — ﬁne ＦＵＬＬ", "it's we're",
                "<start_of_text> odd", "hello\tworld\nnew", "x" * 300]
    captions += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 90))) for _ in range(400)]
    assert [clip_token_count(c) for c in captions] == [len(tokenizer.encode(c)) for c in captions]


def test_long_captions_count_start_and_end_tokens():
    fits = " ".join(["cat"] * 75)  # 75 + start + end = 77: CLIP's whole context
    table = _table([fits, fits + " cat", "short", None])
    out = flag_long_captions(table, 77)
    assert out["drop_reason"].to_pylist() == [None, "long_caption", None, None]
    assert out["drop_detail"][1].as_py() == "78"
    assert flag_long_captions(table, None)["drop_reason"].null_count == table.num_rows


@pytest.mark.parametrize("extra", range(-REPAIR_MARGIN - 2, REPAIR_MARGIN + 3, 3))
def test_non_ascii_captions_near_the_limit_are_counted_exactly(extra):
    caption = " ".join(["CafÃ©"] * (20 + extra))  # mojibake: ftfy's repair changes the count
    limit = clip_token_count(caption, repair=False) - extra
    exact = clip_token_count(caption)
    near = token_counts(pa.array([caption]), limit)[0].as_py()
    assert (near > limit) == (exact > limit)
    if abs(extra) <= REPAIR_MARGIN:
        assert near == exact


def test_languages_flag_confident_foreign_captions_only():
    captions = ["A red vintage sofa in a bright living room", "Schöne Landschaft mit hohen Bergen und Seen",
                "Paysage de montagne en été avec un lac", "sunset", None]
    out = flag_languages(_table(captions), ["en"])
    assert out["drop_reason"].to_pylist() == [None, "caption_language", "caption_language", None, None]
    assert out["drop_detail"][1].as_py().startswith("de ") and out["drop_detail"][2].as_py().startswith("fr ")
    assert flag_languages(_table(captions), ["en", "de", "fr"])["drop_reason"].null_count == len(captions)
    assert flag_languages(_table(captions), [])["drop_reason"].null_count == len(captions)


def test_language_detection_skips_rows_already_flagged():
    table = flag_captions(_table(["Schöne", "Schöne Landschaft mit hohen Bergen und Seen"]), 2, None, False, ["en"])
    assert table["drop_reason"].to_pylist() == ["short_caption", "caption_language"]


def test_prefilter_runs_the_caption_checks_last():
    ok = {"WIDTH": 800.0, "HEIGHT": 600.0}
    rows = [{"URL": "http://a.com/1.jpg", "TEXT": "a black cat on a mat", **ok},
            {"URL": "http://a.com/2.jpg", "TEXT": "IMG_1234.JPG", **ok},
            {"URL": "http://a.com/3.jpg", "TEXT": "IMG_1234.JPG", "WIDTH": 100.0, "HEIGHT": 100.0},
            {"URL": "http://a.com/4.jpg", "TEXT": "cat", **ok},
            {"URL": "http://a.com/5.jpg", "TEXT": "Schöne Landschaft mit hohen Bergen und Seen", **ok}]
    table = normalize(pa.Table.from_pylist(rows), 0)
    out = prefilter(table, None, min_size=512, max_watermark=None, max_unsafe=None, aesthetic_threshold=None,
                    min_caption_words=3, junk_captions=True, languages=["en"])
    assert out["drop_reason"].to_pylist() == [None, "junk_caption", "metadata_low_resolution", "short_caption",
                                              "caption_language"]
    off = prefilter(table, None, min_size=512, max_watermark=None, max_unsafe=None, aesthetic_threshold=None)
    assert off["drop_reason"].to_pylist() == [None, None, "metadata_low_resolution", None, None]


def test_mojibake_far_over_the_limit_unrepaired_is_judged_on_its_repaired_count():
    """Garbled accents count far more tokens unrepaired than repaired: a caption that fits once repaired is kept."""
    caption = "the Ã©cole cafÃ© on the corner " * 6
    repaired = clip_token_count(caption)
    assert clip_token_count(caption, repair=False) - repaired > REPAIR_MARGIN
    out = flag_long_captions(_table([caption]), repaired + 2)  # exactly fits, start and end tokens included
    assert out["drop_reason"].to_pylist() == [None]
    out = flag_long_captions(_table([caption]), repaired + 1)
    assert out["drop_reason"].to_pylist() == ["long_caption"] and out["drop_detail"][0].as_py() == str(repaired + 2)
