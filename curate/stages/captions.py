"""Caption checks on metadata: too few words, too many CLIP tokens, junk alt-text, language.

Each is a flagger over an Arrow table run by the prefilter after its other checks, so it judges only the rows still
alive. Word counts and the junk patterns are Arrow kernels; token counts and languages are one linear pass in Python
(CLIP's BPE with a per-word cache; py3langid), done only when their option is on.
"""

from __future__ import annotations

import gzip
import heapq
import html
import importlib.util
from collections import Counter
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
LONG_CAPTION_EXACT_TOKENS = 1024  # a long_caption's detail is exact up to max(this, 4 x max_tokens) tokens; past
# that the counting stops and the detail reads ">N" (more than N), so a hostile megabyte costs what N tokens cost
_CACHED_WORD_CHARS = 64  # longer pre-tokens are rare and counted uncached: a cache of them could hold gigabytes
_WHOLE_TEXT_CHARS = 4096  # a caption this short is counted whole, its cost bounded anyway, before any cap is checked
REPEATS_FOR_JUNK = 3  # "Bora Bora" and "bye bye" are captions; "shoes shoes shoes" is keyword stuffing
REPEATED_WORD_SHARE = 0.5  # ... and so is "dog dog dog v17": one word at least 3 times and half the words or more
# Words in scripts written without spaces, as tokenizers split them (curate.stages.captions.word_counts).
_IDEOGRAPHIC = r"\p{Han}\p{Hiragana}\p{Katakana}々ー"  # BERT's basic tokenizer: each ideograph is a word
_SPACELESS = r"\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}"  # no dictionary here: a word per 4 characters of a run
SPACELESS_CHARS_PER_WORD = 4  # Thai's mean word length is ~4-5 characters; rounding up keeps a short caption short
WORD_PATTERN = (rf"[{_IDEOGRAPHIC}]|[{_SPACELESS}]{{1,{SPACELESS_CHARS_PER_WORD}}}"
                rf"|[^\s\p{{Z}}{_IDEOGRAPHIC}{_SPACELESS}]+")

# Whole captions that are camera or upload file names, bare URLs (Arrow's RE2 syntax, matched case-insensitively).
_IMAGE_EXTENSIONS = r"(jpe?g|png|gif|webp|bmp|tiff?|heic|avif)"
JUNK_PATTERNS = {
    "file_name": rf"(?i)^\s*[\w\-. ()\[\]]*\.{_IMAGE_EXTENSIONS}\s*$",
    "camera_name": r"(?i)^\s*(img|dsc|dscn|dscf|dcim|pxl|mvimg|gopr|dji|sam|wp|p)[_\- ]?\d{3,}[\w\-~ ()]*\s*$",
    "url": r"(?i)^\s*(https?://|www\.)\S+\s*$",
}


