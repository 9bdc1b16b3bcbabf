"""Ingest: LAION-style parquet rows to the canonical metadata table (normalized names, a key per row)."""

from __future__ import annotations

import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import CAPTION, KEY, ROW, URL, table_schema

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
    "key": "source_key",
    "status": "source_status",
}
# Columns our own stages write: an input column of the same name is kept under a "source_" prefix.
_RESERVED = {"row", "jpg", "original_width", "original_height", "stored_width", "stored_height", "sha256", "phash",
             "aesthetic_score", "watermark_prob", "embedding", "drop_stage", "drop_reason", "drop_detail", "shard"}


def canonical_names(names: list[str]) -> dict[str, str]:
    """Map input column names to canonical ones; raises when the file has no URL column or two columns collide."""
    mapping: dict[str, str] = {}
    for name in names:
        lowered = name.lower()
        target = COLUMN_ALIASES.get(lowered, lowered)
        if target in _RESERVED:
            target = f"source_{target}"
        if target in mapping.values():
            other = next(k for k, v in mapping.items() if v == target)
            raise ValueError(f"columns {other!r} and {name!r} both mean {target!r}; drop one of them")
        mapping[name] = target
    if URL not in mapping.values():
        raise ValueError(f"no URL column (URL/url) among the columns found: {names}")
    return mapping


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
        if column.type == field.type:
            continue
        if pa.types.is_floating(field.type) and pa.types.is_string(column.type):
            numbers = [_to_float(v) for v in column.to_pylist()]
            casted: pa.ChunkedArray | pa.Array = pa.array(numbers, field.type)
        else:
            casted = pc.cast(column, field.type, safe=False)
        table = table.set_column(table.column_names.index(field.name), field.name, casted)
    return table


def _to_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def normalize(table: pa.Table, first_row: int) -> pa.Table:
    """Canonical column names and types, plus `key` and `row` (global input order starting at first_row)."""
    mapping = canonical_names(table.column_names)
    table = table.rename_columns([mapping[name] for name in table.column_names])
    if CAPTION not in table.column_names:
        table = table.append_column(CAPTION, pa.nulls(table.num_rows, pa.string()))
    table = _cast_canonical(table)
    table = table.add_column(0, ROW, pa.array(np.arange(first_row, first_row + table.num_rows), pa.int64()))
    return table.add_column(0, KEY, _keys(table))
