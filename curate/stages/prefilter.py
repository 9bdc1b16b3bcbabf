"""Prefilter: judge rows on metadata alone, before any bandwidth is spent on them."""

from __future__ import annotations

from urllib.parse import urlsplit

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import (
    AESTHETIC,
    CAPTION,
    CAPTION_REPAIR,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    HEIGHT,
    KEY,
    PUNSAFE,
    PWATERMARK,
    ROW,
    URL,
    WIDTH,
)
from curate.stages.captions import flag_captions
from curate.stages.ingest import UNDECODABLE
from curate.stages.verdict import above, apply_verdicts, below, stored_text, with_reason, with_verdict_columns

STAGE = "prefilter"
MAX_URL_LENGTH = 2048
MAX_CLAIMED_SIDE = 1_000_000
FIRST_ROW = "first_row"
FIRST_ROW_OF_PAIR = "first_row_of_pair"
PAIR = "pair_hash"


def url_problem(url: str | None) -> str | None:
    """Why a URL cannot be fetched, or None when it is a plausible http(s) URL."""
    if url is None or not url.strip():
        return "empty url"
    if len(url) > MAX_URL_LENGTH:
        return f"url longer than {MAX_URL_LENGTH} characters"
    if url != url.strip() or any(ord(c) < 32 or c == " " for c in url):
        return "whitespace or control characters in url"
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError as error:
        return f"malformed url: {error}"
    if parts.scheme.lower() not in ("http", "https"):
        return f"scheme {parts.scheme or '(none)'!r} is not http(s)"
    if not host:
        return "no host in url"
    if parts.username is not None or parts.password is not None:
        return "credentials in url"
    return None


_PORT = "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
# A URL of this shape (printable ASCII, http(s), a host without credentials, a valid port) is one url_problem passes:
# the regex clears most rows at C speed and url_problem explains the rest.
URL_SHAPE = ("^[Hh][Tt][Tt][Pp][Ss]?://(\\[[0-9A-Fa-f:.]+\\]|[A-Za-z0-9._~%!$&'()*+,;=-]+)"
             f"(:{_PORT})?([/?#][\\x21-\\x7e]*)?$")


def flag_invalid_urls(table: pa.Table) -> pa.Table:
    urls = table[URL]
    shaped = pc.and_(pc.match_substring_regex(pc.fill_null(urls, ""), URL_SHAPE),
                     pc.less_equal(pc.utf8_length(pc.fill_null(urls, "")), MAX_URL_LENGTH))
    unsure = np.flatnonzero(~pc.fill_null(shaped, False).to_numpy(zero_copy_only=False))
    problems: list[str | None] = [None] * table.num_rows
    for index, url in zip(unsure.tolist(), urls.take(pa.array(unsure, pa.int64())).to_pylist(), strict=True):
        problems[index] = url_problem(url)
    return with_reason(table, pa.array([p is not None for p in problems]), STAGE, "invalid_url", problems)


def flag_undecodable_captions(table: pa.Table) -> pa.Table:
    """Captions ingest could read neither as UTF-8 nor as Windows-1252 text (CAPTION_REPAIR "undecodable")."""
    if CAPTION_REPAIR not in table.column_names:
        return table
    bad = pc.fill_null(pc.equal(table[CAPTION_REPAIR], UNDECODABLE), False)
    if not pc.any(bad).as_py():
        return table
    details = [None if not b else "not text: " + c[:40].encode("unicode_escape").decode("ascii")
               for b, c in zip(bad.to_pylist(), table[CAPTION].to_pylist(), strict=True)]
    return with_reason(table, bad, STAGE, "undecodable_caption", details)


def flag_empty_captions(table: pa.Table) -> pa.Table:
    caption = table[CAPTION]
    empty = pc.or_kleene(pc.is_null(caption), pc.equal(pc.utf8_trim_whitespace(caption), ""))
    return with_reason(table, empty, STAGE, "empty_caption")


