"""Semantic dedup on synthetic embeddings with planted near-duplicates of known cosine."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate.stages import semantic
from curate.stages.components import merge_components
from curate.stages.semantic import (
    cluster_members,
    dedup_cluster,
    dedup_group,
    default_cluster_count,
    find_duplicates,
    flag_semantic_duplicates,
    resolve_survivors,
)

DIM = 128
EMBEDDING_TYPE = pa.list_(pa.float16(), DIM)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _at_cosine(x: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector with exactly this cosine to unit vector x."""
    u = rng.standard_normal(len(x))
    u = _unit(u - (u @ x) * x)
    return cosine * x + np.sqrt(1 - cosine**2) * u


def planted_corpus(n_base: int, n_groups: int, n_near_misses: int, seed: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """Base vectors around 20 centres, then duplicates (cosine 0.97-0.99) and near-misses (0.90-0.93) of some.

    Returns float16 vectors and {duplicate row: base row}; base rows come first, so each base is its group's survivor.
    """
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((20, DIM)))
    noise = _unit(rng.standard_normal((n_base, DIM)))
    base = _unit(centres[rng.integers(0, 20, n_base)] + noise)  # cosine ~0.5 between rows of one centre
    originals = rng.choice(n_base, n_groups + n_near_misses, replace=False)
    extra, truth = [], {}
    for i, original in enumerate(originals):
        copies = 1 + i % 3 if i < n_groups else 1
        for _ in range(copies):
            low, high = (0.97, 0.99) if i < n_groups else (0.90, 0.93)
            if i < n_groups:
                truth[n_base + len(extra)] = int(original)
            extra.append(_at_cosine(base[original], rng.uniform(low, high), rng))
    return np.vstack([base, np.array(extra)]).astype(np.float16), truth


def _flagged(survivor: np.ndarray) -> dict[int, int]:
    rows = np.flatnonzero(survivor != np.arange(len(survivor)))
    return {int(row): int(survivor[row]) for row in rows}


@pytest.mark.parametrize("clusters", [1, 8])
def test_every_planted_duplicate_found_and_nothing_else(clusters: int) -> None:
    vectors, truth = planted_corpus(3000, 150, 100)
    cluster, survivor = find_duplicates(vectors, np.arange(len(vectors)), 0.95, clusters=clusters)
    assert _flagged(survivor) == truth
    assert cluster.min() >= 0 and len(np.unique(cluster)) == clusters


def test_chain_keeps_exactly_one_even_when_ends_are_not_similar() -> None:
    e1, e2 = np.eye(4)[0], np.eye(4)[1]
    angle = np.arccos(0.96)
    a, b, c = (np.cos(t * angle) * e1 + np.sin(t * angle) * e2 for t in (0, 1, 2))
    assert a @ c < 0.95
    survivor = dedup_cluster(np.array([a, b, c]), np.array([2, 1, 0]), 0.95)  # c ranks best
    assert survivor.tolist() == [2, 2, 2]


def test_splitting_a_large_cluster_finds_the_same_duplicates() -> None:
    vectors, truth = planted_corpus(3000, 150, 50, seed=1)
    parts = list(semantic._parts(semantic.normalized(vectors), seed=0, max_size=800))
    assert len(parts) > 1 and max(len(part) for part in parts) < len(vectors)
    survivor = dedup_cluster(vectors, np.arange(len(vectors)), 0.95, max_size=800)
    assert _flagged(survivor) == truth


def test_boundary_rows_are_searched_in_both_clusters() -> None:
    nearest = np.array([0, 1, 1, 0])
    second = np.array([-1, 0, -1, -1])
    assert [m.tolist() for m in cluster_members(nearest, second)] == [[0, 1, 3], [1, 2]]


def test_merge_components_labels_each_row_with_its_smallest_member() -> None:
    rng = np.random.default_rng(3)
    n = 200
    left, right = rng.integers(0, n, 150), rng.integers(0, n, 150)
    labels = np.arange(n)
    merge_components(labels, left, right)
    expected = np.arange(n)  # naive fixpoint of min-label propagation
    while True:
        low = np.minimum(expected[left], expected[right])
        before = expected.copy()
        np.minimum.at(expected, left, low)
        np.minimum.at(expected, right, low)
        if np.array_equal(before, expected):
            break
    assert labels.tolist() == expected.tolist()


def test_process_pool_gives_the_same_result() -> None:
    vectors, truth = planted_corpus(1500, 60, 20, seed=2)
    _, survivor = find_duplicates(vectors, np.arange(len(vectors)), 0.95, clusters=4, workers=2)
    assert _flagged(survivor) == truth


def test_default_cluster_count_is_bounded() -> None:
    assert default_cluster_count(10) == 1
    assert default_cluster_count(1_000_000) == 100
    assert default_cluster_count(10**10) == 50_000


