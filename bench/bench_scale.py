"""Issue 13's benchmark: `curate run` and the Spark job on LAION-size parquet files; how time and memory grow with N.

The corpus (bench.corpus.write_scale_corpus, cached in bench/work/scale/ by N, seed and port): N LAION-schema rows
of which a fixed 1,000 pass the metadata prefilter and point at JPEGs served from 127.0.0.1; the rest are low
aesthetic, small or watermarked rows on a port nothing listens on, and 5 % url+caption repeats of earlier rows.
Every run is a fresh child process (`curate run --scores metadata --world-size 4 --workers-per-rank 1
--allow-loopback`; the Spark job as `python jobs/aesthetics_filter.py --master local[2]` with the same options), so
its wall time includes interpreter (and JVM) start-up and its peak RSS is os.wait4's ru_maxrss (through a small
launcher: a child spawned from this process would count this process's memory too): the largest of the
process and the children it waited for (the Spark job's JVM is not waited for: no RSS is reported for Spark).
Exponent: log(t2 / t1) / log(n2 / n1) of wall time between the two largest sizes (1.0 is linear); also printed for
the total less the download stage, which at small N hides the rest. One run a size: at 100k-300k rows the download
of the live rows dominates and the load of other processes moves it by tens of seconds.

    .venv/bin/python -m bench.bench_scale [--sizes 1000000,10000000] [--spark-sizes 100000,1000000] [--no-spark]
        [--no-write]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, WORK, measured_command, merge_results
from bench.corpus import PinnedCorpusServer, ensure_images_at, live_images, write_scale_corpus

OPTIONS = ["--scores", "metadata", "--world-size", "4", "--workers-per-rank", "1", "--allow-loopback"]
PORT = 28413  # below Linux's ephemeral range; when taken, another port and another cached corpus
LIVE = 1000
# local[2]'s executors share the driver JVM; at pyspark's default 1 GB heap the job fails reading the download
# checkpoint (4,096-row parquet batches of image bytes). A PYSPARK_SUBMIT_ARGS in the environment wins.
SPARK_SUBMIT_ARGS = "--driver-memory 4g pyspark-shell"
SEED = 0
TARGET_EXPONENT, TARGET_RSS_GB, TARGET_RSS_ROWS, DOWNLOAD_NOISE = 1.1, 2.0, 10_000_000, 1.25


@dataclass
class Run:
    """One child process: its rows, wall seconds, peak RSS and the run's stats.json."""

    rows: int
    wall: float
    peak_rss_gb: float
    stats: dict[str, Any]


