"""Dedup: exact content (sha256) and perceptual (pHash Hamming distance) duplicates across the whole run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import KEY, PHASH, SHA256
from curate.stages.components import merge_components
from curate.stages.hamming import near_pairs_in_bands
from curate.stages.verdict import alive, survivor_ranks, with_reason

STAGE = "dedup"


def survivors(labels: np.ndarray, table: pa.Table) -> np.ndarray:
    """For each row, the index of its group's survivor (the survivor rule of DESIGN.md); -1 where unlabelled."""
    order = np.argsort(survivor_ranks(table), kind="stable")
    order = order[labels[order] >= 0]
    _, first = np.unique(labels[order], return_index=True)  # the best row of each label comes first in order
    best = dict(zip(labels[order[first]].tolist(), order[first].tolist(), strict=True))
    return np.array([best.get(int(label), -1) for label in labels], dtype=np.int64)


def flag_group_duplicates(table: pa.Table, labels: np.ndarray, reason: str) -> pa.Table:
    """Flag every labelled row that is not its group's survivor; the detail is the survivor's key."""
    best = survivors(labels, table)
    keys = table[KEY].to_pylist()
    duplicate = (best >= 0) & (best != np.arange(table.num_rows))
    detail = [keys[b] if d else None for b, d in zip(best.tolist(), duplicate.tolist(), strict=True)]
    return with_reason(table, pa.array(duplicate), STAGE, reason, detail)


def flag_exact_duplicates(table: pa.Table) -> pa.Table:
    """Alive rows whose downloaded bytes have the same sha256."""
    candidates = pc.and_(alive(table), pc.is_valid(table[SHA256])).to_numpy(zero_copy_only=False)
    digests = np.asarray(table[SHA256].to_pylist(), dtype=object)
    labels = np.full(table.num_rows, -1, dtype=np.int64)
    if candidates.any():
        _, inverse = np.unique(digests[candidates].astype(str), return_inverse=True)
        labels[candidates] = inverse
    return flag_group_duplicates(table, labels, "duplicate_exact")


def band_slices(max_distance: int) -> list[tuple[int, int]]:
    """Split 64 bits into max_distance + 1 bands: two hashes within the distance agree on at least one band."""
    bands = max_distance + 1
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def phash_pairs(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Index pairs (i, j), i < j, of distinct hash values within max_distance bits (hamming.near_pairs_in_bands);
    of equal hashes one index stands for all."""
    hashes = hashes.astype(np.uint64)
    unique, first = np.unique(hashes, return_index=True)
    bands = np.repeat(np.arange(max_distance + 1), len(unique))
    left, right = near_pairs_in_bands(bands, np.tile(unique, max_distance + 1), max_distance)
    i, j = first[np.searchsorted(unique, left)], first[np.searchsorted(unique, right)]
    return np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1).astype(np.int64), axis=0)


def band_signatures(hashes: np.ndarray, max_distance: int) -> pa.Table:
    """(band, value, phash) for every distinct hash and band: hashes within max_distance share a (band, value)."""
    hashes = np.unique(np.asarray(hashes).astype(np.int64))
    as_unsigned = hashes.view(np.uint64)
    values = [((as_unsigned >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)
              for lo, hi in band_slices(max_distance)]
    return pa.table({"band": pa.array(np.repeat(np.arange(len(values), dtype=np.int8), len(hashes))),
                     "value": pa.array(np.concatenate(values)), PHASH: pa.array(np.tile(hashes, len(values)))})


def band_group_pairs(table: pa.Table, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) distinct hashes within max_distance bits, left < right as uint64, each pair once, from band
    signatures holding whole (band, value) groups: one Spark group, or one spilled partition of the local engine's."""
    left, right = near_pairs_in_bands(table["band"].to_numpy(), table[PHASH].to_numpy(), max_distance)
    return left.view(np.int64), right.view(np.int64)


def hash_components(left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hash, component) for every hash named in a pair: a union-find over pairs of hash values, never rows; a
    component is named by its smallest hash (as int64). Hashes in no pair are their own component."""
    ends = np.concatenate([left, right]).astype(np.int64)
    unique, inverse = np.unique(ends, return_inverse=True)
    labels = np.arange(len(unique), dtype=np.int64)
    merge_components(labels, inverse[:len(left)], inverse[len(left):])
    return unique, unique[labels]  # labels[x] is the smallest position in x's component, and unique is sorted


def component_of(hashes: np.ndarray, named: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Each hash's component from hash_components' (hash, component) arrays; a hash not named is its own."""
    hashes = np.asarray(hashes, dtype=np.int64)
    if not len(named):
        return hashes.copy()
    at = np.minimum(np.searchsorted(named, hashes), len(named) - 1)
    return np.where(named[at] == hashes, components[at], hashes)


def phash_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected-component label per hash; identical hashes collapse first so a huge group costs O(n)."""
    unique, inverse = np.unique(hashes.astype(np.uint64), return_inverse=True)
    pairs = phash_pairs(unique, max_distance)  # distinct values: one pair per near pair
    labels = np.arange(len(unique), dtype=np.int64)
    merge_components(labels, pairs[:, 0], pairs[:, 1])
    return labels[inverse]


def flag_phash_duplicates(table: pa.Table, max_distance: int) -> pa.Table:
    """Alive rows whose pHash is within max_distance bits of another alive row's, across the whole table."""
    candidates = pc.and_(alive(table), pc.is_valid(table[PHASH])).to_numpy(zero_copy_only=False)
    labels = np.full(table.num_rows, -1, dtype=np.int64)
    if candidates.any():
        hashes = table[PHASH].filter(pa.array(candidates)).to_numpy().view(np.uint64)
        labels[candidates] = phash_groups(hashes, max_distance)
    return flag_group_duplicates(table, labels, "duplicate_phash")
