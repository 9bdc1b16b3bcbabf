"""The local engine's global steps on disk: signatures spilled into hash partitions, verdicts routed back to parts.

signature -> group -> apply, as Spark does it with a shuffle: every row's signature goes to the partition of its
group key, each partition is grouped alone (memory bounded by a partition), and the verdicts are written into
buckets of consecutive input parts, so applying them reads one bucket at a time. Time is linear in the rows.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.schema import ROW

ROWS_PER_PARTITION = 2_000_000  # ~100 MB of signatures, a few hundred MB while grouped


def partition_count(rows: int, rows_per_partition: int = ROWS_PER_PARTITION) -> int:
    return max(1, math.ceil(rows / rows_per_partition))


def key_partitions(keys: pa.ChunkedArray | pa.Array, partitions: int) -> np.ndarray:
    """Partition of each 16-hex-digit key (a hash already): its last four hex digits, modulo partitions."""
    raw = np.asarray(keys.to_numpy(zero_copy_only=False), dtype="S16")
    tail = raw.view(np.uint8).reshape(len(raw), 16)[:, 12:].astype(np.int64)
    nibbles = np.where(tail <= ord("9"), tail - ord("0"), (tail | 0x20) - ord("a") + 10) & 0xF
    value = (nibbles[:, 0] << 12) | (nibbles[:, 1] << 8) | (nibbles[:, 2] << 4) | nibbles[:, 3]
    return value % partitions


class _Writers:
    """One append-only parquet file per bucket number, opened on first use."""

    def __init__(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder = folder
        self.open: dict[int, pq.ParquetWriter] = {}

    def write(self, bucket: int, table: pa.Table) -> None:
        if bucket not in self.open:
            self.open[bucket] = pq.ParquetWriter(self.folder / f"{bucket:06d}.parquet", table.schema)
        self.open[bucket].write_table(table)

    def split(self, table: pa.Table, buckets: np.ndarray, count: int) -> None:
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(count + 1))
        table = table.take(pa.array(order))
        for bucket in np.flatnonzero(np.diff(bounds)):
            self.write(int(bucket), table.slice(bounds[bucket], bounds[bucket + 1] - bounds[bucket]))

    def close(self) -> list[Path]:
        for writer in self.open.values():
            writer.close()
        return sorted(self.folder.glob("*.parquet"))


def spill(signatures: Iterable[pa.Table], partition_of: Callable[[pa.Table], np.ndarray], partitions: int,
          folder: Path) -> list[Path]:
    """Signature step: every signature row into the file of its partition; returns the partition files."""
    writers = _Writers(folder)
    for table in signatures:
        writers.split(table, partition_of(table), partitions)
    return writers.close()


class VerdictRouter:
    """Group step's output: verdict rows (with ROW) into buckets of consecutive input parts, then per part back."""

    def __init__(self, folder: Path, part_starts: np.ndarray, buckets: int) -> None:
        self.folder, self.starts = folder, np.asarray(part_starts, dtype=np.int64)
        self.parts = len(self.starts)
        self.buckets = max(1, min(buckets, self.parts))
        self.writers = _Writers(folder)

    def bucket_of_part(self, part: np.ndarray) -> np.ndarray:
        return part * self.buckets // max(self.parts, 1)

    def write(self, verdicts: pa.Table) -> None:
        if verdicts.num_rows:
            part = np.searchsorted(self.starts, verdicts[ROW].to_numpy(), side="right") - 1
            self.writers.split(verdicts, self.bucket_of_part(part), self.buckets)

    def per_part(self, schema: pa.Schema) -> Iterator[pa.Table]:
        """The verdicts of part 0, 1, …, each sorted by row; one bucket in memory at a time."""
        self.writers.close()
        loaded, rows, bucket_of = -1, schema.empty_table(), self.bucket_of_part(np.arange(self.parts))
        row_numbers = np.zeros(0, dtype=np.int64)
        ends = np.r_[self.starts[1:], np.iinfo(np.int64).max]
        for part in range(self.parts):
            if bucket_of[part] != loaded:
                loaded = int(bucket_of[part])
                path = self.folder / f"{loaded:06d}.parquet"
                rows = pq.read_table(path).sort_by(ROW) if path.exists() else schema.empty_table()
                row_numbers = rows[ROW].to_numpy()
            low, high = np.searchsorted(row_numbers, [self.starts[part], ends[part]])
            yield rows.slice(low, high - low)
        shutil.rmtree(self.folder, ignore_errors=True)


def rows_between(table: pa.Table, sorted_rows: np.ndarray, low: int, high: int) -> pa.Table:
    """The rows of a table sorted by ROW (sorted_rows is its ROW column) with low <= row < high."""
    start, end = np.searchsorted(sorted_rows, [low, high])
    return table.slice(start, end - start)