def label(rows: int) -> str:
    """10000000 -> 10m, 300000 -> 300k: the suffix of the per-size keys."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if rows % size == 0:
            return f"{rows // size}{unit}"
    return str(rows)


def sizes(text: str) -> list[int]:
    values = sorted({int(part.replace("_", "")) for part in text.split(",") if part.strip()})
    if not values or values[0] <= 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive row counts, got {text!r}")
    return values


def child(command: list[str], log: Path) -> tuple[float, float]:
    """Run command with its output in log; (wall seconds, peak RSS in GB); raises with the log's tail on failure."""
    # this checkout's curate, in Spark's Python workers too (not whichever checkout the venv installed)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYSPARK_SUBMIT_ARGS": SPARK_SUBMIT_ARGS, **os.environ, "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONPATH": path, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    started = time.perf_counter()
    with log.open("w") as output:
        done = subprocess.run(measured_command(command), stdout=output, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{log.read_text()[-4000:]}")
    per_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return seconds, int(log.read_text().split()[-1]) * per_unit / 1e9


def run_engine(engine: str, corpus: Path, rows: int) -> Run:
    out = WORK / "scale" / f"out-{engine}-{label(rows)}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    if engine == "local":
        command = [sys.executable, "-m", "curate", "run", str(corpus), "--output", str(out), *OPTIONS]
    else:
        command = [sys.executable, str(ROOT / "jobs" / "aesthetics_filter.py"), "--input", str(corpus),
                   "--output", str(out), "--master", "local[2]", *OPTIONS]
    wall, rss = child(command, out.with_name(out.name + ".log"))
    stats = json.loads((out / "stats.json").read_text())
    print(f"  {engine} {rows:>12,} rows: {wall:8.1f} s wall, kept {stats['kept']}", flush=True)
    return Run(rows, wall, rss, stats)


def exponent(runs: list[Run]) -> float | None:
    """Growth exponent of wall time between the two largest sizes."""
    if len(runs) < 2:
        return None
    small, big = runs[-2], runs[-1]
    return math.log(big.wall / small.wall) / math.log(big.rows / small.rows)


def exponent_without_download(runs: list[Run]) -> float | None:
    """The same for the pipeline's total less its download: at small N the fixed download hides the rest."""
    if len(runs) < 2:
        return None
    small, big = ([r.stats["timings"]["total"] - r.stats["timings"].get("download", 0.0) for r in runs[-2:]])
    if min(small, big) <= 0:
        return None
    return math.log(big / small) / math.log(runs[-1].rows / runs[-2].rows)


def print_table(engine: str, runs: list[Run]) -> None:
    stages = [s for s in runs[-1].stats["timings"] if s != "total"]
    head = f"  {'rows':>12}{'wall s':>9}{'total s':>9}" + "".join(f"{s[:10]:>11}" for s in stages)
    print(f"\n{engine}: seconds per stage (stats.json timings), peak RSS\n{head}{'RSS GB':>8}{'kept':>6}")
    for run in runs:
        timings = run.stats["timings"]
        cells = "".join(f"{timings.get(s, 0.0):>11.1f}" for s in stages)
        rss = f"{run.peak_rss_gb:>8.2f}" if engine == "local" else f"{'-':>8}"
        print(f"  {run.rows:>12,}{run.wall:>9.1f}{timings['total']:>9.1f}{cells}{rss}{run.stats['kept']:>6}")
    grow = exponent(runs)
    if grow is not None:
        print(f"  exponent (wall, {runs[-2].rows:,} -> {runs[-1].rows:,} rows): {grow:.2f} (1.0 = linear)")
    rest = exponent_without_download(runs)
    if rest is not None:
        print(f"  exponent of the pipeline's total less its download stage: {rest:.2f}")


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "NOT MET")


def targets(local: list[Run], spark: list[Run]) -> dict[str, bool | None]:
    """Print issue 13's targets beside the figures; returns met (True/False) or None when not measured."""
    local_grow, spark_grow = exponent(local), exponent(spark)
    at_target = [r for r in local if r.rows >= TARGET_RSS_ROWS]
    downloads = [r.stats["timings"].get("download", 0.0) for r in local]
    spread = max(downloads) / min(downloads) if len(downloads) > 1 and min(downloads) > 0 else None
    met = {
        "local_exponent": None if local_grow is None else local_grow <= TARGET_EXPONENT,
        "peak_rss_at_10m": max(r.peak_rss_gb for r in at_target) <= TARGET_RSS_GB if at_target else None,
        "download_independent_of_rows": None if spread is None else spread <= DOWNLOAD_NOISE,
        "spark_exponent": None if spark_grow is None else spark_grow <= TARGET_EXPONENT,
    }

    def between(runs: list[Run]) -> str:
        return f"{runs[-2].rows:,} -> {runs[-1].rows:,} rows" if len(runs) > 1 else "one size"

    print("\ntargets (issue 13; exponents are meant from 1M to 10M rows):")
    grow = "-" if local_grow is None else f"{local_grow:.2f}"
    print(f"  local exponent <= {TARGET_EXPONENT}: {grow} ({between(local)}) {verdict(met['local_exponent'])}")
    largest = f"{local[-1].peak_rss_gb:.2f} GB at {local[-1].rows:,} rows" if local else "-"
    print(f"  peak RSS <= {TARGET_RSS_GB} GB at 10M rows: {verdict(met['peak_rss_at_10m'])} (largest: {largest})")
    figures = ", ".join(f"{s:.1f}" for s in downloads)
    ratio = "-" if spread is None else f"{spread:.2f}"
    print(f"  download of the live rows independent of N: {figures} s, max/min {ratio} (<= {DOWNLOAD_NOISE}) "
          f"{verdict(met['download_independent_of_rows'])}")
    grow = "-" if spark_grow is None else f"{spark_grow:.2f}"
    print(f"  Spark exponent <= {TARGET_EXPONENT}: {grow} ({between(spark)}) {verdict(met['spark_exponent'])}")
    return met


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def figures(local: list[Run], spark: list[Run], load: list[list[float]], live: int) -> dict[str, Any]:
    """The keys merged into latest.json; per-size values are keyed by the row count."""
    local_grow, spark_grow = exponent(local), exponent(spark)
    results: dict[str, Any] = {
        "scale_live_rows": live,
        "scale_local_rows": [r.rows for r in local],
        "scale_local_exponent": rounded(local_grow),
        "scale_local_exponent_without_download": rounded(exponent_without_download(local)),
        "scale_local_seconds": {str(r.rows): round(r.wall, 2) for r in local},
        "scale_local_stage_seconds": {str(r.rows): {k: round(v, 2) for k, v in r.stats["timings"].items()}
                                      for r in local},
        "scale_local_download_seconds": {str(r.rows): round(r.stats["timings"].get("download", 0.0), 2)
                                         for r in local},
        "scale_load_average_1_5_15min_start_end": load,
        "scale_targets_met": targets(local, spark),
    }
    for run in local:
        results[f"scale_local_peak_rss_gb_{label(run.rows)}"] = round(run.peak_rss_gb, 3)
    if spark:
        results |= {
            "scale_spark_rows": [r.rows for r in spark],
            "scale_spark_exponent": rounded(spark_grow),
            "scale_spark_exponent_without_download": rounded(exponent_without_download(spark)),
            "scale_spark_seconds": {str(r.rows): round(r.wall, 2) for r in spark},
            "scale_spark_stage_seconds": {str(r.rows): {k: round(v, 2) for k, v in r.stats["timings"].items()}
                                          for r in spark},
        }
    return results


