"""The local engine's global steps on disk: signatures spilled into hash partitions, verdicts routed back to parts.

signature -> group -> apply, as Spark does it with a shuffle: every row's signature goes to the partition of its
group key, each partition is grouped alone (memory bounded by a partition), and the verdicts are written into
buckets of consecutive input parts, so applying them reads one bucket at a time. Time is linear in the rows.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.schema import (
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    KEY,
    PHASH,
    ROW,
    SHA256,
)
from curate.stages import dedup
from curate.stages.verdict import SURVIVOR_COLUMNS, alive, survivor_ranks, verdict_schema, verdicts_of

log = logging.getLogger(__name__)

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


def _hash_partitions(values: pa.ChunkedArray | pa.Array, partitions: int) -> np.ndarray:
    """Partition of each int64 hash (null: 0)."""
    return pc.fill_null(values, 0).to_numpy().view(np.uint64) % np.uint64(partitions)


def duplicate_verdicts(signatures: Iterable[pa.Table], kinds: list[str], max_distance: int, partitions: int,
                       folder: Path) -> pa.Table:
    """Exact and pHash duplicate verdicts of the rows in signatures (alive rows with the survivor-rule columns), each
    kind as signature -> partition -> group, one partition in memory at a time:
    - exact: rows by their sha256; each partition's sha256 groups are whole, its survivors go on to pHash;
    - pHash: rows by their hash; every distinct hash's band values by (band, value), where each partition yields
      its near pairs (oversized groups split inside, curate.stages.hamming); the union-find over those pairs of
      hash values (dedup.hash_components) names each hash's component; rows again by their component, each
      partition judged with the survivor rule.
    Returns the flagged rows' verdicts (row, drop_stage, drop_reason, drop_detail)."""
    verdicts = [verdict_schema().empty_table()]
    remaining: Iterable[pa.Table] = signatures
    if "exact" in kinds:
        by_digest = spill(signatures, lambda t: key_partitions(pc.fill_null(t[SHA256], "0" * 16), partitions),
                          partitions, folder / "exact")

        def exact_survivors() -> Iterator[pa.Table]:
            for path in by_digest:
                judged = dedup.flag_exact_duplicates(pq.read_table(path))
                verdicts.append(verdicts_of(judged))
                yield judged.filter(alive(judged))

        remaining = exact_survivors()
    if "phash" in kinds:
        band_partitions = partitions * (max_distance + 1)  # every hash is in k + 1 bands: partitions stay as large
        by_hash = spill((t.filter(pc.is_valid(t[PHASH])) for t in remaining),
                        lambda t: _hash_partitions(t[PHASH], partitions), partitions, folder / "phash")
        bands = spill((dedup.band_signatures(pq.read_table(path, columns=[PHASH])[PHASH].to_numpy(), max_distance)
                       for path in by_hash),
                      lambda t: _hash_partitions(pc.add(pc.multiply(t["value"], 64), pc.cast(t["band"], pa.int64())),
                                                 band_partitions), band_partitions, folder / "bands")
        pairs = [dedup.band_group_pairs(pq.read_table(path), max_distance) for path in bands]
        named, components = dedup.hash_components(np.concatenate([np.zeros(0, np.int64), *(p[0] for p in pairs)]),
                                                  np.concatenate([np.zeros(0, np.int64), *(p[1] for p in pairs)]))
        grouped = (t.append_column("_group", pa.array(dedup.component_of(t[PHASH].to_numpy(), named, components)))
                   for t in map(pq.read_table, by_hash))
        for path in spill(grouped, lambda t: _hash_partitions(t["_group"], partitions), partitions, folder / "groups"):
            table = pq.read_table(path)
            _, labels = np.unique(table["_group"].to_numpy(), return_inverse=True)
            judged = dedup.flag_group_duplicates(table.drop_columns(["_group"]), labels, "duplicate_phash")
            verdicts.append(verdicts_of(judged))
    else:
        for _ in remaining:  # the exact survivors' generator records the exact verdicts as it goes
            pass
    shutil.rmtree(folder, ignore_errors=True)
    return pa.concat_tables(verdicts).sort_by(ROW)


CLUSTER, VECTOR_ROW = "_cluster", "_vector_row"


