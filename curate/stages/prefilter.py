"""Prefilter: judge rows on metadata alone, before any bandwidth is spent on them."""

from __future__ import annotations

from urllib.parse import urlsplit

import mmh3
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import (
    AESTHETIC,
    CAPTION,
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
from curate.stages.verdict import above, below, stored_text, with_reason, with_verdict_columns

STAGE = "prefilter"
MAX_URL_LENGTH = 2048
MAX_CLAIMED_SIDE = 1_000_000
FIRST_ROW = "first_row"
FIRST_ROW_OF_PAIR = "first_row_of_pair"
_PAIR = "pair_hash"


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


def flag_invalid_urls(table: pa.Table) -> pa.Table:
    problems = [url_problem(u) for u in table[URL].to_pylist()]
    return with_reason(table, pa.array([p is not None for p in problems]), STAGE, "invalid_url", problems)


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


def first_rows(table: pa.Table) -> pa.Table:
    """Partial aggregate (key, pair_hash) -> first row; merge partials with merge_first_rows."""
    pairs = pa.table({KEY: table[KEY], _PAIR: pair_hashes(table), ROW: table[ROW]})
    return pairs.group_by([KEY, _PAIR]).aggregate([(ROW, "min")]).rename_columns([KEY, _PAIR, FIRST_ROW_OF_PAIR])


def merge_first_rows(partials: list[pa.Table]) -> pa.Table:
    merged = pa.concat_tables(partials).group_by([KEY, _PAIR]).aggregate([(FIRST_ROW_OF_PAIR, "min")])
    merged = merged.rename_columns([KEY, _PAIR, FIRST_ROW_OF_PAIR])
    per_key = merged.group_by([KEY]).aggregate([(FIRST_ROW_OF_PAIR, "min")]).rename_columns([KEY, FIRST_ROW])
    return merged.join(per_key, KEY)


def flag_duplicate_urls(table: pa.Table, firsts: pa.Table) -> pa.Table:
    """Rows that repeat an earlier row's url+caption (duplicate_url) or only its key (key_collision)."""
    probe = pa.table({KEY: table[KEY], _PAIR: pair_hashes(table), "_order": pa.array(range(table.num_rows))})
    joined = probe.join(firsts, [KEY, _PAIR]).sort_by("_order")
    if joined.num_rows != table.num_rows:
        raise RuntimeError("first-row table does not cover this batch; build it from every ingested row")
    rows = table[ROW]
    repeat = pc.not_equal(rows, joined[FIRST_ROW_OF_PAIR])
    collision = pc.and_(pc.equal(rows, joined[FIRST_ROW_OF_PAIR]), pc.not_equal(rows, joined[FIRST_ROW]))
    table = with_reason(table, repeat, STAGE, "duplicate_url", pc.cast(joined[FIRST_ROW_OF_PAIR], pa.string()))
    return with_reason(table, collision, STAGE, "key_collision", pc.cast(joined[FIRST_ROW], pa.string()))


def prefilter(
    table: pa.Table,
    firsts: pa.Table | None,
    min_size: int,
    max_watermark: float | None,
    max_unsafe: float | None,
    aesthetic_threshold: float | None,
) -> pa.Table:
    """All metadata checks in order; the first that applies is the row's reason."""
    table = with_verdict_columns(table)
    table = flag_invalid_urls(table)
    table = flag_empty_captions(table)
    if firsts is not None:
        table = flag_duplicate_urls(table, firsts)
    table = flag_metadata_size(table, min_size)
    if max_watermark is not None or aesthetic_threshold is not None:  # metadata scores are trusted: check them
        table = flag_invalid_scores(table)
    table = flag_above(table, PWATERMARK, max_watermark, "metadata_watermark")
    table = flag_above(table, PUNSAFE, max_unsafe, "metadata_unsafe")
    if aesthetic_threshold is not None:
        table = flag_metadata_aesthetic(table, aesthetic_threshold)
    return table


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
