"""Caption checks: words, CLIP tokens (against open_clip's own tokenizer), junk alt-text, language; in the prefilter."""

import random
import string
import time

import pyarrow as pa
import pytest

from curate.stages import captions as captions_module
from curate.stages.captions import (
    LONG_CAPTION_EXACT_TOKENS,
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


def test_scripts_without_spaces_count_words_as_tokenizers_split_them():
    """Chinese, Japanese and Thai captions were one word each (split on spaces), so the sdxl recipe dropped them."""
    # 18 Thai letters: 5 words
    captions = {"一只黑猫": 4, "東京タワーの夜景": 8, "夕暮れの海": 5, "แมวนอนบนโซฟาสีแดง": 5,
                "a photo of 東京": 5, "한국 고양이 사진": 3, "photo\u3000de chat": 3, "a  black\tcat": 3}
    table = _table(list(captions))
    assert captions_module.word_counts(table["caption"]).to_pylist() == list(captions.values())
    out = flag_short_captions(_table(["猫", "黒猫", "黒い猫", "แมว", "แมวดำตัวใหญ่"]), 3)  # the sdxl recipe's 3 words
    assert out["drop_reason"].to_pylist() == ["short_caption", "short_caption", None, "short_caption", None]


def test_junk_alt_text_kinds():
    junk = {"IMG_1234.JPG": "file_name", "my holiday photo.png": "file_name", "DSC0001": "camera_name",
            "DSC_0042": "camera_name", "PXL_20230101_123456789": "camera_name", "https://example.com/a.jpg": "url",
            "www.example.com/x": "url", "sale sale sale": "repeated_word", "Sale SALE sale sale": "repeated_word",
            "dog dog dog v17": "repeated_word", "shoes, shoes, shoes! cheap": "repeated_word",  # 3 of 4 words
            "猫猫猫猫": "repeated_word"}
    fine = ["Bora Bora", "bye bye", "the cat and the dog and the bird", "New York New York skyline",
            "bye bye bye my love, forever and ever", "a photo.jpg of a cat on a mat", "Photo 2019", "IMG of a dog",
            "Visit example.com", "dsc lens review", "a cat"]
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


MEGABYTE = 1_000_000


def _random_word(rng, length):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(length))


