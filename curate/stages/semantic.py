"""Semantic near-duplicates (SemDeDup): spherical k-means with faiss, then exact pair search inside each cluster.

The flow, each step a pure function both engines call:
  1. `train_centroids` on a bounded sample of the unit embeddings (k from `default_cluster_count` or the option);
  2. `assign_clusters` in bounded batches (a map step); a row within BOUNDARY_MARGIN of a second centroid is also
     searched in that cluster, so pairs a boundary splits are still found;
  3. `dedup_cluster` per cluster (a per-group step): pairs with cosine >= threshold (exact, blocked matrix product),
     their connected components (union-find), one survivor per component by the survivor rule
     (`verdict.survivor_order`). Clusters over MAX_CLUSTER_SIZE are split by a second-level k-means first;
  4. components that boundary rows link across clusters are joined (`find_duplicates`; `resolve_survivors` on Spark).
`dedup_group` is step 3 over an Arrow table, for Spark's `applyInArrow`; `flag_semantic_duplicates` is the stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import AESTHETIC_SCORE, EMBEDDING, KEY, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, PASSES_THRESHOLDS
from curate.stages.components import merge_components
from curate.stages.verdict import alive, survivor_ranks, with_reason, with_verdict_columns

log = logging.getLogger(__name__)

STAGE = "dedup"
REASON = "duplicate_semantic"
ITEMS_PER_CLUSTER = 10_000
MAX_CLUSTERS = 50_000
TRAIN_POINTS_PER_CLUSTER = 256  # faiss's own default cap: more training points cost time, not quality
MAX_TRAIN_POINTS = 2_000_000
ASSIGN_BATCH = 65_536
MAX_CLUSTER_SIZE = 4_096  # larger clusters are split by a second-level k-means (pair search is quadratic)
SPLIT_FACTOR = 4  # a split aims at sub-clusters of max_size / 4 rows, well under the limit
MAX_SPLIT_DEPTH = 2
BLOCK_ELEMENTS = 1 << 24  # one similarity block holds at most 16M float32 (64 MiB)
SMALL_FAISS_WORK = 1e9  # multiply-adds per pass below which faiss runs on one thread
BOUNDARY_MARGIN = 0.02  # rows this close (in cosine) to a second centroid are searched there too


class VectorSource(Protocol):
    """An n × d array of embeddings: a numpy array, a memory map, or anything sliced and indexed like one."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, index: Any) -> Any: ...


def default_cluster_count(n: int) -> int:
    """About one cluster per 10,000 items, at least 1 and at most 50,000."""
    return int(min(MAX_CLUSTERS, max(1, round(n / ITEMS_PER_CLUSTER))))


def normalized(vectors: np.ndarray) -> np.ndarray:
    """A float32 copy with unit rows (zero rows stay zero)."""
    unit = np.array(vectors, dtype=np.float32, copy=True)
    norms = np.sqrt(np.einsum("ij,ij->i", unit, unit))[:, None]  # faster than np.linalg.norm on float32
    np.divide(unit, norms, out=unit, where=norms > 0)
    return unit


