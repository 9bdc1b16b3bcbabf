"""--decontaminate REF: drop images that are near-duplicates of a reference set (an evaluation set), as DataComp
does for its evaluation sets, inside the curation run.

REF is a folder (or list) of images or WebDataset tars, or a parquet file (a previous run's samples.parquet) with a
phash and/or an embedding column. Two steps, after the scores and before dedup:
- contaminates_reference_phash, a global step: every pHash's band values (dedup.band_slices: two hashes within the
  distance share one) as the group, the reference hashes' band values as rows -1 of the same groups; each group's
  (row hash, reference hash) pairs within --decontaminate-distance bits flag the row. Linear, memory one partition.
- contaminates_reference_semantic, a map step: each batch's CLIP embeddings against the reference's (loaded once a
  process; an evaluation set is thousands to a few hundred thousand images), cosine >= --decontaminate-cosine.
"""

from __future__ import annotations

import functools
import logging
import os
import tarfile
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import Config
from curate.pipeline.plan import DOWNLOAD_OPTIONS, RunFacts
from curate.pipeline.protocol import GROUP, REFERENCE_ROW, Global, Step
from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, EMBEDDING, PHASH, ROW
from curate.stages import dedup
from curate.stages.verdict import with_reason, with_verdict_columns

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PHASH_STEP, SEMANTIC_STEP = "decontaminate_phash", "decontaminate_semantic"
PHASH_REASON, SEMANTIC_REASON = "contaminates_reference_phash", "contaminates_reference_semantic"
SIGNATURE = pa.schema([(ROW, pa.int64()), (GROUP, pa.int64()), (PHASH, pa.int64())])


def reference_files(config: Config) -> list[str]:
    """The reference's files: a parquet file or folder of parquet parts, or image and tar files (a folder's, sorted)."""
    path = config.decontaminate
    if not path:
        return []
    if os.path.isdir(path):
        names = sorted(os.path.join(root, name) for root, _, files in os.walk(path) for name in files
                       if not name.startswith("."))
        found = [n for n in names if n.lower().endswith((*IMAGE_SUFFIXES, ".tar", ".parquet"))]
    else:
        fs, _, paths = fsspec.get_fs_token_paths(path)
        found = [path] if paths and fs.exists(paths[0]) else []
    if not found:
        raise ValueError(f"--decontaminate {path}: no images, tars or parquet files there")
    return found


def check(config: Config) -> None:
    reference_files(config)


