"""Ingest: LAION-style parquet rows to the canonical metadata table (normalized names, a key per row)."""

from __future__ import annotations

import codecs
import re
from functools import cache

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import CAPTION, CAPTION_REPAIR, KEY, LOCATION_COLUMNS, PASSES_THRESHOLDS, ROW, URL, table_schema

# Every spelling seen in LAION releases (compared lower-cased) -> canonical name.
COLUMN_ALIASES = {
    "url": URL,
    "image_url": URL,
    "text": CAPTION,
    "caption": CAPTION,
    "width": "width",
    "height": "height",
    "similarity": "similarity",
    "punsafe": "punsafe",
    "pwatermark": "pwatermark",
    "aesthetic_score": "aesthetic",
    "aesthetic": "aesthetic",
    "hash": "hash",
    "license": "license",
    "language": "language",
    "nsfw": "nsfw",
}
# Columns the stages write that no table schema lists, and the engines' working columns.
INTERNAL_COLUMNS = ("error", "embedding", "jpg_bytes", PASSES_THRESHOLDS, "pair_hash", "first_row",
                    "first_row_of_pair", *LOCATION_COLUMNS)
SOURCE_PREFIX = "source_"


@cache
def reserved_columns() -> frozenset[str]:
    """Every column curate adds (the schema files' and INTERNAL_COLUMNS) that is no LAION spelling: an input column of
    such a name is carried through as SOURCE_PREFIX + name instead."""
    added = {KEY, ROW, *INTERNAL_COLUMNS}
    for name in ("download", "score", "verdict", "samples"):
        added |= set(table_schema(name).names)
    return frozenset(added - set(COLUMN_ALIASES))  # LAION's own spellings (AESTHETIC_SCORE) keep their meaning


def canonical_names(names: list[str]) -> dict[str, str]:
    """Map input column names to canonical ones; raises when the file has no URL column or two columns collide."""
    mapping: dict[str, str] = {}
    for name in names:
        lowered = name.lower()
        target = COLUMN_ALIASES.get(lowered, lowered)
        if target in reserved_columns() or target.startswith("_curate"):
            target = f"{SOURCE_PREFIX}{target}"
        if target in mapping.values():
            other = next(k for k, v in mapping.items() if v == target)
            raise ValueError(f"columns {other!r} and {name!r} both mean {target!r} (names are compared lower-cased, "
                             f"LAION spellings unified, and curate's own columns get a {SOURCE_PREFIX!r} prefix); "
                             "drop or rename one of them")
        mapping[name] = target
    if URL not in mapping.values():
        raise ValueError(f"no URL column (URL/url) among the columns found: {names}")
    return mapping


def _kind(data_type: pa.DataType) -> str:
    """string, number or other: what an input column's Arrow type can be cast to without loss of meaning."""
    if pa.types.is_dictionary(data_type):
        data_type = data_type.value_type
    if pa.types.is_null(data_type):
        return "null"
    if pa.types.is_string(data_type) or pa.types.is_large_string(data_type) or pa.types.is_binary(data_type) \
            or pa.types.is_large_binary(data_type):
        return "string"
    if pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_decimal(data_type) \
            or pa.types.is_boolean(data_type):
        return "number"
    return "other"


def check_input_schema(schema: pa.Schema) -> dict[str, str]:
    """canonical_names, and every known column of a type ingest can read; raises naming the column."""
    mapping = canonical_names(schema.names)
    wanted = {field.name: field.type for field in table_schema("metadata")}
    for field in schema:
        target, kind = mapping[field.name], _kind(field.type)
        if target == "hash":
            ok = kind == "null" or pa.types.is_integer(field.type)
            expected = "integers (LAION's signed 64-bit mmh3 hash)"
        elif target in (URL, CAPTION):
            ok, expected = kind in ("null", "string"), "strings"
        elif target in wanted and target not in (KEY, ROW):
            ok = kind != "other"
            expected = "numbers or strings" if pa.types.is_floating(wanted[target]) else "strings or numbers"
        else:
            continue
        if not ok:
            raise ValueError(f"column {field.name!r} has type {field.type}; curate reads it as {target!r} and "
                             f"expects {expected}: fix or drop that column")
    return mapping


# Bytes that are no UTF-8 are read as Windows-1252, the usual encoding of such web text (Latin-1 for the five bytes
# it leaves unmapped); text with control characters after that is binary, not a caption. No ftfy: it mends UTF-8
# read with the wrong codec, not bytes that never were UTF-8.
REPAIRED, REPLACED, UNDECODABLE = "cp1252", "replaced", "undecodable"
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _latin_1(error: UnicodeError) -> tuple[str, int]:
    assert isinstance(error, UnicodeDecodeError)
    return error.object[error.start:error.end].decode("latin-1"), error.end


codecs.register_error("curate-latin-1", _latin_1)


