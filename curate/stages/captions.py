"""Caption checks on metadata: too few words, too many CLIP tokens, junk alt-text, language.

Each is a flagger over an Arrow table run by the prefilter after its other checks, so it judges only the rows still
alive. Word counts and the junk patterns are Arrow kernels; token counts and languages are one linear pass in Python
(CLIP's BPE with a per-word cache; py3langid), done only when their option is on.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import CAPTION
from curate.stages.verdict import alive, with_reason

STAGE = "prefilter"
CLIP_CONTEXT = 77  # CLIP's text context, start and end tokens included: SD/SDXL training truncates past it
LANGUAGE_MIN_CONFIDENCE = 0.5  # py3langid's normalized probability; below it a short caption's language is unknown
REPAIR_MARGIN = 8  # tokens: a count this far under the limit without ftfy's repairs stays under it with them
REPEATS_FOR_JUNK = 3  # "Bora Bora" and "bye bye" are captions; "shoes shoes shoes" is keyword stuffing

# Whole captions that are camera or upload file names, bare URLs (Arrow's RE2 syntax, matched case-insensitively).
_IMAGE_EXTENSIONS = r"(jpe?g|png|gif|webp|bmp|tiff?|heic|avif)"
JUNK_PATTERNS = {
    "file_name": rf"(?i)^\s*[\w\-. ()\[\]]*\.{_IMAGE_EXTENSIONS}\s*$",
    "camera_name": r"(?i)^\s*(img|dsc|dscn|dscf|dcim|pxl|mvimg|gopr|dji|sam|wp|p)[_\- ]?\d{3,}[\w\-~ ()]*\s*$",
    "url": r"(?i)^\s*(https?://|www\.)\S+\s*$",
}


def word_counts(captions: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Whitespace-separated words per caption (null stays null)."""
    return pc.count_substring_regex(captions, r"\S+")


def flag_short_captions(table: pa.Table, min_words: int) -> pa.Table:
    """Captions with fewer than min_words words (DataComp keeps more than 2); 0 turns the check off."""
    if min_words <= 0:
        return table
    words = word_counts(table[CAPTION])
    return with_reason(table, pc.less(words, min_words), STAGE, "short_caption", pc.cast(words, pa.string()))


def junk_kinds(captions: pa.ChunkedArray | pa.Array) -> list[str | None]:
    """Per caption, why it is junk alt-text (file_name, camera_name, url, repeated_word) or None."""
    kinds: pa.ChunkedArray | pa.Array = pa.nulls(len(captions), pa.string())
    for kind, pattern in reversed(JUNK_PATTERNS.items()):  # reversed: the first pattern that matches names it
        kinds = pc.if_else(pc.fill_null(pc.match_substring_regex(captions, pattern), False), kind, kinds)
    out = kinds.to_pylist()
    for index, caption in enumerate(captions.to_pylist()):
        if out[index] is None and caption and _one_word_repeated(caption):
            out[index] = "repeated_word"
    return out


def _one_word_repeated(caption: str) -> bool:
    words = caption.lower().split()
    return len(words) >= REPEATS_FOR_JUNK and all(word == words[0] for word in words)


def flag_junk_captions(table: pa.Table) -> pa.Table:
    kinds = junk_kinds(table[CAPTION])
    return with_reason(table, pa.array([kind is not None for kind in kinds]), STAGE, "junk_caption", kinds)


# -- CLIP tokens ------------------------------------------------------------------------------------------------


@cache
def _bpe_ranks() -> dict[tuple[str, str], int]:
    """open_clip's merges (its packaged vocabulary), read without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("counting CLIP tokens needs open_clip_torch installed (its BPE vocabulary)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    return {tuple(merge.split()): rank for rank, merge in enumerate(merges)}  # type: ignore[misc]


@cache
def _byte_encoder() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")  # open_clip keeps these whole, even inside a caption


@cache
def _pre_tokens() -> Any:
    import regex

    words = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # open_clip's SimpleTokenizer.pat
    return regex.compile("|".join((*_SPECIAL_TOKENS, words)), regex.IGNORECASE)


@lru_cache(maxsize=1 << 18)
def _bpe_length(word: str) -> int:
    """How many BPE tokens CLIP's tokenizer makes of one pre-token (open_clip's SimpleTokenizer.bpe)."""
    if word in _SPECIAL_TOKENS:
        return 1
    encoder, ranks = _byte_encoder(), _bpe_ranks()
    symbols = [encoder[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    while len(symbols) > 1:
        pairs = {(symbols[i], symbols[i + 1]) for i in range(len(symbols) - 1)}
        best = min(pairs, key=lambda pair: ranks.get(pair, 1 << 30))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return len(symbols)


def clip_token_count(caption: str, repair: bool = True) -> int:
    """Tokens open_clip's tokenizer gives the caption (lowercased, cleaned), start and end tokens not counted.
    repair=False skips ftfy's repairs (4x faster on non-ASCII text, off by a token or two on mojibake)."""
    if not caption.isascii() or "&" in caption or not caption.isprintable():  # what ftfy/html would change
        if repair:
            import ftfy

            caption = ftfy.fix_text(caption)
        caption = html.unescape(html.unescape(caption)).strip()
    text = " ".join(caption.split()).lower()
    return sum(_bpe_length(word) for word in _pre_tokens().findall(text))