def _images(path: str) -> Iterator[bytes]:
    """The image bytes of one reference file: the file itself, or a tar's image members."""
    if not path.lower().endswith(".tar"):
        with fsspec.open(path, "rb") as handle:
            yield handle.read()
        return
    with fsspec.open(path, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                extracted = tar.extractfile(member)
                if extracted is not None:
                    yield extracted.read()


def reference_hashes(config: Config, path: str) -> np.ndarray:
    """The pHashes of one reference file (images measured as the download measures the run's)."""
    if path.endswith(".parquet"):
        schema = pq.read_schema(path)
        if PHASH not in schema.names:
            return np.zeros(0, np.int64)
        column = pq.read_table(path, columns=[PHASH])[PHASH]
        return column.filter(pc.is_valid(column)).to_numpy().astype(np.int64)
    from curate.pipeline.plan import download_options
    from curate.stages.download import process_body


    options = download_options(config)
    found = [process_body(body, options).get(PHASH) for body in _images(path)]
    return np.array([value for value in found if value is not None], np.int64)


def _bands(rows: np.ndarray, hashes: np.ndarray, distance: int) -> pa.Table:
    """(row, group, phash) for each hash and band: the group names the band and its value."""
    slices = dedup.band_slices(distance)
    unsigned = hashes.view(np.uint64)
    groups = [(((unsigned >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64) * 64 + band)
              for band, (lo, hi) in enumerate(slices)]
    return pa.table({ROW: pa.array(np.tile(rows, len(slices)), pa.int64()),
                     GROUP: pa.array(np.concatenate([np.zeros(0, np.int64), *groups])),
                     PHASH: pa.array(np.tile(hashes, len(slices)), pa.int64())}, schema=SIGNATURE)


def read_reference(config: Config, path: str) -> Iterator[pa.Table]:
    hashes = reference_hashes(config, path)
    yield _bands(np.full(len(hashes), REFERENCE_ROW, np.int64), hashes, config.decontaminate_distance)


def bind_signature(config: Config, facts: RunFacts) -> Callable[[pa.Table], pa.Table]:
    def signature(table: pa.Table) -> pa.Table:
        if PHASH not in table.column_names:
            return SIGNATURE.empty_table()
        keep = pc.is_valid(table[PHASH])
        rows, hashes = table[ROW].filter(keep).to_numpy(), table[PHASH].filter(keep).to_numpy()
        return _bands(rows.astype(np.int64), hashes.astype(np.int64), config.decontaminate_distance)
    return signature


def bind_group(config: Config, facts: RunFacts) -> Callable[[pa.Table], pa.Table]:
    """Rows whose hash is within the distance of a reference hash of one of its groups; the detail names the
    closest distance found (zero-padded, so the executors' first verdict per row is the closest)."""
    def group(table: pa.Table) -> pa.Table:
        reference = pc.equal(table[ROW], REFERENCE_ROW)
        refs = table.filter(reference).select([GROUP, PHASH]).group_by([GROUP, PHASH]).aggregate([])
        rows = table.filter(pc.invert(reference))
        pairs = rows.join(refs.rename_columns([GROUP, "_reference"]), GROUP, join_type="inner")
        if not pairs.num_rows:
            return verdicts(pa.array([], pa.int64()), np.zeros(0, np.int64))
        xor = pairs[PHASH].to_numpy().view(np.uint64) ^ pairs["_reference"].to_numpy().view(np.uint64)
        bits = np.unpackbits(xor.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        near = bits <= config.decontaminate_distance
        return verdicts(pairs[ROW].filter(pa.array(near)), bits[near])
    return group


def verdicts(rows: pa.Array | pa.ChunkedArray, bits: np.ndarray) -> pa.Table:
    count = len(rows)
    return pa.table({ROW: pc.cast(rows, pa.int64()), DROP_STAGE: pa.array([PHASH_STEP] * count, pa.string()),
                     DROP_REASON: pa.array([PHASH_REASON] * count, pa.string()),
                     DROP_DETAIL: pa.array([f"pHash {b:02d} bits from a reference image" for b in bits.tolist()],
                                           pa.string())})


@functools.cache
def reference_embeddings(path: str) -> np.ndarray:
    """The reference's unit CLIP embeddings (float64), from its parquet files' embedding column; cached a process."""
    from curate.stages.semantic import embedding_matrix

    matrices = []
    for file in reference_files(Config(decontaminate=path)):
        if file.endswith(".parquet") and EMBEDDING in pq.read_schema(file).names:
            column = pq.read_table(file, columns=[EMBEDDING])[EMBEDDING]
            column = column.filter(pc.is_valid(column))
            if len(column):
                matrices.append(embedding_matrix(_fixed(column)).astype(np.float64))
    if not matrices:
        log.warning("--decontaminate %s holds no embedding column: the semantic check has nothing to compare", path)
        return np.zeros((0, 1))
    vectors = np.concatenate(matrices)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def _fixed(column: pa.ChunkedArray) -> pa.FixedSizeListArray:
    """Fixed-size list embeddings, whether stored fixed (local runs) or as variable lists (Spark runs)."""
    array = column.combine_chunks()
    if pa.types.is_fixed_size_list(array.type):
        return array
    width = len(array[0]) if len(array) else 1
    return pa.FixedSizeListArray.from_arrays(pc.list_flatten(array).cast(pa.float32()), width)


def bind_semantic(config: Config, facts: RunFacts) -> Callable[[pa.Table], pa.Table]:
    """A batch with its rows flagged whose embedding is within the cosine of a reference embedding."""
    from curate.stages.semantic import embedding_matrix

    threshold, path = config.decontaminate_cosine, config.decontaminate

    def apply(table: pa.Table) -> pa.Table:
        table = with_verdict_columns(table)
        if EMBEDDING not in table.column_names or not table.num_rows or path is None:
            return table
        reference = reference_embeddings(path)
        valid = pc.is_valid(table[EMBEDDING]).to_numpy(zero_copy_only=False)
        if not len(reference) or not valid.any():
            return table
        vectors = embedding_matrix(_fixed(table[EMBEDDING].filter(pa.array(valid)))).astype(np.float64)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        if vectors.shape[1] != reference.shape[1]:
            raise ValueError(f"--decontaminate {path}: its embeddings have {reference.shape[1]} dimensions, the "
                             f"run's {vectors.shape[1]} (another CLIP model); give images or that model's embeddings")
        best = np.full(table.num_rows, -2.0)
        best[valid] = (vectors @ reference.T).max(axis=1)
        hit = best >= threshold
        details = [f"CLIP cosine {value:.3f} to a reference image" for value in best.tolist()]
        return with_reason(table, pa.array(hit), SEMANTIC_STEP, SEMANTIC_REASON, details)
    return apply


def _enabled(config: Config) -> bool:
    return bool(config.decontaminate)


STEPS = (
    Step(PHASH_STEP, ("verdict",), frozenset({"decontaminate", "decontaminate_distance"}) | DOWNLOAD_OPTIONS,
         enabled=_enabled, check=check,
         reasons=(PHASH_REASON,),
         global_step=Global(bind_signature, bind_group, (PHASH,), references=reference_files,
                            read_reference=read_reference, reference_rows=lambda config, path: 1)),
    Step(SEMANTIC_STEP, ("verdict",), frozenset({"decontaminate", "decontaminate_cosine"}), bind=bind_semantic,
         enabled=_enabled, reasons=(SEMANTIC_REASON,)),
)
