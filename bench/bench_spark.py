"""The Spark engine against the local engine on one machine: per-stage wall time, the ratio, and how Spark scales.

Both engines run `--scores metadata` on the same loopback corpus (bench/corpus.py) with the same options
(bench_download.Settings: 16 download threads, 256 px, 250 rows a batch, 8 shards x 1 worker; the local engine's
2 processes against Spark's local[2]). Stage times are each engine's own (stats.json's `timings`; session and
interpreter start-up excluded); the JVM start-up is measured once, apart, and one SparkSession serves every run.
Rounds are interleaved (local at rows, Spark at rows, Spark at rows/4) after one warm-up round, so load from other
processes falls on all of them alike. Scale: log(t_rows / t_quarter) / log 4 for Spark's total (1.0 is linear).

Spark's stages do not split where the local engine's do: its `ingest` only reads the parquet and counts rows per
file (normalize runs lazily inside the next action), and its `download` includes ingest's normalize and the
prefilter (Spark plans them as one job); so the local engine's prefilter + download are compared with Spark's
download, and Spark's `books` (ledger, samples, stats written as one more pass) has no separate local figure.

    .venv/bin/python -m bench.bench_spark [--rows 2000] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.bench_download import Settings
from bench.bench_e2e import run_once as run_local_once
from bench.common import WORK, Series, bench_main
from bench.corpus import CorpusServer, ensure_images, write_corpus

SETTINGS = Settings()
# (row label, local engine stages, Spark engine stages)
COMPARED = [("ingest", ["ingest"], ["ingest"]),
            ("prefilter+download", ["prefilter", "download"], ["download"]),
            ("score", ["score"], ["score"]),
            ("dedup", ["dedup"], ["dedup"]),
            ("select", ["select"], ["select"]),
            ("shard", ["shard"], ["shard"]),
            ("books", [], ["books"])]


def spark_session() -> Any:
    """local[2] as the engine tests build it; the workers run this interpreter (the venv's)."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    session = (SparkSession.builder.master("local[2]").appName("curate-bench-spark")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.default.parallelism", "2")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.driver.memory", "2g")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    session.range(1).count()  # the first job starts the executor threads
    return session


def run_spark_once(spark: Any, corpus: Path, out: Path, settings: Settings = SETTINGS) -> dict[str, Any]:
    """One fresh Spark run (no download checkpoint to resume from); stats.json's content plus the wall seconds."""
    from curate.executors.spark.engine import run_spark

    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    stats = run_spark(spark, [str(corpus)], str(out), settings.config(scores="metadata"))
    stats["wall"] = time.perf_counter() - started
    return stats


def kept(out: Path) -> list[tuple[str, int]]:
    """(key, shard) of every kept sample; samples.parquet is a file (local) or a folder of parts (Spark)."""
    table = pq.read_table(out / "samples.parquet", columns=["key", "shard"])
    return sorted(zip(table["key"].to_pylist(), table["shard"].to_pylist(), strict=True))


def same_dataset(local_out: Path, spark_out: Path) -> bool:
    """Printed, not timed: the kept keys and their shards of both engines' last run at full size."""
    local, spark = kept(local_out), kept(spark_out)
    local_keys, spark_keys = {k for k, _ in local}, {k for k, _ in spark}
    if local_keys != spark_keys:
        print(f"check: kept keys DIFFER: {len(local_keys)} local, {len(spark_keys)} Spark, "
              f"{len(local_keys - spark_keys)} only local, {len(spark_keys - local_keys)} only Spark")
        return False
    assigned = "same" if local == spark else "DIFFERENT"
    print(f"check: same kept keys in both engines ({len(local_keys)} keys); key-to-shard assignment {assigned}")
    return local == spark


def seconds_of(stats: dict[str, Any], stages: list[str]) -> float:
    return sum(stats["timings"].get(stage, 0.0) for stage in stages)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def stage_table(local_runs: list[dict[str, Any]], spark_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Print seconds per stage for both engines and the ratio of medians; returns the medians and ratios."""
    print(f"  {'stage':<20}{'local s (min-max)':>22}{'Spark s (min-max)':>24}{'Spark/local':>13}")
    local_medians: dict[str, float] = {}
    spark_medians: dict[str, float] = {}
    ratios: dict[str, float | None] = {}
    rows = [*COMPARED, ("total", ["total"], ["total"])]
    for label, local_stages, spark_stages in rows:
        local = [seconds_of(r, local_stages) for r in local_runs]
        spark = [seconds_of(r, spark_stages) for r in spark_runs]
        local_medians[label], spark_medians[label] = statistics.median(local), statistics.median(spark)
        ratio = spark_medians[label] / local_medians[label] if local_stages and local_medians[label] > 0 else None
        ratios[label] = ratio
        local_text = spread(local) if local_stages else "-"
        ratio_text = f"{ratio:.1f}x" if ratio is not None else "-"
        print(f"  {label:<20}{local_text:>22}{spread(spark):>24}{ratio_text:>13}")
    other = [r["timings"]["total"] - sum(seconds_of(r, s) for _, _, s in COMPARED) for r in spark_runs]
    print(f"  (Spark total outside the stages above, e.g. the input check and scores resolution: "
          f"{spread(other)} s)")
    return {"local": local_medians, "spark": spark_medians, "ratios": ratios}


def measure(rows: int, repeats: int, settings: Settings = SETTINGS) -> dict[str, Any]:
    quarter = rows // 4
    ensure_images(rows)
    work = WORK / "spark"
    load_before = os.getloadavg()
    with CorpusServer() as server:
        corpora = {n: write_corpus(n, server.base_url, work / f"corpus-{n}.parquet") for n in (rows, quarter)}
        started = time.perf_counter()
        spark = spark_session()
        jvm = time.perf_counter() - started
        print(f"JVM and SparkSession start-up (local[2]): {jvm:.1f} s, once, not in any figure below", flush=True)
        try:
            local_runs: list[dict[str, Any]] = []
            spark_runs: list[dict[str, Any]] = []
            quarter_runs: list[dict[str, Any]] = []
            warm = time.perf_counter()
            run_local_once(corpora[quarter], work / "local-warmup", settings)
            run_spark_once(spark, corpora[quarter], work / "spark-warmup", settings)
            print(f"warm-up round ({quarter} rows, both engines; Spark starts its Python workers): "
                  f"{time.perf_counter() - warm:.1f} s", flush=True)
            for round_index in range(repeats):
                round_started = time.perf_counter()
                local_runs.append(run_local_once(corpora[rows], work / "local", settings))
                spark_runs.append(run_spark_once(spark, corpora[rows], work / "spark", settings))
                quarter_runs.append(run_spark_once(spark, corpora[quarter], work / "spark-quarter", settings))
                print(f"round {round_index + 1}/{repeats}: local {local_runs[-1]['timings']['total']:.1f} s, "
                      f"Spark {spark_runs[-1]['timings']['total']:.1f} s, Spark at {quarter} rows "
                      f"{quarter_runs[-1]['timings']['total']:.1f} s ({time.perf_counter() - round_started:.0f} s "
                      "with checks)", flush=True)
        finally:
            spark.stop()
    load_after = os.getloadavg()
    print(f"\n{rows} rows, --scores metadata, kept {local_runs[-1]['kept']} (local) / {spark_runs[-1]['kept']} "
          f"(Spark); local engine {settings.processes} processes x {settings.threads} threads, Spark local[2] x "
          f"{settings.threads} threads a task; {settings.world_size} shards; medians of {repeats} after a warm-up:")
    table = stage_table(local_runs, spark_runs)
    same = same_dataset(WORK / "spark" / "local", WORK / "spark" / "spark")
    total_ratios = [s["timings"]["total"] / loc["timings"]["total"] for s, loc in zip(spark_runs, local_runs,
                                                                                        strict=True)]
    ratio = table["ratios"]["total"]
    print(f"total: Spark/local {ratio:.2f}x (per round {min(total_ratios):.2f}-{max(total_ratios):.2f})")
    t_small = Series(f"Spark, {quarter} rows (1x)", "s", [r["timings"]["total"] for r in quarter_runs])
    t_big = Series(f"Spark, {rows} rows (4x)", "s", [r["timings"]["total"] for r in spark_runs])
    exponent = math.log(t_big.median / t_small.median) / math.log(rows / quarter)
    print(f"scale: {t_small.describe()}; {t_big.describe()}; exponent {exponent:.2f} (1.0 = linear)")
    exponents = [math.log(b / s) / math.log(rows / quarter) for b, s in zip(t_big.values, t_small.values,
                                                                            strict=True)]
    print(f"  per round {min(exponents):.2f}-{max(exponents):.2f}; load average (1/5/15 min) before "
          f"{'/'.join(f'{v:.1f}' for v in load_before)}, after {'/'.join(f'{v:.1f}' for v in load_after)}")
    parts: dict[str, list[float]] = {}
    for name, stages in (("download", ["download"]), ("other stages", [s for _, _, ss in COMPARED for s in ss
                                                                       if s != "download"])):
        small = statistics.median(seconds_of(r, stages) for r in quarter_runs)
        big = statistics.median(seconds_of(r, stages) for r in spark_runs)
        parts[name] = [round(small, 2), round(big, 2), round(math.log(big / small) / math.log(rows / quarter), 3)]
        print(f"  Spark {name}: {small:.2f} s -> {big:.2f} s, exponent {parts[name][2]:.2f}")

    def min_max(values: list[float], digits: int = 2) -> list[float]:
        return [round(min(values), digits), round(max(values), digits)]

    local_totals = [r["timings"]["total"] for r in local_runs]
    return {
        "spark_local_ratio": round(ratio, 3),
        "spark_local_ratio_min_max": min_max(total_ratios, 3),
        "spark_seconds": round(t_big.median, 2),
        "spark_seconds_min_max": min_max(t_big.values),
        "local_seconds": round(statistics.median(local_totals), 2),
        "local_seconds_min_max": min_max(local_totals),
        "spark_stage_seconds": {k: round(v, 3) for k, v in table["spark"].items()},
        "spark_local_stage_seconds": {k: round(v, 3) for k, v in table["local"].items() if k != "books"},
        "spark_stage_ratio": {k: None if v is None else round(v, 2) for k, v in table["ratios"].items()},
        "spark_scale_exponent": round(exponent, 3),
        "spark_scale_exponent_min_max": min_max(exponents, 3),
        "spark_scale_rows": [quarter, rows],
        "spark_scale_seconds": [round(t_small.median, 2), round(t_big.median, 2)],
        "spark_scale_download_seconds_exponent": parts["download"],
        "spark_scale_other_stages_seconds_exponent": parts["other stages"],
        "spark_jvm_startup_seconds": round(jvm, 1),
        "spark_bench_rows": rows,
        "spark_repeats": repeats,
        "spark_same_kept_keys": same,
        "spark_load_average_1_5_15min_before_after": [[round(v, 1) for v in load_before],
                                                       [round(v, 1) for v in load_after]],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if importlib.util.find_spec("pyspark") is None:
        print("bench_spark: pyspark is not installed, skipped")
        return {}
    return bench_main(__doc__, argv, measure, "rows of the corpus (default 2,000; scale at rows/4)", repeats=3)


if __name__ == "__main__":
    main()
