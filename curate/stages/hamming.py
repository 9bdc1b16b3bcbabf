"""Near pairs of 64-bit hashes (Hamming distance <= k) in groups of bounded size: multi-index hashing, split again.

Pigeonhole: two hashes within k bits agree exactly on at least one of k + 1 disjoint pieces of their bits. Level 1
cuts the 64 bits into k + 1 bands (`dedup.band_slices`); hashes that share a band value form a group. A group larger
than GROUP_CAP is split the same way over its remaining bits: members of the group agree on the band, so a near pair
differs in at most k of the other bits and agrees on one of k + 1 pieces of those. Splitting repeats (at most
MAX_DEPTH levels) until every group holds GROUP_CAP hashes or fewer, or stops shrinking (then its hashes agree on
most of their bits, and such hashes are few), where pairs are checked exactly. Which groups split changes the work,
never the result.

A pair is emitted only from its canonical path: at every level, the first piece the two agree on. So it comes out
exactly once over all bands and splits (no distinct, no pair counted twice), and recall is exact: the canonical
path's groups hold both hashes at every level. Work per hash is (k + 1)^levels x GROUP_CAP comparisons at most,
constant in n; the levels are vectorized, never a Python loop per group.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

GROUP_CAP = 32  # hashes a group may hold before it is split: a leaf costs cap / 2 popcounts a hash, a split k + 1 rows
MAX_DEPTH = 6  # levels of splitting at most; 64 bits x (k / (k + 1))^6 remain, enough to tell hashes apart
SHRINK = 2  # a group is split again only if it is at most half its parent: a split that does not shrink costs k + 1
ALL_BITS = (1 << 64) - 1


def piece_masks(remaining: int, max_distance: int) -> tuple[int, ...]:
    """The set bits of remaining, lowest first, cut into max_distance + 1 runs as even as possible (as masks)."""
    bits = [b for b in range(64) if remaining >> b & 1]
    edges = np.linspace(0, len(bits), max_distance + 2).round().astype(int)
    return tuple(sum(1 << b for b in bits[lo:hi]) for lo, hi in zip(edges[:-1], edges[1:], strict=True))


@lru_cache(maxsize=1 << 16)
def path_masks(path: tuple[int, ...], max_distance: int) -> tuple[int, int]:
    """(agreed, remaining) bits of a path of piece choices: the union of its pieces, and the bits left to split."""
    agreed, remaining = 0, ALL_BITS
    for piece in path:
        chosen = piece_masks(remaining, max_distance)[piece]
        agreed, remaining = agreed | chosen, remaining & ~chosen
    return agreed, remaining


def _path_of(path_id: int, depth: int, base: int) -> tuple[int, ...]:
    digits = []
    for _ in range(depth):
        path_id, digit = divmod(path_id, base)
        digits.append(digit)
    return tuple(reversed(digits))


def _lookup(path_ids: np.ndarray, depth: int, max_distance: int, value: str) -> np.ndarray:
    """Per row, a uint64 mask of its path: 'agreed' bits, 'remaining' bits, or the (rows x k+1) child piece masks."""
    width = max_distance + 1 if value == "children" else 1
    if not len(path_ids):
        return np.zeros((0, width), dtype=np.uint64)
    unique, inverse = np.unique(path_ids, return_inverse=True)
    table = []
    for path_id in unique.tolist():
        agreed, remaining = path_masks(_path_of(path_id, depth, max_distance + 1), max_distance)
        table.append({"agreed": [agreed], "remaining": [remaining],
                      "children": list(piece_masks(remaining, max_distance))}[value])
    return np.array(table, dtype=np.uint64).reshape(len(unique), width)[inverse]


def _canonical(xor: np.ndarray, path_ids: np.ndarray, depth: int, max_distance: int) -> np.ndarray:
    """True where a pair (given as left ^ right) is at its canonical path: at each level its first agreeing piece."""
    base, keep = max_distance + 1, np.ones(len(xor), dtype=bool)
    for level in range(depth):
        at_level = path_ids // base ** (depth - level - 1)  # the path's first level + 1 pieces, as an id
        children = _lookup(at_level // base, level, max_distance, "children")
        agree = (xor[:, None] & children) == 0
        keep &= np.argmax(agree, axis=1) == at_level % base
    return keep


def _leaf_pairs(hashes: np.ndarray, starts: np.ndarray, sizes: np.ndarray, max_distance: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Positions (a, b), a < b, of hashes within max_distance bits in the same group (groups are contiguous runs)."""
    offsets = (np.cumsum(sizes) - sizes).astype(np.int64)
    position = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes)  # of each row inside its group
    after = np.repeat(sizes, sizes) - position - 1  # rows after it in its group
    rows = np.repeat(starts, sizes) + position
    left, right = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    active = np.flatnonzero(after > 0)
    shift = 1
    while len(active):  # pairs (i, i + shift) inside a group, for every shift at once: no loop over groups
        a, b = rows[active], rows[active] + shift
        near = np.bitwise_count(hashes[a] ^ hashes[b]) <= max_distance
        left.append(a[near])
        right.append(b[near])
        shift += 1
        active = active[after[active] >= shift]
    return np.concatenate(left), np.concatenate(right)


