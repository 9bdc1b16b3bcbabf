"""Shared by the steps that join the run's rows with reference files: hex digests as int64 groups, and reference
files read in bounded batches."""

from __future__ import annotations

import os
from collections.abc import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.storage import checkpoint as io

BATCH_ENTRIES = 1 << 20  # reference entries read at a time (~70 MB of hex digests)


def hex_groups(digests: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The int64 of each hex digest's first 16 digits (lowercase, at least 16 long): a hash already, so a group."""
    head = pc.utf8_slice_codeunits(digests, 0, 16)
    raw = np.asarray(head.to_numpy(zero_copy_only=False), dtype="S16").view(np.uint8).reshape(len(head), 16)
    nibbles = np.where(raw <= ord("9"), raw - ord("0"), raw - ord("a") + 10).astype(np.uint64)
    shifts = np.arange(60, -1, -4, dtype=np.uint64)
    return np.bitwise_or.reduce(nibbles << shifts, axis=1).view(np.int64) if len(head) else np.zeros(0, np.int64)


def file_rows(path: str) -> int:
    """About how many entries a reference file holds: its parquet row count, or its size over a digest line."""
    if path.endswith(".parquet"):
        return io.parquet_footer(path)[1]
    fs, _, (local,) = fsspec.get_fs_token_paths(path)
    return int(fs.size(local) // 65) if fs.exists(local) else 0


def text_lines(path: str, batch: int = BATCH_ENTRIES) -> Iterator[tuple[list[int], list[str]]]:
    """(line numbers, lines) of a text file, `batch` lines at a time, blank lines and # comments left out."""
    with fsspec.open(path, "rt", encoding="utf-8", errors="replace") as handle:
        numbers: list[int] = []
        lines: list[str] = []
        for number, line in enumerate(handle, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                numbers.append(number)
                lines.append(text)
                if len(lines) >= batch:
                    yield numbers, lines
                    numbers, lines = [], []
        if lines:
            yield numbers, lines


def exists(path: str) -> bool:
    fs, _, paths = fsspec.get_fs_token_paths(path)
    return bool(paths) and fs.exists(paths[0]) and not fs.isdir(paths[0])


def expand(paths: list[str]) -> list[str]:
    """Files as given (a folder: its files, sorted); raises naming a path that is missing."""
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += sorted(os.path.join(path, name) for name in os.listdir(path) if not name.startswith("."))
        elif exists(path):
            found.append(path)
        else:
            raise ValueError(f"{path}: no such file")
    return found
