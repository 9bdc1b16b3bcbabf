"""`curate dedup-embeddings`: semantic dedup on precomputed embedding files, before any image is downloaded.

LAION publishes CLIP ViT-L/14 image embeddings of LAION-5B as float16 .npy files beside the metadata parquet
files, in the same row order. The files are memory-mapped and read a bounded number of vectors at a time.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.stages.semantic import find_duplicates
from curate.stages.verdict import ranks_by_survivor_rule

log = logging.getLogger(__name__)

AESTHETIC_COLUMNS = ("AESTHETIC_SCORE", "aesthetic")
WIDTH_COLUMNS = ("WIDTH", "width")
HEIGHT_COLUMNS = ("HEIGHT", "height")

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("cluster", pa.int64(), nullable=False),
        pa.field("keep", pa.bool_(), nullable=False),
        pa.field("duplicate_of", pa.int64(), nullable=True),
    ],
    metadata={"doc": "one row per input embedding: global row number, k-means cluster, kept or the survivor's index"},
)


class ConcatenatedVectors:
    """Several .npy files, memory-mapped, read as one n × d array (row slices and index arrays)."""

    def __init__(self, paths: list[str]) -> None:
        if not paths:
            raise ValueError("dedup-embeddings: give at least one EMB.npy file")
        self.parts = [self._open(path) for path in paths]
        widths = {part.shape[1] for part in self.parts}
        if len(widths) != 1:
            raise ValueError(f"dedup-embeddings: the files have different embedding widths {sorted(widths)}")
        self.offsets = np.cumsum([0] + [len(part) for part in self.parts])
        self.shape = (int(self.offsets[-1]), widths.pop())

    @staticmethod
    def _open(path: str) -> np.ndarray:
        if not Path(path).is_file():
            raise ValueError(f"dedup-embeddings: no file at {path}")
        array = np.load(path, mmap_mode="r")
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"{path}: expected a 2-d float array (n × d), got {array.dtype} {array.shape}")
        return array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=self.parts[0].dtype)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(part_of):
            chosen = part_of == part
            local = rows[chosen] - self.offsets[part]
            if len(local) and np.all(np.diff(local) == 1):
                out[chosen] = self.parts[part][local[0] : local[-1] + 1]  # a contiguous run: one sequential read
            else:
                out[chosen] = self.parts[part][local]
        return out


def _first_present(names: tuple[str, ...], available: list[str]) -> str | None:
    return next((name for name in names if name in available), None)


def metadata_ranks(path: str, n: int) -> np.ndarray:
    """Survivor-rule ranks from a metadata parquet file in the embeddings' row order (index breaks ties)."""
    if not Path(path).is_file():
        raise ValueError(f"--metadata: no file at {path}")
    available = pq.read_schema(path).names
    columns = {
        role: _first_present(names, available)
        for role, names in (("aesthetic", AESTHETIC_COLUMNS), ("width", WIDTH_COLUMNS), ("height", HEIGHT_COLUMNS))
    }
    table = pq.read_table(path, columns=[name for name in columns.values() if name is not None])
    if table.num_rows != n:
        raise ValueError(
            f"--metadata {path}: {table.num_rows} rows but the embeddings hold {n}; "
            "give the metadata files' rows in the same order as the embedding files'"
        )

    def values(role: str) -> np.ndarray:
        name = columns[role]
        if name is None:
            return np.full(n, np.nan)
        return table[name].cast(pa.float64()).to_numpy(zero_copy_only=False)

    return ranks_by_survivor_rule(values("aesthetic"), values("width") * values("height"), np.arange(n))


def write_atomically(table: pa.Table, output: str) -> None:
    """Write a parquet file under a temporary name, then rename it into place."""
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def dedup_embeddings(
    paths: list[str],
    output: str,
    threshold: float = 0.95,
    metadata: str | None = None,
    clusters: int | None = None,
    seed: int = 0,
    workers: int = 1,
) -> pa.Table:
    """Find semantic duplicates among the vectors of the .npy files and write one row per vector to output."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"--threshold must be in (0, 1], got {threshold}")
    if clusters is not None and clusters < 1:
        raise ValueError(f"--clusters must be at least 1, got {clusters}")
    vectors = ConcatenatedVectors(paths)
    n = len(vectors)
    ranks = metadata_ranks(metadata, n) if metadata else np.arange(n, dtype=np.int64)
    cluster, survivor = find_duplicates(vectors, ranks, threshold, clusters, seed, workers)
    keep = survivor == np.arange(n)
    result = pa.table(
        [
            pa.array(np.arange(n, dtype=np.int64)),
            pa.array(cluster),
            pa.array(keep),
            pa.array(survivor, mask=keep),
        ],
        schema=OUTPUT_SCHEMA,
    )
    write_atomically(result, output)
    log.info("dedup-embeddings: %d vectors, %d duplicates, written to %s", n, int((~keep).sum()), output)
    return result
