import numpy as np
import pyarrow as pa
import pytest

from curate.stages import dedup, hamming
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



def _brute_force(hashes, k):
    distance = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(distance <= k, 1))
    return set(zip(np.minimum(hashes[i], hashes[j]).tolist(), np.maximum(hashes[i], hashes[j]).tolist(), strict=True))


def _planted(rng, n):
    """Random hashes, near copies 1-4 bits away, and a dense clump of small values (big band groups)."""
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    flips = [sum(1 << int(b) for b in rng.choice(64, size=rng.integers(1, 5), replace=False)) for _ in range(n // 4)]
    clump = rng.integers(0, 2**14, size=n // 2, dtype=np.uint64)
    return np.unique(np.concatenate([base, base[: n // 4] ^ np.array(flips, dtype=np.uint64), clump]))


@pytest.mark.parametrize("cap", [2, 16, hamming.GROUP_CAP])
def test_split_band_groups_find_each_near_pair_once(cap):
    """Splitting oversized band groups (down to 2 hashes a group) finds exactly the brute-force pairs, each once,
    at distances 1 to 8, on random hashes with planted near copies and a dense clump."""
    rng = np.random.default_rng(cap)
    hashes = _planted(rng, 1200)
    for k in (1, 4, 8):
        bands = np.repeat(np.arange(k + 1), len(hashes))
        left, right = hamming.near_pairs_in_bands(bands, np.tile(hashes, k + 1), k, cap)
        found = list(zip(left.tolist(), right.tolist(), strict=True))
        expected = _brute_force(hashes, k)
        assert len(found) == len(set(found)) and set(found) == expected and len(expected) > 200, k


def test_band_groups_in_any_partition_give_the_same_pairs():
    """Band signatures cut into partitions of whole (band, value) groups (the local spill, Spark's groups) yield the
    whole set's pairs, each pair in one partition only."""
    rng = np.random.default_rng(5)
    hashes = _planted(rng, 800)
    signatures = dedup.band_signatures(hashes.view(np.int64), 4)
    bucket = (signatures["value"].to_numpy() * 64 + signatures["band"].to_numpy()) % 7
    found = []
    for part in range(7):
        left, right = dedup.band_group_pairs(signatures.filter(pa.array(bucket == part)), 4)
        found += list(zip(left.view(np.uint64).tolist(), right.view(np.uint64).tolist(), strict=True))
    assert len(found) == len(set(found)) and set(found) == _brute_force(hashes, 4)


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