def near_pairs_in_bands(bands: np.ndarray, hashes: np.ndarray, max_distance: int, cap: int = GROUP_CAP
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) hash values within max_distance bits, left < right as uint64, each pair once, from rows of
    (band, hash): the band signatures of some band groups (each (band, band value) group whole; its hashes distinct).
    Oversized groups are split as the module docstring says; the result is the same for any grouping of the rows."""
    hashes = np.asarray(hashes).view(np.uint64) if np.asarray(hashes).dtype == np.int64 else hashes.astype(np.uint64)
    paths, depth, base = np.asarray(bands, dtype=np.int64), 1, max_distance + 1
    agreed = _lookup(paths, 0, max_distance, "children")[np.arange(len(paths)), paths]  # each row's band mask
    parents = np.full(len(hashes), np.iinfo(np.int64).max)  # the size of each row's parent group
    left, right = [np.zeros(0, np.uint64)], [np.zeros(0, np.uint64)]
    while len(hashes):
        keys = hashes & agreed
        order = np.lexsort((keys, paths))
        paths, keys, hashes, agreed, parents = paths[order], keys[order], hashes[order], agreed[order], parents[order]
        starts = np.flatnonzero(np.r_[True, (paths[1:] != paths[:-1]) | (keys[1:] != keys[:-1])])
        sizes = np.diff(np.r_[starts, len(hashes)])
        bits = 64 - np.bitwise_count(agreed[starts])
        # split what is over the cap, has bits left and shrank: hashes that agree on most bits are few
        split = (sizes > cap) & (depth < MAX_DEPTH) & (bits > base) & (sizes * SHRINK <= parents[starts])
        leaf = ~split & (sizes > 1)
        a, b = _leaf_pairs(hashes, starts[leaf], sizes[leaf], max_distance)
        keep = _canonical(hashes[a] ^ hashes[b], paths[a], depth, max_distance)
        left.append(np.minimum(hashes[a], hashes[b])[keep])
        right.append(np.maximum(hashes[a], hashes[b])[keep])
        # the rows of split groups go on, each into its k + 1 pieces of the bits its group has not agreed on
        pieces = np.repeat(_lookup(paths[starts[split]], depth, max_distance, "children"), sizes[split], axis=0)
        grown = np.repeat(split, sizes)
        hashes, parents = np.repeat(hashes[grown], base), np.repeat(np.repeat(sizes, sizes)[grown], base)
        agreed = (agreed[grown, None] | pieces).ravel()
        paths = (paths[grown, None] * base + np.arange(base)).ravel()
        depth += 1
    return np.concatenate(left), np.concatenate(right)
