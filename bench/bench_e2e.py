"""Figures 3 and 4: `curate run --scores metadata` end to end, per stage, and how its time grows with rows.

The runs call curate.pipeline.run.run_local, the function `curate run` calls, so stats.json's per-stage timings are the
pipeline's own (interpreter start-up excluded). Scale: the same run at rows/4 and rows, interleaved; the exponent
is log(t_rows / t_quarter) / log 4 (1.0 is linear).

    .venv/bin/python -m bench.bench_e2e [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from bench.bench_download import Settings
from bench.common import WORK, Series, bench_main
from bench.corpus import CorpusServer, ensure_images, write_corpus
from curate.config import Config
from curate.pipeline.run import run_local
from curate.pipeline.steps import enabled

STAGES = [step.name for step in enabled(Config())]  # the steps every run has (no --blocklist, no --decontaminate)
SETTINGS = Settings()  # 250 rows a part: a quarter of the corpus still fills both download processes


def run_once(corpus: Path, out: Path, settings: Settings = SETTINGS) -> dict[str, Any]:
    """One fresh end-to-end run; stats.json's content plus the wall seconds around it."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    stats = run_local([str(corpus)], out, settings.config(scores="metadata"))
    stats["wall"] = time.perf_counter() - started
    return stats


def rows_entering(stats: dict[str, Any]) -> dict[str, int]:
    """Rows each stage works on: the funnel's remaining rows after the stage before it."""
    remaining = {step["stage"]: step["rows"] for step in stats["funnel"]}
    before = {"ingest": "input", "prefilter": "input", "download": "prefilter", "score": "download",
              "dedup": "score", "select": "dedup", "shard": "select"}
    return {stage: remaining[previous] for stage, previous in before.items()}


def stage_table(runs: list[dict[str, Any]]) -> tuple[dict[str, float], str]:
    """Print rows/s and share of wall time per stage (medians over runs); returns the medians and the slowest."""
    total = statistics.median(r["timings"]["total"] for r in runs)
    entering = rows_entering(runs[-1])
    medians: dict[str, float] = {}
    print(f"  {'stage':<10}{'rows in':>9}{'seconds (min-max)':>24}{'rows/s':>10}{'share':>8}")
    for stage in STAGES:
        seconds = [r["timings"].get(stage, 0.0) for r in runs]
        medians[stage] = statistics.median(seconds)
        rate = entering[stage] / medians[stage] if medians[stage] > 0 else math.inf
        spread = f"{medians[stage]:.2f} ({min(seconds):.2f}-{max(seconds):.2f})"
        print(f"  {stage:<10}{entering[stage]:>9}{spread:>24}{rate:>10.0f}{medians[stage] / total:>8.1%}")
    slowest = max(medians, key=lambda s: medians[s])
    print(f"  total {total:.2f} s; slowest stage: {slowest} ({medians[slowest] / total:.0%} of the run)")
    return medians, slowest


def measure(rows: int, repeats: int, settings: Settings = SETTINGS) -> dict[str, Any]:
    """End to end at rows (figure 3) and, interleaved, at rows/4 (figure 4's 1x); one small warm-up run first."""
    quarter = rows // 4
    ensure_images(rows)
    work = WORK / "e2e"
    runs: dict[int, list[dict[str, Any]]] = {rows: [], quarter: []}
    with CorpusServer() as server:
        corpora = {n: write_corpus(n, server.base_url, work / f"corpus-{n}.parquet") for n in runs}
        run_once(corpora[quarter], work / "out-warmup", settings)
        for _ in range(repeats):
            for n in (rows, quarter):
                runs[n].append(run_once(corpora[n], work / f"out-{n}", settings))
    big, small = runs[rows], runs[quarter]
    rates = Series(f"end to end, {rows} rows", "rows/s", [rows / r["timings"]["total"] for r in big])
    print(f"end to end: curate run --scores metadata, {rows} rows, {settings.processes} processes x "
          f"{settings.threads} threads, {settings.image_size} px; kept {big[-1]['kept']}, dropped {big[-1]['dropped']}")
    print("  " + rates.describe(1))
    _, slowest = stage_table(big)
    t_small = Series(f"{quarter} rows (1x)", "s", [r["timings"]["total"] for r in small])
    t_big = Series(f"{rows} rows (4x)", "s", [r["timings"]["total"] for r in big])
    exponent = math.log(t_big.median / t_small.median) / math.log(rows / quarter)
    print(f"scale: {t_small.describe()}; {t_big.describe()}; exponent {exponent:.2f} (1.0 = linear)")
    return {
        "e2e_rows_per_s": round(rates.median, 1),
        "e2e_rows_per_s_min_max": [round(min(rates.values), 1), round(max(rates.values), 1)],
        "e2e_slowest_stage": slowest,
        "e2e_stage_seconds": {stage: round(s, 3) for stage, s in stage_table_quiet(big).items()},
        "e2e_bench_rows": rows,
        "scale_exponent": round(exponent, 3),
        "scale_rows": [quarter, rows],
        "scale_seconds": [round(t_small.median, 2), round(t_big.median, 2)],
    }


def stage_table_quiet(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {stage: statistics.median(r["timings"].get(stage, 0.0) for r in runs) for stage in STAGES}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(__doc__, argv, measure, "rows of the end-to-end corpus (default 2,000)", repeats=3)


if __name__ == "__main__":
    main()
