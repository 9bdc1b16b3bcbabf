"""Ingest: LAION-style parquet rows to the canonical metadata table (normalized names, a key per row)."""

from __future__ import annotations

from functools import cache

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import CAPTION, KEY, LOCATION_COLUMNS, PASSES_THRESHOLDS, ROW, URL, table_schema

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


def valid_utf8(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Strings as they are when valid; a chunk holding invalid UTF-8 (lone surrogates, Latin-1) decoded with U+FFFD."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column
    chunks = []
    for chunk in column.chunks:
        try:
            chunk.validate(full=True)
            chunks.append(chunk)
        except pa.ArrowInvalid:
            raw = chunk.view(pa.binary() if pa.types.is_string(column.type) else pa.large_binary()).to_pylist()
            chunks.append(pa.array([None if v is None else v.decode("utf-8", "replace") for v in raw], column.type))
    return pa.chunked_array(chunks, column.type)


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
    return pa.array([None if v is None else v.decode("utf-8", "replace") for v in chunk.to_pylist()], pa.string())


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def normalize(table: pa.Table, first_row: int) -> pa.Table:
    """Canonical column names and types, plus `key` and `row` (global input order starting at first_row)."""
    mapping = check_input_schema(table.schema)
    table = table.rename_columns([mapping[name] for name in table.column_names])
    for index, name in enumerate(table.column_names):  # strings Python cannot decode would crash a later stage
        column = table[name]
        if pa.types.is_null(column.type):  # an all-null column: Arrow joins and later batches need a real type
            column = column.cast(pa.string())
        table = table.set_column(index, name, valid_utf8(column))
    if CAPTION not in table.column_names:
        table = table.append_column(CAPTION, pa.nulls(table.num_rows, pa.string()))
    table = _cast_canonical(table)
    table = table.add_column(0, ROW, pa.array(np.arange(first_row, first_row + table.num_rows), pa.int64()))
    return table.add_column(0, KEY, _keys(table))