def _plausible_size(values: pa.ChunkedArray) -> pa.ChunkedArray:
    """A claimed side length, or null when it cannot be one (NaN, infinite, zero, negative, absurdly large)."""
    sane = pc.and_(pc.greater(values, 0), pc.less_equal(values, MAX_CLAIMED_SIDE))
    return pc.if_else(pc.fill_null(sane, False), values, pa.scalar(None, values.type))


def flag_metadata_size(table: pa.Table, min_size: int) -> pa.Table:
    """Rows whose metadata width or height is below min_size (unknown or nonsense sizes pass: download measures)."""
    if WIDTH not in table.column_names or HEIGHT not in table.column_names:
        return table
    short = pc.min_element_wise(_plausible_size(table[WIDTH]), _plausible_size(table[HEIGHT]))
    small = pc.less(short, min_size)
    return with_reason(table, small, STAGE, "metadata_low_resolution", pc.cast(short, pa.string()))


def flag_above(table: pa.Table, column: str, limit: float | None, reason: str) -> pa.Table:
    """Rows whose metadata column is above limit (verdict.above); no-op when the column or the limit is absent."""
    if limit is None or column not in table.column_names:
        return table
    return with_reason(table, above(table[column], limit), STAGE, reason, stored_text(table[column]))


def flag_invalid_scores(table: pa.Table) -> pa.Table:
    """Metadata scores that are no score (NaN, a probability outside [0, 1], aesthetic outside [0, 10])."""
    for column, high in ((PWATERMARK, 1.0), (PUNSAFE, 1.0), (AESTHETIC, 10.0)):
        if column not in table.column_names:
            continue
        values = table[column]
        bad = pc.or_(pc.is_nan(values), pc.or_(pc.less(values, 0.0), pc.greater(values, high)))
        table = with_reason(table, bad, STAGE, "invalid_metadata_score",
                            pc.binary_join_element_wise(f"{column}=", stored_text(values), ""))
    return table


def flag_metadata_aesthetic(table: pa.Table, threshold: float) -> pa.Table:
    if AESTHETIC not in table.column_names:
        return table
    values = table[AESTHETIC]
    low = pc.or_kleene(below(values, threshold), pc.is_null(values))
    return with_reason(table, low, STAGE, "metadata_low_aesthetic", stored_text(values))


def pair_hashes(table: pa.Table) -> pa.Array:
    """A second hash of url+caption, to tell a true duplicate from a key collision."""
    urls, captions = table[URL].to_pylist(), table[CAPTION].to_pylist()
    return pa.array([mmh3.hash64((u or "") + (c or ""), seed=1)[0] for u, c in zip(urls, captions, strict=True)])


def url_signature(table: pa.Table) -> pa.Table:
    """Signature step of url+caption dedup: (key, pair_hash, row) per row; group every row of one key together."""
    return pa.table({KEY: table[KEY], PAIR: pc.cast(pair_hashes(table), pa.int64()), ROW: table[ROW]})


def url_verdicts(rows: pa.ChunkedArray, first_of_pair: pa.ChunkedArray, first_of_key: pa.ChunkedArray) -> pa.Table:
    """The rule: a row repeating an earlier row's url+caption is duplicate_url (detail: that row); the first row of a
    url+caption whose key an earlier, different url+caption holds is key_collision (detail: the key's first row)."""
    repeat = pc.not_equal(rows, first_of_pair)
    collision = pc.and_(pc.invert(repeat), pc.not_equal(rows, first_of_key))
    reason = pc.if_else(repeat, "duplicate_url", pc.if_else(collision, "key_collision", pa.scalar(None, pa.string())))
    detail = pc.cast(pc.if_else(repeat, first_of_pair, first_of_key), pa.string())
    verdicts = pa.table({ROW: rows, DROP_STAGE: pa.nulls(len(rows), pa.string()), DROP_REASON: reason,
                         DROP_DETAIL: detail})
    verdicts = verdicts.filter(pc.is_valid(verdicts[DROP_REASON]))
    return verdicts.set_column(1, DROP_STAGE, pa.array([STAGE] * verdicts.num_rows, pa.string()))