@contextmanager
def _faiss_threads(work: float) -> Iterator[None]:
    """Run small faiss calls on one thread: OpenMP start-up and spin-waiting cost more than they save."""
    before = faiss.omp_get_max_threads()
    if work < SMALL_FAISS_WORK:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def train_centroids(sample: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means centroids (k × d, unit rows) of a sample of vectors."""
    unit = normalized(sample)
    k = max(1, min(k, len(unit)))
    if k == 1:
        return normalized(unit.mean(axis=0, keepdims=True))
    kmeans = faiss.Kmeans(
        unit.shape[1],
        k,
        niter=niter,
        spherical=True,
        seed=seed,
        verbose=False,
        max_points_per_centroid=TRAIN_POINTS_PER_CLUSTER,
        min_points_per_centroid=1,
    )
    with _faiss_threads(unit.size * k):
        kmeans.train(unit)
    return np.asarray(kmeans.centroids)


def training_sample(source: VectorSource, k: int, seed: int = 0) -> np.ndarray:
    """A seeded sample of at most k × 256 (and 2M) rows, read in row order (cheap on a memory map)."""
    n = source.shape[0]
    size = min(n, k * TRAIN_POINTS_PER_CLUSTER, MAX_TRAIN_POINTS)
    if size == n:
        return np.asarray(source[0:n])
    rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return np.asarray(source[rows])


def assign_clusters(
    source: VectorSource, centroids: np.ndarray, margin: float = BOUNDARY_MARGIN, batch_size: int = ASSIGN_BATCH
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row, and its second nearest where that is within margin in cosine (else -1).

    A row near a boundary is searched in both clusters, so a duplicate pair split by the boundary is still found.
    """
    n = source.shape[0]
    nearest, second = np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    if len(centroids) == 1:
        return nearest, second
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    for start in range(0, n, batch_size):
        batch = normalized(source[start : start + batch_size])
        with _faiss_threads(batch.size * len(centroids)):
            sims, ids = index.search(batch, 2)
        nearest[start : start + len(ids)] = ids[:, 0]
        second[start : start + len(ids)] = np.where(sims[:, 0] - sims[:, 1] <= margin, ids[:, 1], -1)
    return nearest, second


def cluster_members(nearest: np.ndarray, second: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices (ascending) searched in each non-empty cluster: its own rows and its boundary visitors."""
    rows = np.arange(len(nearest))
    if second is not None:
        visitors = second >= 0
        nearest, rows = np.concatenate([nearest, second[visitors]]), np.concatenate([rows, rows[visitors]])
    order = np.lexsort((rows, nearest))
    bounds = np.flatnonzero(np.diff(nearest[order])) + 1
    return [rows[part] for part in np.split(order, bounds) if len(part)]


def join_similar(unit: np.ndarray, threshold: float, labels: np.ndarray, ids: np.ndarray) -> None:
    """Merge labels[ids[i]] and labels[ids[j]] for every pair of rows with inner product >= threshold (exact)."""
    n = len(unit)
    block = max(1, min(n, BLOCK_ELEMENTS // max(n, 1)))
    for start in range(0, n, block):
        sims = unit[start : start + block] @ unit[start:].T  # upper triangle only, in bounded blocks
        rows, cols = np.nonzero(sims >= threshold)
        upper = cols > rows
        merge_components(labels, ids[rows[upper] + start], ids[cols[upper] + start])


def _parts(unit: np.ndarray, seed: int, max_size: int, depth: int = 0) -> Iterator[np.ndarray]:
    """Ascending row sets of about max_size rows at most, split by second-level k-means (boundary rows in two)."""
    n = len(unit)
    if n <= max_size or depth >= MAX_SPLIT_DEPTH:
        yield np.arange(n)
        return
    k = math.ceil(SPLIT_FACTOR * n / max_size)
    nearest, second = assign_clusters(unit, train_centroids(training_sample(unit, k, seed), k, seed))
    if np.bincount(nearest).max() == n:  # e.g. all rows identical: nothing to split on
        yield np.arange(n)
        return
    log.debug("split a cluster of %d rows into %d", n, k)
    for members in cluster_members(nearest, second):
        for inner in _parts(unit[members], seed, max_size, depth + 1):
            yield members[inner]


def dedup_cluster(
    vectors: np.ndarray, ranks: np.ndarray, threshold: float, seed: int = 0, max_size: int = MAX_CLUSTER_SIZE
) -> np.ndarray:
    """The survivor of every row of one cluster, as a position into vectors (a kept row points at itself).

    vectors: n × d floats (any dtype, normalized here); ranks: n distinct integers, lower is better (the survivor
    rule). Rows with cosine >= threshold chain into connected components; each component keeps its lowest rank.
    Pure and picklable, so a process pool or a Spark per-group function can call it as is.
    """
    n = len(vectors)
    if n < 2:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(ranks, kind="stable")  # best first, so a component's smallest position is its survivor
    unit = normalized(np.asarray(vectors)[order])
    labels = np.arange(n, dtype=np.int64)
    for part in _parts(unit, seed, max_size):
        join_similar(unit[part], threshold, labels, part)
    survivor = np.empty(n, dtype=np.int64)
    survivor[order] = order[labels]
    return survivor


def _cluster_results(
    source: VectorSource, ranks: np.ndarray, groups: list[np.ndarray], threshold: float, seed: int, workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(members, survivor positions) per cluster with two or more rows; at most 2 × workers clusters in flight."""
    groups = [members for members in groups if len(members) > 1]
    if workers <= 1:
        for members in groups:
            yield members, dedup_cluster(source[members], ranks[members], threshold, seed)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: list[tuple[np.ndarray, Future]] = []
        for members in groups:
            pending.append((members, pool.submit(dedup_cluster, source[members], ranks[members], threshold, seed)))
            while len(pending) >= 2 * workers:
                done, future = pending.pop(0)
                yield done, future.result()
        for done, future in pending:
            yield done, future.result()


def find_duplicates(
    source: VectorSource,
    ranks: np.ndarray,
    threshold: float,
    clusters: int | None = None,
    seed: int = 0,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster id and survivor row of every row of source (n × d); ranks order the rows best first (lower wins).

    Components that cross clusters (through boundary rows searched in two) are joined here, in rank order.
    """
    n = source.shape[0]
    k = max(1, min(clusters or default_cluster_count(n), n))
    centroids = train_centroids(training_sample(source, k, seed), k, seed) if k > 1 else np.ones((1, 1), np.float32)
    nearest, second = assign_clusters(source, centroids)
    order = np.argsort(ranks, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    left, right = [], []
    for members, local in _cluster_results(source, ranks, cluster_members(nearest, second), threshold, seed, workers):
        moved = local != np.arange(len(members))
        left.append(position[members[moved]])
        right.append(position[members[local[moved]]])
    labels = np.arange(n, dtype=np.int64)
    if left:
        merge_components(labels, np.concatenate(left), np.concatenate(right))
    survivor = order[labels[position]]
    log.info("semantic dedup: %d rows, %d clusters, %d duplicates", n, k, int((survivor != np.arange(n)).sum()))
    return nearest, survivor


def embedding_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed_size_list embedding column without nulls as an n × d numpy array (float16 stays float16)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = array.type.list_size
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def dedup_group(table: pa.Table, threshold: float, seed: int = 0) -> pa.Table:
    """One cluster's rows (its own and its boundary visitors) to (key, survivor_key): the Spark per-group function.

    Input columns: key, embedding (no nulls), aesthetic_score, original_width, original_height. A Spark engine runs
    `train_centroids` on a driver sample, `assign_clusters` in mapInArrow (a row with a second cluster is emitted
    twice), `groupBy("cluster").applyInArrow(lambda t: dedup_group(t, threshold, seed), "key string, survivor_key
    string")`, then `resolve_survivors` on the rows whose survivor_key differs from their key.
    """
    positions = dedup_cluster(embedding_matrix(table[EMBEDDING]), survivor_ranks(table), threshold, seed)
    return pa.table({KEY: table[KEY], "survivor_key": table[KEY].take(pa.array(positions))})


def resolve_survivors(pairs: pa.Table, rows: pa.Table) -> pa.Table:
    """Final (key, survivor_key) of every non-survivor, joining components that per-group results link.

    pairs: key, survivor_key from dedup_group; rows: key, aesthetic_score, original_width, original_height of every
    key named in pairs (each once).
    """
    keys = rows[KEY]
    order = np.argsort(survivor_ranks(rows), kind="stable")
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    left = pc.index_in(pairs[KEY], keys).to_numpy(zero_copy_only=False)
    right = pc.index_in(pairs["survivor_key"], keys).to_numpy(zero_copy_only=False)
    labels = np.arange(len(order), dtype=np.int64)
    merge_components(labels, position[left], position[right])
    survivor = order[labels[position]]
    duplicate = survivor != np.arange(len(order))
    return pa.table({KEY: keys.filter(pa.array(duplicate)), "survivor_key": keys.take(pa.array(survivor[duplicate]))})


class RowSubset:
    """Some rows of a VectorSource, indexed as an array of their own: a memory map is read only where indexed."""

    def __init__(self, source: VectorSource, rows: np.ndarray) -> None:
        self.source, self.rows = source, rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.shape[1:])

    def __getitem__(self, index: Any) -> Any:
        return np.asarray(self.source[self.rows[index]])


def flag_semantic_duplicates(table: pa.Table, threshold: float, clusters: int | None, seed: int = 0,
                             vectors: VectorSource | None = None, has_vector: np.ndarray | None = None) -> pa.Table:
    """Flag rows whose embedding has cosine >= threshold with a better row's (chained); detail names the survivor.

    The embeddings come from the table's embedding column, or from vectors (row i of the table is row i of vectors,
    e.g. a memory map on disk; has_vector marks the rows that have one), which is then read a cluster at a time.
    """
    table = with_verdict_columns(table)
    if vectors is None or has_vector is None:
        has_vector = pc.is_valid(table[EMBEDDING]).to_numpy(zero_copy_only=False)
    candidates = np.flatnonzero(alive(table).to_numpy(zero_copy_only=False) & has_vector)
    if len(candidates) < 2:
        return table
    needed = [
        name
        for name in (KEY, AESTHETIC_SCORE, ORIGINAL_WIDTH, ORIGINAL_HEIGHT, PASSES_THRESHOLDS)
        if name in table.column_names
    ]
    rows = table.select(needed).take(pa.array(candidates))
    source = (embedding_matrix(table[EMBEDDING].take(pa.array(candidates))) if vectors is None
              else RowSubset(vectors, candidates))
    _, survivor = find_duplicates(source, survivor_ranks(rows), threshold, clusters, seed)
    duplicate = survivor != np.arange(len(candidates))
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[candidates[duplicate]] = True
    detail = np.full(table.num_rows, None, dtype=object)
    detail[candidates[duplicate]] = rows[KEY].to_numpy(zero_copy_only=False)[survivor[duplicate]]
    return with_reason(table, mask, STAGE, REASON, detail=pa.array(detail, pa.string()))