def decode_text(raw: bytes) -> tuple[str, str | None]:
    """(text, how): UTF-8 when valid (how None); UTF-8 but for lone surrogates (CESU-8 writers), those U+FFFD
    (REPLACED); else Windows-1252 (REPAIRED), UNDECODABLE when that text holds control characters (the text is then
    still returned, for the ledger's detail)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    try:
        raw.decode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "replace"), REPLACED
    except UnicodeDecodeError:
        text = raw.decode("cp1252", "curate-latin-1")
    return text, UNDECODABLE if _CONTROL.search(text) else REPAIRED


def decoded_text(column: pa.ChunkedArray) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """A string or binary column as valid strings (decode_text on any chunk that is not valid UTF-8), and how each
    value was decoded (null: as given)."""
    string_type = pa.large_string() if pa.types.is_large_string(column.type) else pa.string()
    texts, hows = [], []
    for chunk in column.chunks:
        if pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type):
            try:
                chunk.validate(full=True)
                texts.append(chunk)
                hows.append(pa.nulls(len(chunk), pa.string()))
                continue
            except pa.ArrowInvalid:
                chunk = chunk.view(pa.binary() if pa.types.is_string(chunk.type) else pa.large_binary())
        pairs = [(None, None) if v is None else decode_text(v) for v in chunk.to_pylist()]
        texts.append(pa.array([text for text, _ in pairs], string_type))
        hows.append(pa.array([how for _, how in pairs], pa.string()))
    return pa.chunked_array(texts, string_type), pa.chunked_array(hows, pa.string())


def valid_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings as they are when valid; a chunk holding invalid UTF-8 (lone surrogates, Latin-1) read by decode_text."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    return decoded_text(column)[0]


def key_of(url: str | None, caption: str | None) -> str:
    """LAION's hash, mmh3.hash64(url + text)[0], rendered as 16 hex digits of its unsigned value."""
    return format_key(mmh3.hash64((url or "") + (caption or ""))[0])


def format_key(signed_hash: int) -> str:
    return f"{signed_hash & 0xFFFFFFFFFFFFFFFF:016x}"


def _keys(table: pa.Table) -> pa.Array:
    hashes = table["hash"] if "hash" in table.column_names else None
    urls = table[URL].to_pylist()
    captions = table[CAPTION].to_pylist()
    given = hashes.to_pylist() if hashes is not None else [None] * table.num_rows
    keys = [
        format_key(int(h)) if h is not None else key_of(u, c)
        for h, u, c in zip(given, urls, captions, strict=True)
    ]
    return pa.array(keys, pa.string())


def _cast_canonical(table: pa.Table) -> pa.Table:
    """Cast known columns to their schema type; a value that cannot be cast becomes null, not a crash."""
    for field in table_schema("metadata"):
        if field.name not in table.column_names or field.name in (KEY, ROW):
            continue
        column = table[field.name]
        if pa.types.is_dictionary(column.type):
            column = pc.cast(column, column.type.value_type)
        if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
            column = pa.chunked_array([_decoded(c) for c in column.chunks], pa.string())
        if column.type == field.type:  # a decoded dictionary or binary column still replaces the original
            casted: pa.ChunkedArray | pa.Array = column
        elif pa.types.is_floating(field.type) and (pa.types.is_string(column.type) or
                                                    pa.types.is_large_string(column.type)):
            numbers = [_to_float(v) for v in column.to_pylist()]
            casted = pa.array(numbers, field.type)
        else:
            casted = pc.cast(column, field.type, safe=False)
        table = table.set_column(table.column_names.index(field.name), field.name, casted)
    return table


def _decoded(chunk: pa.Array) -> pa.Array:
    return pa.array([None if v is None else decode_text(v)[0] for v in chunk.to_pylist()], pa.string())


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def normalize(table: pa.Table, first_row: int) -> pa.Table:
    """Canonical column names and types, plus `key` and `row` (global input order starting at first_row)."""
    mapping = check_input_schema(table.schema)
    table = table.rename_columns([mapping[name] for name in table.column_names])
    repairs: pa.ChunkedArray | pa.Array = pa.nulls(table.num_rows, pa.string())
    if CAPTION in table.column_names:  # captions that are no UTF-8: decoded by the fallback, and said so
        caption = table[CAPTION]
        caption = pc.cast(caption, caption.type.value_type) if pa.types.is_dictionary(caption.type) else caption
        if not pa.types.is_null(caption.type):
            text, repairs = decoded_text(caption)
            table = table.set_column(table.column_names.index(CAPTION), CAPTION, text)
    for index, name in enumerate(table.column_names):  # strings Python cannot decode would crash a later stage
        column = table[name]
        if pa.types.is_null(column.type):  # an all-null column: Arrow joins and later batches need a real type
            column = column.cast(pa.string())
        table = table.set_column(index, name, valid_utf8(column))
    if CAPTION not in table.column_names:
        table = table.append_column(CAPTION, pa.nulls(table.num_rows, pa.string()))
    table = _cast_canonical(table).append_column(CAPTION_REPAIR, repairs)
    table = table.add_column(0, ROW, pa.array(np.arange(first_row, first_row + table.num_rows), pa.int64()))
    return table.add_column(0, KEY, _keys(table))
