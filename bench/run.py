"""`make bench`: every benchmark in one run, each guarded so one failure does not stop the others.

Figures go to bench/results/latest.json, merged by key. The dedup and Spark benchmarks run smaller here and print
without writing (their figures in latest.json come from `make bench-dedup` (100k and 1M rows) and `make bench-spark`
(2,000 rows, 3 rounds), which together take longer than this harness's 10-minute budget).

    .venv/bin/python -m bench.run [--only download,shard,e2e,dedup,score,spark] [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import machine

DEDUP_ARGS = ["--n", "50000", "--brute-n", "10000", "--repeats", "3", "--no-write"]
SCORE_ARGS = ["--budget-s", "60", "--repeats", "2", "--no-write"]  # make bench-score: 300 s of rounds, ~6.5 min
SPARK_ARGS = ["--rows", "1000", "--repeats", "1", "--no-write"]  # make bench-spark: 2,000 rows, 3 rounds, ~6 min


def _optional(module: str, argv: list[str]) -> Callable[[], Any]:
    """Another issue's benchmark (bench.bench_dedup, bench.bench_score): its main(argv), when the file exists."""
    def body() -> Any:
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name == module:
                print(f"{module}: not present, skipped")
                return None
            raise
        return found.main(argv)

    return body


def targets(rows: int, repeats: int) -> dict[str, Callable[[], Any]]:
    from bench import bench_download, bench_e2e, bench_shard

    common = ["--rows", str(rows), "--repeats", str(repeats)]
    return {
        "download": lambda: bench_download.main(common),
        "e2e": lambda: bench_e2e.main(common),  # before shard: shard re-cuts the run e2e leaves behind
        "shard": lambda: bench_shard.main(["--rows", str(rows), "--repeats", str(max(repeats, 5))]),
        "dedup": _optional("bench.bench_dedup", DEDUP_ARGS),
        "score": _optional("bench.bench_score", SCORE_ARGS),
        "spark": _optional("bench.bench_spark", SPARK_ARGS),  # bench_spark skips itself without pyspark
    }


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma list of targets (default: all)")
    parser.add_argument("--rows", type=int, default=2000, help="corpus rows for download, e2e and shard")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions after warm-up")
    args = parser.parse_args(argv)
    chosen = targets(args.rows, args.repeats)
    if args.only:
        chosen = {name: chosen[name] for name in args.only.split(",")}
    print(f"machine: {machine()}")
    outcome: dict[str, str] = {}
    for name, body in chosen.items():
        print(f"\n== {name} ==", flush=True)
        started = time.perf_counter()
        try:
            body()
            outcome[name] = f"ok in {time.perf_counter() - started:.0f} s"
        except Exception:
            traceback.print_exc()
            outcome[name] = f"FAILED after {time.perf_counter() - started:.0f} s (traceback above)"
    print("\n== summary ==")
    for name, line in outcome.items():
        print(f"  {name}: {line}")
    return outcome


if __name__ == "__main__":
    main()