def _table(vectors: np.ndarray, **columns: list) -> pa.Table:
    n = len(vectors)
    embeddings = [None if v is None else np.asarray(v, np.float16).tolist() for v in vectors]
    data = {
        "key": columns.get("key", [f"{i:016x}" for i in range(n)]),
        "embedding": pa.array(embeddings, EMBEDDING_TYPE),
        "aesthetic_score": pa.array(columns.get("aesthetic", [5.0] * n), pa.float32()),
        "original_width": pa.array(columns.get("width", [512] * n), pa.int32()),
        "original_height": pa.array(columns.get("height", [512] * n), pa.int32()),
        "drop_stage": pa.array(columns.get("stage", [None] * n), pa.string()),
        "drop_reason": pa.array(columns.get("reason", [None] * n), pa.string()),
        "drop_detail": pa.array([None] * n, pa.string()),
    }
    return pa.table(data)


def _copies(rng: np.random.Generator, groups: int, size: int) -> list[np.ndarray]:
    rows = []
    for _ in range(groups):
        original = _unit(rng.standard_normal(DIM))
        rows += [original] + [_at_cosine(original, 0.98, rng) for _ in range(size - 1)]
    return rows


def test_survivor_rule_aesthetic_then_area_then_key() -> None:
    rows = _copies(np.random.default_rng(4), groups=3, size=3)
    aesthetic = [5.0, 7.0, 6.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0]  # group 0: row 1 has the best score
    width = [512, 512, 512, 512, 1024, 512, 512, 512, 512]  # group 1: row 4 is largest
    keys = [f"{i:016x}" for i in (10, 11, 12, 13, 14, 15, 18, 17, 16)]  # group 2: row 8 has the smallest key
    out = flag_semantic_duplicates(_table(np.array(rows), key=keys, aesthetic=aesthetic, width=width), 0.95, None)
    assert out["drop_reason"].to_pylist() == [None if i in (1, 4, 8) else "duplicate_semantic" for i in range(9)]
    assert set(out["drop_stage"].drop_null().to_pylist()) == {"dedup"}
    survivors = [keys[1]] * 3 + [keys[4]] * 3 + [keys[8]] * 3
    assert out["drop_detail"].to_pylist() == [None if i in (1, 4, 8) else survivors[i] for i in range(9)]


def test_null_embeddings_and_earlier_verdicts_are_untouched() -> None:
    rows: list = _copies(np.random.default_rng(5), groups=2, size=2) + [None]
    reason = [None, None, "duplicate_phash", None, None]  # row 2's copy (row 3) then has no live duplicate
    stage = [None, None, "dedup", None, None]
    table = _table(np.array(rows, dtype=object), reason=reason, stage=stage)
    out = flag_semantic_duplicates(table, 0.95, clusters=2)
    assert out["drop_reason"].to_pylist() == [None, "duplicate_semantic", "duplicate_phash", None, None]
    assert out["drop_detail"].to_pylist() == [None, "0000000000000000", None, None, None]
    assert out.num_rows == table.num_rows and out["key"].equals(table["key"])



def test_embeddings_from_a_memory_map_flag_what_the_column_flags(tmp_path) -> None:
    """The local engine reads embeddings from a memory map on disk (a cluster at a time), not the table's column:
    the verdicts are the same, null embeddings and earlier verdicts included."""
    rng = np.random.default_rng(6)
    rows: list = _copies(rng, groups=6, size=3) + [None, None]
    reason = [None] * len(rows)
    reason[4] = "duplicate_phash"
    table = _table(np.array(rows, dtype=object), reason=reason, stage=[r and "dedup" for r in reason])
    vectors = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float16, shape=(len(rows), DIM))
    has_vector = np.array([r is not None for r in rows])
    vectors[has_vector] = np.array([r for r in rows if r is not None], np.float16)
    by_column = flag_semantic_duplicates(table, 0.95, clusters=2)
    by_map = flag_semantic_duplicates(table.drop_columns(["embedding"]), 0.95, 2, 0, vectors, has_vector)
    assert by_map.select(["drop_reason", "drop_detail"]).equals(by_column.select(["drop_reason", "drop_detail"]))
    assert by_map["drop_reason"].to_pylist().count("duplicate_semantic") == 6 * 2 - 1


def test_too_few_rows_returns_the_table_unchanged() -> None:
    table = _table(np.array([None, _unit(np.ones(DIM))], dtype=object))
    assert flag_semantic_duplicates(table, 0.95, None).equals(table)


def test_per_group_results_join_across_clusters() -> None:
    """A boundary row searched in two clusters links both components; one survivor remains."""
    e1, e2 = np.eye(DIM)[0], np.eye(DIM)[1]
    angle = np.arccos(0.96)
    a, b, c = (np.cos(t * angle) * e1 + np.sin(t * angle) * e2 for t in (0, 1, 2))
    table = _table(np.array([a, b, c]), aesthetic=[5.0, 5.0, 9.0])
    first = dedup_group(table.take([0, 1]), 0.95)  # cluster 0 holds a and visitor b
    second = dedup_group(table.take([1, 2]), 0.95)  # cluster 1 holds b and c
    pairs = pa.concat_tables([first, second])
    result = resolve_survivors(pairs, table.select(["key", "aesthetic_score", "original_width", "original_height"]))
    assert dict(zip(result["key"].to_pylist(), result["survivor_key"].to_pylist(), strict=True)) == {
        "0000000000000000": "0000000000000002",
        "0000000000000001": "0000000000000002",
    }