def measure(local_sizes: list[int], spark_sizes: list[int], live: int = LIVE, seed: int = SEED) -> dict[str, Any]:
    """Both engines at their sizes, smallest first, one fresh child process a run; a failed run ends its engine's
    series (its error is printed and kept under scale_<engine>_error) but not the other engine's."""
    load_start = os.getloadavg()
    ensure_images_at(live_images(live))
    runs: dict[str, list[Run]] = {"local": [], "spark": []}
    errors: dict[str, str] = {}
    with PinnedCorpusServer(PORT) as server:
        port = server.base_url.rsplit(":", 1)[1]
        for engine, rows_list in (("local", local_sizes), ("spark", spark_sizes)):
            for rows in rows_list:
                corpus = WORK / "scale" / f"corpus-{label(rows)}-live{live}-seed{seed}-port{port}.parquet"
                seconds = write_scale_corpus(rows, live, seed, server.base_url, corpus)
                if seconds:
                    print(f"  wrote {corpus.name} in {seconds:.1f} s (cached for later runs)", flush=True)
                try:
                    runs[engine].append(run_engine(engine, corpus, rows))
                except RuntimeError as error:
                    errors[engine] = f"{rows} rows: {error}"
                    print(f"  {engine} FAILED at {rows:,} rows: {error}", flush=True)
                    break
    load = [[round(v, 2) for v in load_start], [round(v, 2) for v in os.getloadavg()]]
    for engine, engine_runs in runs.items():
        if engine_runs:
            print_table(engine, engine_runs)
    results = figures(runs["local"], runs["spark"], load, live)
    results |= {f"scale_{engine}_error": error[-2000:] for engine, error in errors.items()}
    print(f"load average (1/5/15 min) at start {load[0]}, at end {load[1]}")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes, default=[1_000_000, 10_000_000], help="local engine row counts")
    parser.add_argument("--spark-sizes", type=sizes, default=[100_000, 1_000_000], help="Spark job row counts")
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark job")
    parser.add_argument("--live", type=int, default=LIVE, help=f"rows that pass the prefilter ({LIVE})")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/latest.json")
    args = parser.parse_args(argv)
    spark_sizes = [] if args.no_spark else args.spark_sizes
    if spark_sizes and importlib.util.find_spec("pyspark") is None:
        print("bench_scale: pyspark is not installed, the Spark job is skipped")
        spark_sizes = []
    results = measure(args.sizes, spark_sizes, args.live)
    if not args.no_write:
        merge_results(results)
    return results


if __name__ == "__main__":
    sys.exit(1 if any(key.endswith("_error") for key in main()) else 0)


if __name__ == "__main__":
    main()
