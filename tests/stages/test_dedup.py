import numpy as np
import pyarrow as pa

from curate.stages import dedup
from curate.stages.dedup import band_slices, flag_exact_duplicates, flag_phash_duplicates, phash_groups, phash_pairs
from curate.stages.verdict import survivor_order, with_verdict_columns


def test_survivor_rule_aesthetic_then_resolution_then_key():
    aesthetic = np.array([5.0, 6.0, 6.0, 6.0, np.nan])
    area = np.array([100, 50, 80, 80, 1000])
    keys = np.array(["e", "d", "c", "b", "a"])
    assert survivor_order(aesthetic, area, keys).tolist() == [3, 2, 1, 0, 4]


def test_bands_cover_64_bits():
    for k in range(0, 9):
        slices = band_slices(k)
        assert len(slices) == k + 1 and slices[0][0] == 0 and slices[-1][1] == 64
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))


def test_phash_pairs_match_brute_force():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=200, dtype=np.uint64)
    near = base[:50] ^ np.array([1 << int(b) for b in rng.integers(0, 64, size=50)], dtype=np.uint64)
    far = base[50:80] ^ np.uint64((1 << 10) - 1)  # 10 bits away
    hashes = np.concatenate([base, near, far])
    for k in (0, 4, 10):
        found = {tuple(p) for p in phash_pairs(hashes, k).tolist()}
        distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        i, j = np.nonzero(np.triu(distance <= k, 1))
        assert found == set(zip(i.tolist(), j.tolist(), strict=True)), k



def test_near_pairs_in_blocks_match_brute_force(monkeypatch):
    """The one pair search of both engines gives the same pairs whatever its block size (here 7 rows a block)."""
    rng = np.random.default_rng(1)
    hashes = np.unique(rng.integers(0, 2**12, size=300, dtype=np.uint64))  # small values: many near pairs
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    expected = set(zip(*(a.tolist() for a in np.nonzero(np.triu(distance <= 3, 1))), strict=True))
    whole = set(zip(*(a.tolist() for a in dedup.near_pairs(hashes, 3)), strict=True))
    monkeypatch.setattr(dedup, "PAIR_BLOCK", 7)
    blocked = set(zip(*(a.tolist() for a in dedup.near_pairs(hashes, 3)), strict=True))
    assert whole == blocked == expected and len(expected) > 300


def test_spark_components_are_the_local_groups():
    """The Spark driver's union-find over hash pairs labels each hash with its component's smallest hash, grouping
    the hashes exactly as the local engine's phash_groups does."""
    from curate.executors.spark.dedup import components

    rng = np.random.default_rng(2)
    hashes = np.unique(rng.integers(0, 2**10, size=200, dtype=np.uint64))
    i, j = dedup.near_pairs(hashes, 2)
    as_int = hashes.view(np.int64)
    mapping = components(pa.table({"left": pa.array(as_int[i]), "right": pa.array(as_int[j])})).to_pydict()
    component = dict(zip(mapping["phash"], mapping["component"], strict=True))
    local = phash_groups(hashes, 2)
    for a in range(len(hashes)):
        for b in (i[j == a].tolist() + j[i == a].tolist()):
            assert component[int(as_int[a])] == component[int(as_int[b])]
    spark_groups = {h: component.get(h, h) for h in as_int.tolist()}
    for a in range(len(hashes)):
        same_local = local == local[a]
        same_spark = np.array([spark_groups[h] == spark_groups[int(as_int[a])] for h in as_int.tolist()])
        assert np.array_equal(same_local, same_spark)
    assert all(spark_groups[h] <= h for h in as_int.tolist()) and len(set(local.tolist())) < len(hashes)


def test_identical_hashes_collapse_into_one_group():
    hashes = np.array([7] * 1000 + [7 ^ 0b11, 0b11111 << 40], dtype=np.uint64)
    labels = phash_groups(hashes, 4)
    assert len(set(labels[:1001].tolist())) == 1 and labels[1001] != labels[0]


def _table(**columns):
    return with_verdict_columns(pa.table(columns))


def test_exact_duplicates_keep_best_and_name_survivor():
    table = _table(key=["a", "b", "c", "d"], sha256=["x", "x", "y", None], aesthetic_score=[5.0, 6.0, 5.0, 5.0],
                   original_width=[10, 10, 10, 10], original_height=[10, 10, 10, 10])
    out = flag_exact_duplicates(table)
    assert out["drop_reason"].to_pylist() == ["duplicate_exact", None, None, None]
    assert out["drop_detail"].to_pylist() == ["b", None, None, None]


def test_phash_duplicates_skip_rows_already_dropped():
    table = _table(key=["a", "b", "c"], phash=pa.array([5, 5 ^ 1, 5 ^ 3], pa.int64()),
                   aesthetic_score=[5.0, 5.0, 9.0], original_width=[20, 10, 10], original_height=[10, 10, 10])
    table = table.set_column(table.column_names.index("drop_reason"), "drop_reason",
                             pa.array([None, None, "low_resolution"]))
    out = flag_phash_duplicates(table, 4)
    assert out["drop_reason"].to_pylist() == [None, "duplicate_phash", "low_resolution"]
    assert out["drop_detail"][1].as_py() == "a"  # larger resolution wins at equal score
