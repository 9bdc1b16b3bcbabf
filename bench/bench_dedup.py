"""Semantic dedup benchmark: SemDeDup (curate.stages.semantic) against exact brute-force faiss pair search.

A synthetic corpus like CLIP space: N unit vectors in 768-d around 2,000 centres, stored as float16 .npy, with
planted near-duplicates (cosine 0.97-0.995 to an original) and near-misses (0.90-0.93, must be kept). The corpus is
built in self-contained chunks of 10,000 rows (every duplicate's original is in its chunk), so the first rows form
a subsample with the same statistics, on which exact brute force (faiss IndexFlatIP range search) runs.

    .venv/bin/python -m bench.bench_dedup [--n 1000000] [--repeats 3] [--brute-n 20000]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from bench.common import merge_results
from curate.stages.components import merge_components
from curate.tools.dedup_embeddings import dedup_embeddings

DIM = 768
CENTRES = 2_000
CHUNK = 10_000
DUPLICATES_PER_CHUNK = 500
NEAR_MISSES_PER_CHUNK = 200
THRESHOLD = 0.95


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _chunk(rng: np.random.Generator, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shuffled chunk: vectors, the local original of each row (-1 if none) and a near-miss flag."""
    n_base = CHUNK - DUPLICATES_PER_CHUNK - NEAR_MISSES_PER_CHUNK
    base = _unit(centres[rng.integers(0, CENTRES, n_base)] + _unit(rng.standard_normal((n_base, DIM))))
    originals = rng.integers(0, n_base, DUPLICATES_PER_CHUNK + NEAR_MISSES_PER_CHUNK)
    cosine = np.concatenate(
        [rng.uniform(0.97, 0.995, DUPLICATES_PER_CHUNK), rng.uniform(0.90, 0.93, NEAR_MISSES_PER_CHUNK)]
    )
    noise = rng.standard_normal((len(originals), DIM))
    noise = _unit(noise - np.sum(noise * base[originals], axis=1, keepdims=True) * base[originals])
    copies = cosine[:, None] * base[originals] + np.sqrt(1 - cosine[:, None] ** 2) * noise
    vectors = np.vstack([base, copies])
    original = np.concatenate([np.full(n_base, -1), originals])
    near_miss = np.concatenate([np.zeros(n_base + DUPLICATES_PER_CHUNK, bool), np.ones(NEAR_MISSES_PER_CHUNK, bool)])
    original[near_miss] = -1
    order = rng.permutation(CHUNK)
    where = np.empty(CHUNK, dtype=np.int64)
    where[order] = np.arange(CHUNK)
    original = np.where(original >= 0, where[np.maximum(original, 0)], -1)
    return vectors[order].astype(np.float16), original[order], near_miss[order]


def build_corpus(path: Path, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Write the corpus to a float16 .npy at path; return each row's planted original (global, -1 if none) and
    the near-miss flags."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((CENTRES, DIM))) * 1.2  # rows around one centre: cosine ~0.6 to each other
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, DIM))
    original, near_miss = np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=bool)
    for start in range(0, n, CHUNK):
        vectors, local, miss = _chunk(rng, centres)
        stop = min(n, start + CHUNK)
        out[start:stop] = vectors[: stop - start]
        original[start:stop] = np.where(local[: stop - start] >= 0, local[: stop - start] + start, -1)
        near_miss[start:stop] = miss[: stop - start]
    original[original >= n] = -1  # a cut last chunk may lose an original
    out.flush()
    del out
    return original, near_miss


def removed_by_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Rows that are not the smallest index of their component."""
    labels = np.arange(n)
    merge_components(labels, left, right)
    return labels != np.arange(n)


def brute_force_removed(vectors: np.ndarray, threshold: float) -> np.ndarray:
    """Exact reference: every pair with inner product >= threshold by faiss IndexFlatIP range search."""
    unit = _unit(vectors.astype(np.float32))
    index = faiss.IndexFlatIP(DIM)
    index.add(unit)
    lims, _, ids = index.range_search(unit, threshold)
    rows = np.repeat(np.arange(len(unit)), np.diff(lims.astype(np.int64)))
    return removed_by_components(len(unit), rows, ids.astype(np.int64))


def quality(removed: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(recall, precision) of removed rows against expected removed rows."""
    hits = int((removed & expected).sum())
    return hits / max(1, int(expected.sum())), hits / max(1, int(removed.sum()))


def timed(fn: Callable[[], object], repeats: int) -> tuple[list[float], list[float], object]:
    """Run repeats times: wall seconds and process CPU seconds (all threads) of each run, and the last result."""
    seconds, cpu, result = [], [], None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return seconds, cpu, result