def semantic_verdicts(parts: Callable[[], Iterator[pa.Table]], vectors: Any, has_vector: np.ndarray,
                      threshold: float, clusters: int | None, seed: int, folder: Path,
                      partitions: int | None = None) -> pa.Table:
    """Semantic duplicate verdicts as signature -> cluster partitions on disk -> group, the local form of Spark's
    groupBy("cluster").applyInArrow: the same steps (semantic.train_centroids, assign_clusters, dedup_cluster per
    cluster, resolve_survivors), so the verdicts equal semantic.flag_semantic_duplicates' on the whole table.

    parts() yields every row of the checkpoint in order (row i of them is row i of vectors, a memory map), with the
    survivor-rule columns and the verdicts so far; it is read twice. Memory: 8 bytes per candidate row (its vector
    row), one partition's signatures, one cluster's vectors, and the duplicate pairs."""
    from curate.stages import semantic

    candidates = np.concatenate([np.zeros(0, np.int64), *(_vector_rows(part, offset, has_vector)
                                                          for part, offset in _with_offsets(parts()))])
    n = len(candidates)
    if n < 2:
        return verdict_schema().empty_table()
    k = max(1, min(clusters or semantic.default_cluster_count(n), n))
    source = semantic.RowSubset(vectors, candidates)
    centroids = (semantic.train_centroids(semantic.training_sample(source, k, seed), k, seed) if k > 1
                 else np.ones((1, 1), np.float32))
    del candidates, source
    partitions = partitions or partition_count(n)

    def assigned() -> Iterator[pa.Table]:
        for part, offset in _with_offsets(parts()):
            rows = _vector_rows(part, offset, has_vector)
            if len(rows) == 0:
                continue
            keep = [name for name in SURVIVOR_COLUMNS if name in part.column_names]
            table = part.take(pa.array(rows - offset)).select(keep).append_column(VECTOR_ROW, pa.array(rows))
            nearest, second = semantic.assign_clusters(semantic.RowSubset(vectors, rows), centroids)
            yield table.append_column(CLUSTER, pa.array(nearest))
            visitors = np.flatnonzero(second >= 0)  # rows near a boundary are searched in both clusters
            if len(visitors):
                yield table.take(pa.array(visitors)).append_column(CLUSTER, pa.array(second[visitors]))

    files = spill(assigned(), lambda t: t[CLUSTER].to_numpy() % partitions, partitions, folder)
    pairs: list[pa.Table] = []
    named: list[pa.Table] = []
    for path in files:
        table = pq.read_table(path).sort_by([(CLUSTER, "ascending"), (VECTOR_ROW, "ascending")])
        ids = table[CLUSTER].to_numpy()
        bounds = np.concatenate([[0], np.flatnonzero(np.diff(ids)) + 1, [len(ids)]])
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            if end - start < 2:
                continue
            members = table.slice(start, end - start)
            found = semantic.dedup_cluster(np.asarray(vectors[members[VECTOR_ROW].to_numpy()]),
                                           survivor_ranks(members), threshold, seed)
            moved = np.flatnonzero(found != np.arange(len(found)))
            if len(moved):
                keys = members[KEY]
                pairs.append(pa.table({KEY: keys.take(pa.array(moved)),
                                       "survivor_key": keys.take(pa.array(found[moved]))}))
                named.append(members.take(pa.array(np.union1d(moved, found[moved]))).drop_columns([CLUSTER]))
    shutil.rmtree(folder, ignore_errors=True)
    if not pairs:
        return verdict_schema().empty_table()
    rows = pa.concat_tables(named)
    _, first = np.unique(rows[KEY].to_numpy(zero_copy_only=False).astype(str), return_index=True)
    rows = rows.take(pa.array(first))  # each named key once (a boundary row may be named by two clusters)
    survivors = semantic.resolve_survivors(pa.concat_tables(pairs), rows)
    row_of = rows[ROW].take(pc.index_in(survivors[KEY], rows[KEY]))
    count = survivors.num_rows
    log.info("semantic dedup: %d rows, %d clusters, %d duplicates", n, k, count)
    return pa.table({ROW: row_of, DROP_STAGE: pa.array([semantic.STAGE] * count, pa.string()),
                     DROP_REASON: pa.array([semantic.REASON] * count, pa.string()),
                     DROP_DETAIL: survivors["survivor_key"]}).cast(verdict_schema()).sort_by(ROW)



def _with_offsets(parts: Iterator[pa.Table]) -> Iterator[tuple[pa.Table, int]]:
    offset = 0
    for part in parts:
        yield part, offset
        offset += part.num_rows


def _vector_rows(part: pa.Table, offset: int, has_vector: np.ndarray) -> np.ndarray:
    """Vector rows of the part's alive rows that have an embedding."""
    live = alive(part).to_numpy(zero_copy_only=False) & has_vector[offset:offset + part.num_rows]
    return offset + np.flatnonzero(live)