def group_url_duplicates(pairs: pa.Table) -> pa.Table:
    """Group step: every row of some keys (all rows of each key) -> url_verdicts of those rows."""
    firsts = pairs.group_by([KEY, PAIR]).aggregate([(ROW, "min")]).rename_columns([KEY, PAIR, FIRST_ROW_OF_PAIR])
    per_key = firsts.group_by([KEY]).aggregate([(FIRST_ROW_OF_PAIR, "min")]).rename_columns([KEY, FIRST_ROW])
    joined = pairs.join(firsts, [KEY, PAIR]).join(per_key, KEY)
    return url_verdicts(joined[ROW], joined[FIRST_ROW_OF_PAIR], joined[FIRST_ROW]).sort_by(ROW)


def prefilter(
    table: pa.Table,
    url_flags: pa.Table | None,
    min_size: int,
    max_watermark: float | None,
    max_unsafe: float | None,
    aesthetic_threshold: float | None,
    check_urls: bool = True,
    min_caption_words: int = 0,
    max_caption_tokens: int | None = None,
    junk_captions: bool = False,
    languages: list[str] | None = None,
) -> pa.Table:
    """All metadata checks in order; the first that applies is the row's reason. url_flags are the url+caption
    duplicate verdicts of these rows (group_url_duplicates or url_verdicts), None when that dedup is off. The caption
    checks (curate.stages.captions) come last, so the slow ones see only the rows still alive."""
    table = with_verdict_columns(table)
    if check_urls:  # not for images already downloaded: their url is a record, not something to fetch
        table = flag_invalid_urls(table)
    table = flag_undecodable_captions(table)
    table = flag_empty_captions(table)
    table = apply_verdicts(table, url_flags)
    table = flag_metadata_size(table, min_size)
    if max_watermark is not None or aesthetic_threshold is not None:  # metadata scores are trusted: check them
        table = flag_invalid_scores(table)
    table = flag_above(table, PWATERMARK, max_watermark, "metadata_watermark")
    table = flag_above(table, PUNSAFE, max_unsafe, "metadata_unsafe")
    if aesthetic_threshold is not None:
        table = flag_metadata_aesthetic(table, aesthetic_threshold)
    return flag_captions(table, min_caption_words, max_caption_tokens, junk_captions, languages or [])


RECOVERABLE_COLUMNS = (DROP_STAGE, DROP_REASON, AESTHETIC, PWATERMARK, PUNSAFE, WIDTH, HEIGHT)


def recoverable(table: pa.Table, min_size: int, threshold: float, max_watermark: float,
                max_unsafe: float | None) -> dict[str, int]:
    """Per reason, the rows this stage dropped on a metadata threshold that these thresholds would keep."""
    dropped = table.filter(pc.equal(table[DROP_STAGE], STAGE))
    if dropped.num_rows == 0:
        return {}
    reason = dropped[DROP_REASON]
    names = dropped.column_names
    checks = {"metadata_low_aesthetic": (AESTHETIC, lambda v: pc.invert(below(v, threshold))),
              "metadata_watermark": (PWATERMARK, lambda v: pc.invert(above(v, max_watermark))),
              "metadata_unsafe": (PUNSAFE, lambda v: pc.invert(above(v, max_unsafe)) if max_unsafe is not None
                                  else pc.is_valid(v))}
    counts = {}
    for name, (column, keeps) in checks.items():
        if column in names:
            counts[name] = pc.sum(pc.fill_null(pc.and_(pc.equal(reason, name), keeps(dropped[column])), False)
                                  .cast(pa.int64())).as_py() or 0
    if WIDTH in names and HEIGHT in names:
        short = pc.min_element_wise(_plausible_size(dropped[WIDTH]), _plausible_size(dropped[HEIGHT]))
        large = pc.and_(pc.equal(reason, "metadata_low_resolution"), pc.greater_equal(short, min_size))
        counts["metadata_low_resolution"] = pc.sum(pc.fill_null(large, False).cast(pa.int64())).as_py() or 0
    return {name: count for name, count in counts.items() if count}