HOSTILE = {  # built when a test asks: a megabyte each
    "one word": lambda rng: "a" * MEGABYTE,
    "one random word": lambda rng: _random_word(rng, MEGABYTE),
    "many words": lambda rng: " ".join(_random_word(rng, rng.randint(1, 12)) for _ in range(MEGABYTE // 7))[:MEGABYTE],
    "digits": lambda rng: "7" * MEGABYTE,
    "non-ascii word": lambda rng: "é" * (MEGABYTE // 2),
    "non-ascii words": lambda rng: ("café crème brûlée " * (MEGABYTE // 18))[:MEGABYTE],
}


@pytest.fixture
def merged_bytes(monkeypatch):
    """Bytes that went through CLIP's BPE merges (uncached), per call: the work a caption costs."""
    calls: list[int] = []
    merge = captions_module._bpe_merge

    def counting(word):
        calls.append(len(word.encode("utf-8")))
        return merge(word)

    captions_module._cached_bpe_length.cache_clear()
    monkeypatch.setattr(captions_module, "_bpe_merge", counting)
    yield calls
    captions_module._cached_bpe_length.cache_clear()


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_megabyte_caption_is_long_at_the_cost_of_the_bound(kind, merged_bytes):
    """A megabyte caption (the BPE merge loop was quadratic in a word's length: 1-2.5 s for one, minutes for a
    random one) is long_caption with a bounded detail; the merges stop once the count passes the bound."""
    caption = HOSTILE[kind](random.Random(3))
    started = time.perf_counter()
    out = flag_long_captions(_table([caption]), 77)
    elapsed = time.perf_counter() - started
    assert out["drop_reason"].to_pylist() == ["long_caption"]
    assert out["drop_detail"].to_pylist() == [f">{LONG_CAPTION_EXACT_TOKENS}"]
    longest = captions_module._longest_token_bytes()
    assert len(merged_bytes) <= 2 * LONG_CAPTION_EXACT_TOKENS  # pre-tokens merged: unrepaired pass + repaired one
    assert sum(merged_bytes) <= 2 * 2 * LONG_CAPTION_EXACT_TOKENS * longest
    if caption.isascii():  # non-ASCII ones still pay ftfy's linear pass (about 0.5 s a megabyte)
        assert elapsed < 2  # loose: about 0.05 s
    if kind in ("one word", "one random word", "non-ascii word"):
        assert merged_bytes == []  # longer than the bound's tokens can cover: never merged


def test_counts_up_to_the_cap_are_open_clips_and_past_it_say_so():
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    rng = random.Random(1)
    alphabet = string.ascii_lowercase * 3 + string.digits + string.punctuation + "  éüßÃ©中文😀ﬁ&;"
    captions = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 400))) for _ in range(150)]
    captions += ["a" * 300, "ab" * 200, "😂" * 70, "<start_of_text>" * 5, "cat " * 40]
    captions += [" ".join(rng.sample(captions, 40)) for _ in range(6)]  # past _WHOLE_TEXT_CHARS: counted word by word
    assert max(map(len, captions)) > captions_module._WHOLE_TEXT_CHARS
    for caption in captions:
        exact = len(tokenizer.encode(caption))
        for cap in (0, 1, 5, 17, 60, 150, 1000, 5000):
            assert clip_token_count(caption, cap=cap) == (exact if exact <= cap else cap + 1), (caption, cap)


def test_a_cap_just_at_or_past_the_count_is_exact_for_dense_long_words():
    """The longest tokens (32 bytes: runs of one emoji) are where a word too long to merge is judged by its bytes."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    captions = ["a " * 2100 + "😂" * 800, "a " * 2100 + "😂" * 799 + " cat", "b " * 2100 + "x" * 900 + " 7"]
    for caption in captions:
        exact = len(tokenizer.encode(caption))
        assert [clip_token_count(caption, cap=cap) for cap in (exact - 1, exact, exact + 1)] == [exact] * 3


@pytest.mark.parametrize("max_tokens", [77, 300])
def test_long_caption_details_are_exact_up_to_the_bound(max_tokens):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    bound = max(LONG_CAPTION_EXACT_TOKENS, 4 * max_tokens)
    rng = random.Random(max_tokens)
    words = ["cat", "harbor", "naïve", "CafÃ©", "😀", "x" * 90, "&amp;", "Ｆｕｌｌ"]
    captions = [" ".join(["cat"] * n) for n in (max_tokens - 3, max_tokens - 2, bound - 3, bound - 2, bound - 1)]
    captions += [" ".join(rng.choice(words) for _ in range(rng.randint(max_tokens // 4, bound // 2)))
                 for _ in range(12)]
    captions += ["y" * (40 * bound)]  # one word: more tokens than the bound, whatever its merges
    out = flag_long_captions(_table(captions), max_tokens)
    for caption, reason, detail in zip(captions, out["drop_reason"].to_pylist(), out["drop_detail"].to_pylist(),
                                       strict=True):
        total = len(tokenizer.encode(caption)) + 2
        assert reason == ("long_caption" if total > max_tokens else None)
        if reason:
            assert detail == (str(total) if total <= bound else f">{bound}")


def test_ascii_control_characters_are_counted_as_ftfy_removes_them():
    """ftfy drops control characters and terminal escapes: an ASCII caption full of them fits."""
    from open_clip.tokenizer import SimpleTokenizer

    captions = ["a cat " + "\x01" * 80, "a red \x1b[31m cat " * 20]
    counts = token_counts(pa.array(captions), 75).to_pylist()
    assert counts == [len(SimpleTokenizer().encode(c)) for c in captions]
    assert flag_long_captions(_table(captions), 77)["drop_reason"].to_pylist() == [None, None]
