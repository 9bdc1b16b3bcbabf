"""The local engine's spilled global step gives the verdicts of grouping every row at once, part by part."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curate.executors.local.partitions import VerdictRouter, key_partitions, semantic_verdicts, spill
from curate.stages.ingest import format_key
from curate.stages.prefilter import group_url_duplicates
from curate.stages.semantic import flag_semantic_duplicates
from curate.stages.verdict import verdict_schema, verdicts_of


def _signatures(n: int, seed: int = 0) -> pa.Table:
    """url+caption signatures with repeats (same key and pair) and collisions (same key, other pair)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(-(2**63), 2**63 - 1, size=n // 2, dtype=np.int64)
    chosen = rng.integers(0, len(keys), size=n)
    pairs = np.where(rng.random(n) < 0.1, rng.integers(0, 3, size=n), 0) + chosen * 10
    return pa.table({"key": [format_key(int(k)) for k in keys[chosen]], "pair_hash": pa.array(pairs, pa.int64()),
                     "row": pa.array(np.arange(n), pa.int64())})


def test_partitions_of_keys_are_spread_and_stable():
    keys = _signatures(4000)["key"]
    parts = key_partitions(keys, 7)
    assert parts.min() == 0 and parts.max() == 6 and np.bincount(parts).min() > 400
    assert np.array_equal(parts, key_partitions(keys, 7))


def test_spilled_grouping_equals_grouping_everything(tmp_path):
    table = _signatures(6000)
    whole = group_url_duplicates(table)
    assert whole.num_rows > 1000 and set(whole["drop_reason"].to_pylist()) == {"duplicate_url", "key_collision"}
    part_starts = np.arange(0, 6000, 500)
    batches = [table.slice(start, 500) for start in part_starts]
    files = spill(batches, lambda t: key_partitions(t["key"], 5), 5, tmp_path / "signatures")
    assert len(files) == 5
    router = VerdictRouter(tmp_path / "verdicts", part_starts, 3)
    for path in files:
        router.write(group_url_duplicates(pq.read_table(path)))
    per_part = list(router.per_part(verdict_schema()))
    assert len(per_part) == len(part_starts)
    for start, verdicts in zip(part_starts, per_part, strict=True):
        rows = verdicts["row"].to_numpy()
        assert ((rows >= start) & (rows < start + 500)).all() and np.all(np.diff(rows) > 0)
    assert pa.concat_tables(per_part).equals(whole.cast(verdict_schema()))


def _dedup_signatures(rng: np.random.Generator, n: int) -> pa.Table:
    """Rows with exact copies (same sha256 and pHash), near pHash copies (1-3 bits off, chained) and distinct rows."""
    phash = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
    sha = np.array([f"{v:064x}" for v in rng.integers(0, 2**62, size=n)], dtype=object)
    for i in range(0, n - 3, 10):  # i+1 an exact copy of i, i+2 near i, i+3 near i+2 (a chain), some null hashes
        sha[i + 1], phash[i + 1] = sha[i], phash[i]
        phash[i + 2] = phash[i] ^ np.int64(0b101)
        phash[i + 3] = phash[i + 2] ^ np.int64(1 << 40)
    valid = rng.random(n) > 0.02
    return pa.table({
        "row": pa.array(np.arange(n, dtype=np.int64)),
        "key": pa.array([f"{k:016x}" for k in rng.permutation(n)]),
        "sha256": pa.array(sha.tolist(), pa.string()),
        "phash": pa.array(phash, mask=~valid),
        "aesthetic_score": pa.array(rng.uniform(3, 8, size=n).astype(np.float32)),
        "original_width": pa.array(rng.integers(200, 2000, size=n).astype(np.int32)),
        "original_height": pa.array(rng.integers(200, 2000, size=n).astype(np.int32)),
        "passes_thresholds": pa.array(rng.random(n) > 0.3),
    })


def test_partitioned_exact_and_phash_dedup_flags_what_the_whole_table_flags(tmp_path):
    """The local engine's dedup (signatures spilled by sha256, then by pHash, band values and components, each
    partition judged alone) gives the verdicts of judging the whole table at once, at any partition count."""
    from curate.executors.local.partitions import duplicate_verdicts
    from curate.stages.dedup import flag_exact_duplicates, flag_phash_duplicates
    from curate.stages.verdict import verdicts_of, with_verdict_columns

    table = with_verdict_columns(_dedup_signatures(np.random.default_rng(3), 3000))
    whole = verdicts_of(flag_phash_duplicates(flag_exact_duplicates(table), 4)).sort_by("row")
    assert set(whole["drop_reason"].to_pylist()) == {"duplicate_exact", "duplicate_phash"}
    parts = [table.slice(start, 700) for start in range(0, table.num_rows, 700)]
    for partitions in (1, 7):
        found = duplicate_verdicts(iter(parts), ["exact", "phash"], 4, partitions, tmp_path / f"work{partitions}")
        assert found.equals(whole), partitions
        assert not (tmp_path / f"work{partitions}").exists()
    exact_only = duplicate_verdicts(iter(parts), ["exact"], 4, 5, tmp_path / "exact")
    assert exact_only.equals(verdicts_of(flag_exact_duplicates(table)).sort_by("row"))


@pytest.mark.parametrize(("clusters", "partitions"), [(1, 1), (12, 5)])
def test_semantic_by_cluster_partitions_equals_the_whole_table(tmp_path, clusters, partitions):
    """Semantic dedup with signatures spilled by cluster and each partition grouped alone gives the verdicts of
    flag_semantic_duplicates on the whole table: planted copies, boundary rows, ties on score broken by size and key,
    rows without an embedding and rows an earlier step dropped."""
    from tests.stages.test_semantic import DIM, _table, planted_corpus

    vectors, truth = planted_corpus(1500, 120, 40, seed=3)
    n = len(vectors)
    rng = np.random.default_rng(4)
    has_vector = rng.random(n) > 0.03
    reason = [("duplicate_phash" if r < 0.05 else None) for r in rng.random(n)]
    table = _table(np.array([v if ok else None for v, ok in zip(vectors, has_vector, strict=True)], dtype=object),
                   aesthetic=list(np.round(rng.choice([5.0, 5.5, 6.0], n), 1)), width=list(rng.choice([512, 640], n)),
                   reason=reason, stage=[r and "dedup" for r in reason])
    table = table.append_column("row", pa.array(np.arange(100, 100 + n), pa.int64()))
    whole = verdicts_of(flag_semantic_duplicates(table, 0.95, clusters, seed=2)).filter(
        pc.equal(pc.field("drop_reason"), "duplicate_semantic"))
    assert whole.num_rows > len(truth) // 2
    memmap = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float16, shape=(n, DIM))
    memmap[has_vector] = vectors[has_vector]
    parts = [pa.Table.from_batches([b]) for b in table.drop_columns(["embedding"]).to_batches(max_chunksize=137)]
    found = semantic_verdicts(lambda: iter(parts), memmap, has_vector, 0.95, clusters, 2, tmp_path / "clusters",
                              partitions)
    assert found.equals(whole.sort_by("row").cast(verdict_schema()))
    assert not (tmp_path / "clusters").exists()
