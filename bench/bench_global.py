"""The global steps alone at scale (issue 27): pHash, url+caption and semantic dedup on synthetic signatures.

Each (step, size) runs in a child process through bench.common's launcher, so its peak RSS is the child's own:
- phash: random 64-bit hashes with 10 % planted near copies (1-4 bits away), through the local engine's spilled
  pHash dedup (executors.local.partitions.duplicate_verdicts: band groups split by curate.stages.hamming, components,
  the survivor rule);
- url: keys with 10 % repeated url+caption pairs, spilled by key and grouped (the local engine's url_flags path);
- semantic: bench_dedup's CLIP-like float16 corpus through `curate dedup-embeddings` (k-means on a bounded sample,
  clusters one at a time).
Exponents are log(t2 / t1) / log(n2 / n1) between the two largest sizes measured of 10^6 and 10^7; recall is the
pHash search's pairs against brute force on a sample of --recall-n hashes (random + planted).

    .venv/bin/python -m bench.bench_global [--sizes 1000000,10000000] [--phash-sizes ...,100000000]
        [--semantic-sizes 1000000,10000000] [--recall-n 100000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.bench_scale import child, label, sizes
from bench.common import WORK, merge_results

PART_ROWS = 1_000_000  # rows per synthetic part handed to the global step
TARGET_EXPONENT, TARGET_RECALL, TARGET_RSS_GB = 1.1, 0.999, 4.0


def synthetic_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    """n pHashes as int64: random, with a tenth of them near copies (1 to 4 bits flipped) of earlier ones."""
    hashes = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    copies = rng.choice(n, size=n // 10, replace=False)
    flips = np.zeros(len(copies), dtype=np.uint64)
    for count in range(4):
        bits = rng.integers(0, 64, size=len(copies)).astype(np.uint64)
        flips |= np.where(rng.integers(0, 4, size=len(copies)) >= count, np.uint64(1) << bits, np.uint64(0))
    hashes[copies] = hashes[rng.integers(0, n, size=len(copies))] ^ flips
    return hashes.view(np.int64)


def _parts(n: int, seed: int, kind: str) -> list[pa.Table]:
    rng, tables = np.random.default_rng(seed), []
    for start in range(0, n, PART_ROWS):
        rows = min(PART_ROWS, n - start)
        urls = rng.integers(0, rows, size=rows)  # url+caption: about a third of the rows repeat another's
        keys = rng.integers(0, 2**63, size=rows, dtype=np.int64) if kind == "phash" else (
            (urls + start).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)).view(np.int64)  # the key hashes the pair
        table = {"row": np.arange(start, start + rows, dtype=np.int64),
                 "key": pa.array(np.char.mod("%016x", keys.view(np.uint64)).astype(object), pa.string())}
        if kind == "phash":
            table.update(phash=synthetic_hashes(rng, rows), aesthetic_score=rng.uniform(3, 8, rows).astype(np.float32),
                         original_width=rng.integers(200, 2000, rows).astype(np.int32),
                         original_height=rng.integers(200, 2000, rows).astype(np.int32))
        else:
            table.update(url=pa.array(np.char.mod("https://example.com/%d.jpg", urls + start).astype(object)),
                         caption=pa.array(np.char.mod("caption %d", urls + start).astype(object)))
        tables.append(pa.table(table))
    return tables


def run_child(kind: str, n: int, folder: Path) -> dict[str, float]:
    """One measured step in this process: seconds of the global step alone (the synthetic input is built first)."""
    from curate.executors.local import partitions

    if kind == "semantic":
        from bench.bench_dedup import build_corpus
        from curate.tools.dedup_embeddings import dedup_embeddings

        build_corpus(folder / "emb.npy", n)
        started = time.perf_counter()
        found = dedup_embeddings([str(folder / "emb.npy")], str(folder / "out.parquet"), threshold=0.95)
        return {"seconds": time.perf_counter() - started, "removed": float((~found["keep"].to_numpy()).sum())}
    parts = _parts(n, 0, kind)
    count = partitions.partition_count(n)
    started = time.perf_counter()
    if kind == "phash":
        from curate.stages.verdict import with_verdict_columns

        verdicts = partitions.duplicate_verdicts((with_verdict_columns(p) for p in parts), ["phash"], 4, count,
                                                 folder / "work")
        return {"seconds": time.perf_counter() - started, "removed": float(verdicts.num_rows)}
    from curate.stages import prefilter

    files = partitions.spill((prefilter.url_signature(p) for p in parts),
                             lambda t: partitions.key_partitions(t["key"], count), count, folder / "signatures")
    removed = sum(prefilter.group_url_duplicates(pq.read_table(path)).num_rows for path in files)
    return {"seconds": time.perf_counter() - started, "removed": float(removed)}


def measure(kind: str, n: int) -> dict[str, float]:
    folder = WORK / "global" / f"{kind}-{label(n)}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    log = folder.with_name(folder.name + ".log")
    wall, rss = child([sys.executable, "-m", "bench.bench_global", "--child", kind, str(n), str(folder)], log)
    result = json.loads(next(line for line in log.read_text().splitlines() if line.startswith("{")))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"  {kind:>8} {n:>12,}: {result['seconds']:8.1f} s (child wall {wall:.1f} s), peak RSS {rss:.2f} GB, "
          f"{int(result['removed']):,} flagged", flush=True)
    return {**result, "wall": wall, "rss_gb": rss}


def recall(n: int) -> float:
    """Pairs the split band search finds over brute-force pairs within 4 bits, on n random + planted hashes."""
    from curate.stages.dedup import phash_pairs

    hashes = np.unique(synthetic_hashes(np.random.default_rng(1), n).view(np.uint64))
    found = {tuple(p) for p in phash_pairs(hashes, 4).tolist()}
    expected = set()
    for start in range(0, len(hashes), 2048):  # brute force in blocks of 2,048 x n
        distance = np.bitwise_count(hashes[start:start + 2048, None] ^ hashes[None, :])
        i, j = np.nonzero(distance <= 4)
        expected |= {(a + start, b) for a, b in zip(i.tolist(), j.tolist(), strict=True) if b > a + start}
    return len(found & expected) / max(1, len(expected))


def exponent(runs: dict[int, dict[str, float]]) -> float | None:
    measured = sorted(n for n in runs if n <= 10**7)
    if len(measured) < 2:
        return None
    low, high = measured[-2], measured[-1]
    return math.log(runs[high]["seconds"] / runs[low]["seconds"]) / math.log(high / low)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phash-sizes", type=sizes, default=sizes("1000000,10000000,100000000"))
    parser.add_argument("--url-sizes", type=sizes, default=sizes("1000000,10000000,100000000"))
    parser.add_argument("--semantic-sizes", type=sizes, default=sizes("1000000,10000000"))
    parser.add_argument("--recall-n", type=int, default=100_000, help="hashes in the brute-force recall sample")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/latest.json")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, folder = args.child
        print(json.dumps(run_child(kind, int(n), Path(folder))), flush=True)
        return {}
    runs = {kind: {n: measure(kind, n) for n in getattr(args, f"{kind}_sizes")}
            for kind in ("phash", "url", "semantic")}
    figures: dict[str, object] = {
        "phash_dedup_exponent": exponent(runs["phash"]), "url_dedup_exponent": exponent(runs["url"]),
        "semantic_dedup_exponent": exponent(runs["semantic"]),
        "global_peak_rss_gb": round(max(r["rss_gb"] for kind in runs.values() for r in kind.values()), 3),
        "phash_recall": recall(args.recall_n) if args.recall_n else None, "phash_recall_sample": args.recall_n,
        **{f"global_{kind}_seconds_{label(n)}": round(r["seconds"], 2) for kind, by_n in runs.items()
           for n, r in by_n.items()},
        **{f"global_{kind}_peak_rss_gb_{label(n)}": round(r["rss_gb"], 3) for kind, by_n in runs.items()
           for n, r in by_n.items()},
    }
    for name in ("phash_dedup_exponent", "url_dedup_exponent", "semantic_dedup_exponent", "global_peak_rss_gb",
                 "phash_recall"):
        print(f"  {name}: {figures[name]}")
    if not args.no_write:
        merge_results(figures)
    return figures


if __name__ == "__main__":
    main()