def word_counts(captions: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Words per caption (null stays null): runs between spaces, except in scripts written without them, where each
    Han ideograph or kana is a word (as BERT's tokenizer splits Chinese) and a run of Thai, Lao, Khmer or Myanmar
    letters is a word per SPACELESS_CHARS_PER_WORD characters, rounded up. Hangul is written with spaces."""
    return pc.count_substring_regex(captions, WORD_PATTERN)


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


@cache
def _words() -> Any:
    import regex

    return regex.compile(WORD_PATTERN)


def _one_word_repeated(caption: str) -> bool:
    """The most common word (word_counts' words, lowercased, edge punctuation off) comes REPEATS_FOR_JUNK times or
    more and makes REPEATED_WORD_SHARE of the words or more."""
    words = [w for w in (word.strip(_PUNCTUATION) for word in _words().findall(caption.lower())) if w]
    if len(words) < REPEATS_FOR_JUNK:
        return False
    top = Counter(words).most_common(1)[0][1]
    return top >= REPEATS_FOR_JUNK and top >= REPEATED_WORD_SHARE * len(words)


_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~。、，！？「」『』（）・…"


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


@cache
def _longest_token_bytes() -> int:
    """The most bytes one BPE token covers (32 in CLIP's vocabulary): a pre-token of b bytes makes at least
    b / this many tokens, whatever its merges."""
    return max(1, *(len((first + second).removesuffix("</w>")) for first, second in _bpe_ranks()))


def _bpe_length(word: str) -> int:
    """How many BPE tokens CLIP's tokenizer makes of one pre-token (open_clip's SimpleTokenizer.bpe)."""
    return _cached_bpe_length(word) if len(word) <= _CACHED_WORD_CHARS else _bpe_merge(word)


@lru_cache(maxsize=1 << 18)
def _cached_bpe_length(word: str) -> int:
    return _bpe_merge(word)


def _bpe_merge(word: str) -> int:
    """open_clip's merge loop in O(n log n) instead of its O(n^2) (a pass over the whole word per merge): each pass
    merges every occurrence of the lowest-ranked pair left to right; pairs the pass creates wait for the next one."""
    if word in _SPECIAL_TOKENS:
        return 1
    encoder, ranks = _byte_encoder(), _bpe_ranks()
    symbols = [encoder[b] for b in word.encode("utf-8")]  # "" once merged into its left neighbour
    symbols[-1] += "</w>"
    size = len(symbols)
    after, before = [*range(1, size), -1], list(range(-1, size - 1))  # a linked list over the live symbols
    heap = [(rank, i) for i in range(size - 1) if (rank := ranks.get((symbols[i], symbols[i + 1]))) is not None]
    heapq.heapify(heap)
    while heap and size > 1:
        rank, merged = heap[0][0], []
        while heap and heap[0][0] == rank:  # one rank is one pair; its occurrences pop left to right
            i = heapq.heappop(heap)[1]
            j = after[i]
            if not symbols[i] or j < 0 or ranks.get((symbols[i], symbols[j])) != rank:
                continue  # stale: merged away, or its pair has grown since it was pushed
            symbols[i], symbols[j], after[i] = symbols[i] + symbols[j], "", after[j]
            if after[i] >= 0:
                before[after[i]] = i
            merged.append(i)
            size -= 1
        for i in merged:
            for left, right in ((before[i], i), (i, after[i])):
                if left >= 0 and right >= 0 and (new := ranks.get((symbols[left], symbols[right]))) is not None:
                    heapq.heappush(heap, (new, left))
    return size


def _plain(caption: str) -> bool:
    """Printable ASCII without '&': what ftfy and html.unescape leave as it is."""
    return caption.isascii() and "&" not in caption and caption.isprintable()


def _count_tokens(text: str, cap: int | None) -> int:
    """Tokens of text's (lowercased) pre-tokens; with a cap, stops once past it and answers cap + 1. A pre-token
    longer than the tokens left before the cap times _longest_token_bytes() surely passes it: it is never merged."""
    if cap is None or len(text) <= _WHOLE_TEXT_CHARS:
        total = sum(map(_bpe_length, _pre_tokens().findall(text)))
        return total if cap is None or total <= cap else cap + 1
    longest, total = _longest_token_bytes(), 0
    for match in _pre_tokens().finditer(text):
        word = match.group()
        if len(word) > (cap - total) * longest:  # len counts characters, at most as many as bytes
            return cap + 1
        total += _bpe_length(word)
        if total > cap:
            return cap + 1
    return total


def clip_token_count(caption: str, repair: bool = True, cap: int | None = None) -> int:
    """Tokens open_clip's tokenizer gives the caption (lowercased, cleaned), start and end tokens not counted.
    repair=False skips ftfy's repairs (4x faster on non-ASCII text, off by a token or two on mojibake).
    With a cap the count is exact up to cap, and any count past it is answered cap + 1 (more than cap): counting
    stops there, and a word too long for the tokens left is never merged, so the BPE's cost is bounded by the cap's.
    A caption that is not plain ASCII is still cleaned whole first (ftfy and html.unescape, about 0.5 s a megabyte):
    ftfy judges mojibake over a whole line, so a prefix's repair need not be the caption's, nor its count."""
    if _plain(caption):  # no cleaning, and no need to collapse spaces: no pre-token holds one
        return _count_tokens(caption.lower(), cap)
    if repair:
        import ftfy

        caption = ftfy.fix_text(caption)
    caption = html.unescape(html.unescape(caption)).strip()
    return _count_tokens(" ".join(caption.split()).lower(), cap)


def token_counts(captions: pa.ChunkedArray | pa.Array, limit: int | None = None, cap: int | None = None) -> pa.Array:
    """CLIP token counts (without start/end) per caption; null for a null caption; with a cap, cap + 1 for any
    count past it (clip_token_count). With a limit, a count more than REPAIR_MARGIN under it is taken without
    ftfy's repairs (the verdict is the same, at a quarter of the cost); one near or over it is counted again with
    them when ftfy would change the caption, as mojibake can hold many more tokens than its repair."""
    counts: list[int | None] = []
    for caption in captions.to_pylist():
        if caption is None:
            counts.append(None)
            continue
        count = clip_token_count(caption, repair=limit is None, cap=cap)
        if limit is not None and count >= limit - REPAIR_MARGIN and not _plain(caption):
            count = clip_token_count(caption, cap=cap)
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
    exact counts only for the captions a cheap bound cannot clear. The detail is the count, start and end included,
    exact up to max(LONG_CAPTION_EXACT_TOKENS, 4 x max_tokens) = N; a longer caption's is ">N" (more than N tokens),
    as counting stops there. The verdict is exact either way, N being over max_tokens."""
    if max_tokens is None:
        return table
    captions = table[CAPTION]
    candidates = may_exceed(captions, max_tokens)
    exact_up_to = max(LONG_CAPTION_EXACT_TOKENS, 4 * max_tokens)
    counts = pc.add(token_counts(pc.if_else(candidates, captions, pa.scalar(None, captions.type)), max_tokens - 2,
                                 exact_up_to - 2), 2)
    details = pc.if_else(pc.greater(counts, exact_up_to), f">{exact_up_to}", pc.cast(counts, pa.string()))
    return with_reason(table, pc.greater(counts, max_tokens), STAGE, "long_caption", details)


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
