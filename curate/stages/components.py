"""Connected components in numpy: the union-find every kind of duplicate grouping shares."""

from __future__ import annotations

import numpy as np


def compress(labels: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping)."""
    while True:
        parents = labels[labels]
        if np.array_equal(parents, labels):
            return
        labels[:] = parents


def merge_components(labels: np.ndarray, left: np.ndarray, right: np.ndarray) -> None:
    """Union-find in numpy: join the components of each pair; labels[x] ends as the smallest index of x's component.

    labels must be compressed with labels[x] <= x (np.arange(n) to start); it is updated in place.
    """
    while len(left):
        a, b = labels[left], labels[right]
        apart = a != b
        if not apart.any():
            return
        a, b = a[apart], b[apart]
        np.minimum.at(labels, np.maximum(a, b), np.minimum(a, b))  # hook the larger root under the smaller
        compress(labels)
        left, right = left[apart], right[apart]