def _dedup(path: Path, out: Path) -> Callable[[], np.ndarray]:
    return lambda: ~dedup_embeddings([str(path)], str(out), threshold=THRESHOLD)["keep"].to_numpy()


def _spread(seconds: list[float]) -> str:
    return (
        f"median {statistics.median(seconds):.2f} s (min {min(seconds):.2f}, max {max(seconds):.2f}, n={len(seconds)})"
    )


def run(n: int, brute_n: int, repeats: int, workdir: Path) -> dict:
    """Build the corpus, time both methods, check quality; the figures for latest.json."""
    path = workdir / "emb.npy"
    original, near_miss = build_corpus(path, n)
    rows = np.flatnonzero(original >= 0)
    expected = removed_by_components(n, rows, original[rows])
    print(f"corpus: {n} x {DIM} float16, {int(expected.sum())} planted duplicates, {int(near_miss.sum())} near-misses")

    brute_n = min(brute_n, n)
    subset = np.load(path, mmap_mode="r")[:brute_n]
    np.save(workdir / "sub.npy", subset)
    np.save(workdir / "warm.npy", subset[:2000])
    _dedup(workdir / "warm.npy", workdir / "warm.parquet")()  # warm-up: imports, faiss and BLAS start-up
    brute_force_removed(subset[:2000], THRESHOLD)

    brute_seconds, _, exact = timed(lambda: brute_force_removed(subset, THRESHOLD), repeats)
    sub_seconds, _, sub_removed = timed(_dedup(workdir / "sub.npy", workdir / "sub.parquet"), repeats)
    sub_recall, sub_precision = quality(sub_removed, exact)
    print(
        f"brute force n={brute_n}: {_spread(brute_seconds)}; semdedup same n: {_spread(sub_seconds)}; "
        f"recall {sub_recall:.4f}, precision {sub_precision:.4f} against exact brute force"
    )

    seconds, cpu, removed = timed(_dedup(path, workdir / "dups.parquet"), repeats)
    recall, precision = quality(removed, expected)
    print(
        f"semdedup n={n}: {_spread(seconds)}, CPU {statistics.median(cpu):.1f} s; recall {recall:.4f}, "
        f"precision {precision:.4f}, near-misses removed {int((removed & near_miss).sum())}"
    )

    median, brute_median = statistics.median(seconds), statistics.median(brute_seconds)
    brute_at_n = brute_median * (n / brute_n) ** 2  # all-pairs work grows with n²
    label = "measured" if brute_n == n else f"extrapolated (x(n/{brute_n})^2 from a measured run on {brute_n} rows)"
    print(f"brute force at n={n}: {brute_at_n:.1f} s {label}; speedup {brute_at_n / median:.1f}x")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS of this process (incl. memory-mapped input and corpus building): {peak_gb:.2f} GB")
    load = [round(x, 1) for x in os.getloadavg()]
    print(f"load average at the end (1, 5, 15 min) on {os.cpu_count()} cores: {load}")
    figures = {
        "dedup_load_average_1_5_15min": load,
        f"dedup_{n // 1000}k_seconds": round(median, 2),
        f"dedup_{n // 1000}k_seconds_min_max": [round(min(seconds), 2), round(max(seconds), 2)],
        f"dedup_{n // 1000}k_cpu_seconds": round(statistics.median(cpu), 1),
        "dedup_recall": round(recall, 5),
        "dedup_precision": round(precision, 5),
        "dedup_recall_vs_bruteforce_subsample": round(sub_recall, 5),
        "dedup_precision_vs_bruteforce_subsample": round(sub_precision, 5),
        "dedup_speedup_vs_bruteforce": round(brute_at_n / median, 1),
        "dedup_speedup_vs_bruteforce_method": f"brute force {label}, semdedup measured at n={n}",
        "dedup_speedup_vs_bruteforce_same_n": round(brute_median / statistics.median(sub_seconds), 2),
        "dedup_bench_n": n,
        "dedup_bruteforce_n": brute_n,
        "dedup_peak_rss_gb": round(peak_gb, 2),
    }
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="corpus size (default 1,000,000)")
    parser.add_argument("--brute-n", type=int, default=20_000, help="rows brute force runs on (default 20,000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each method after a warm-up (default 3)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/latest.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-dedup-") as workdir:
        figures = run(args.n, args.brute_n, args.repeats, Path(workdir))
    if args.n == 1_000_000:
        figures["dedup_1m_seconds"] = figures[f"dedup_{args.n // 1000}k_seconds"]
    for key, value in figures.items():
        print(f"{key}: {value}")
    if not args.no_write:
        merge_results(figures)
    return figures


if __name__ == "__main__":
    main()