def token_counts(captions: pa.ChunkedArray | pa.Array, limit: int | None = None) -> pa.Array:
    """CLIP token counts (without start/end) per caption; null for a null caption. With a limit, a count
    more than REPAIR_MARGIN under it is taken without ftfy's repairs (the verdict is the same, at a quarter of the
    cost); one near or over it is counted again with them, as mojibake can hold many more tokens than its repair."""
    counts: list[int | None] = []
    for caption in captions.to_pylist():
        if caption is None:
            counts.append(None)
            continue
        count = clip_token_count(caption, repair=limit is None)
        if limit is not None and count >= limit - REPAIR_MARGIN and not caption.isascii():
            count = clip_token_count(caption)
        counts.append(count)
    return pa.array(counts, pa.int64())


def may_exceed(captions: pa.ChunkedArray | pa.Array, max_tokens: int) -> pa.ChunkedArray | pa.Array:
    """False where a caption surely fits max_tokens (start and end included): printable ASCII without '&' is left
    as it is by the tokenizer's cleaning, and every BPE token holds at least one of its non-space characters."""
    plain = pc.and_(pc.string_is_ascii(captions), pc.invert(pc.match_substring_regex(captions, r"[&\x00-\x1f\x7f]")))
    non_space = pc.subtract(pc.utf8_length(captions), pc.count_substring_regex(captions, r"\s"))
    return pc.fill_null(pc.invert(pc.and_(plain, pc.less_equal(non_space, max_tokens - 2))), False)


def flag_long_captions(table: pa.Table, max_tokens: int | None) -> pa.Table:
    """Captions longer than max_tokens CLIP tokens (start and end tokens included, as the context of 77 counts);
    exact counts only for the captions a cheap bound cannot clear."""
    if max_tokens is None:
        return table
    captions = table[CAPTION]
    candidates = may_exceed(captions, max_tokens)
    counts = pc.add(token_counts(pc.if_else(candidates, captions, pa.scalar(None, captions.type)), max_tokens - 2), 2)
    return with_reason(table, pc.greater(counts, max_tokens), STAGE, "long_caption", pc.cast(counts, pa.string()))


# -- language ---------------------------------------------------------------------------------------------------


@cache
def _language_identifier() -> Any:
    """py3langid's model, shipped inside the package: loaded once per process, never downloaded."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def known_languages() -> list[str]:
    """The language codes py3langid's model can answer."""
    return list(_language_identifier().nb_classes)


def detect_languages(captions: list[str | None]) -> list[tuple[str, float] | None]:
    """(ISO 639-1 code, probability) per caption, None for a null caption."""
    identifier = _language_identifier()
    return [None if c is None else (lambda r: (r[0], float(r[1])))(identifier.classify(c)) for c in captions]


def flag_languages(table: pa.Table, languages: list[str]) -> pa.Table:
    """Captions whose detected language is confidently (LANGUAGE_MIN_CONFIDENCE) outside languages; [] is off."""
    if not languages:
        return table
    live = pc.fill_null(alive(table), False).to_numpy(zero_copy_only=False)
    captions = table[CAPTION].to_pylist()
    detected = detect_languages([c if keep else None for c, keep in zip(captions, live, strict=True)])
    foreign = [d is not None and d[0] not in languages and d[1] >= LANGUAGE_MIN_CONFIDENCE for d in detected]
    details = [None if d is None else f"{d[0]} {d[1]:.2f}" for d in detected]
    return with_reason(table, pa.array(foreign), STAGE, "caption_language", details)


def flag_captions(table: pa.Table, min_words: int, max_tokens: int | None, junk: bool,
                  languages: list[str]) -> pa.Table:
    """Every caption check, the most specific reason first (IMG_1234.JPG is junk before it is one word), the slow
    ones last; the language model sees only the rows still alive after the others."""
    if junk:
        table = flag_junk_captions(table)
    table = flag_short_captions(table, min_words)
    table = flag_long_captions(table, max_tokens)
    return flag_languages(table, languages)
