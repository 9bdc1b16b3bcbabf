"""`make bench-books`: the local shard stage and the books when most rows survive (a LAION-Aesthetics file, where
millions of rows reach select), at two sizes, in fresh processes: wall time, peak RSS and the growth exponent.

The run folders are made from a real finished run (bench_shard's, 200 rows): its select and download checkpoint rows
are repeated with new row numbers, keys and URLs into parts of 10,000 rows, every row a survivor, each image a small
JPEG (the stage's cost here is per sample, not per byte: bench-shard measures the bytes). The child runs
`shard` then `finish` (tars, index.json, ledger, samples.parquet, stats.json) as `curate shard` does.
With --reference COMMIT the same folders are also run by that commit's code (a git worktree), for the memory and
time of the code before a change. Figures merge into latest.json as books_*.

    .venv/bin/python -m bench.bench_books [--sizes 1000000,3000000] [--reference COMMIT] [--no-write]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from bench.bench_scale import sizes
from bench.common import ROOT, WORK, merge_results

PART_ROWS = 10_000
TEMPLATE_ROWS = 200
CHILD = """
import sys, time
from curate.config import Config
from curate.executors.local.engine import LocalRun
from curate.executors.local.shard import finish, shard
config = Config(scores="metadata", world_size=8, workers_per_rank=2, target_shard_size=256_000_000,
                allow_private_network=True).validate()
run = LocalRun(sys.argv[1], config)
started = time.perf_counter()
shard(run)
stats = finish(run, started)
# the high-water mark of this process's own memory (ru_maxrss would also count the parent's, copied at the fork)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(stats["kept"], stats["dropped"], stats["shards"]["num_shards"], peak)
"""


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 80, 40)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def template() -> Path:
    from bench.bench_shard import finished_run

    return finished_run(TEMPLATE_ROWS, WORK / "books" / "template")


def inflate(source: Path, rows: int, out: Path) -> None:
    """A run folder of `rows` input rows, every one reaching select alive, from the template's survivors."""
    shutil.rmtree(out, ignore_errors=True)
    stages = out / "stages"
    select = pq.read_table(source / "stages" / "select").filter(pc.is_null(pq.read_table(
        source / "stages" / "select", columns=["drop_reason"])["drop_reason"]))
    downloaded = pq.read_table(source / "stages" / "download")
    downloaded = downloaded.take(pc.index_in(select["row"], downloaded["row"]))
    jpg = tiny_jpeg()
    for stage in ("ingest", "prefilter", "download", "score", "dedup", "select"):
        (stages / stage).mkdir(parents=True)
        meta = json.loads((source / "stages" / stage / "_SUCCESS").read_text())
        if stage == "ingest":
            meta.update(input_rows=rows, parts=math.ceil(rows / PART_ROWS))
        (stages / stage / "_SUCCESS").write_text(json.dumps(meta))
    shutil.copy(source / "stages" / "run.json", stages / "run.json")
    for part, low in enumerate(range(0, rows, PART_ROWS)):
        numbers = np.arange(low, min(rows, low + PART_ROWS), dtype=np.int64)
        name = f"part-{part:06d}.parquet"
        pq.write_table(pa.table({"row": numbers, "key": [f"{row:016x}" for row in numbers.tolist()]}),
                       stages / "ingest" / name)
        pq.write_table(renumbered(select, numbers, len(jpg)), stages / "select" / name)
        images = renumbered(downloaded, numbers, len(jpg))
        images = images.set_column(images.column_names.index("jpg"), "jpg", pa.array([jpg] * len(numbers), pa.binary()))
        pq.write_table(images, stages / "download" / name)


def renumbered(table: pa.Table, numbers: np.ndarray, jpg_bytes: int) -> pa.Table:
    """The template's rows repeated as input rows `numbers`, each with its own key and URL."""
    table = table.take(pa.array(numbers % table.num_rows))
    values = {"row": pa.array(numbers), "key": pa.array([f"{row:016x}" for row in numbers.tolist()]),
              "url": pa.array([f"https://example.com/{row}.jpg" for row in numbers.tolist()]),
              "jpg_bytes": pa.array(np.full(len(numbers), jpg_bytes))}
    for name, column in values.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column.cast(table.schema.field(name).type))
    return table


def child(out: Path, code_root: Path) -> dict[str, float]:
    shutil.rmtree(out / "stages" / "shard", ignore_errors=True)  # another code's checkpoint may differ in parts
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", CHILD, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=code_root, text=True)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"shard + books failed on {out}:\n{stderr[-4000:]}")
    kept, dropped, shards, peak_kib = map(int, stdout.split()[-4:])
    return {"seconds": seconds, "peak_rss_gb": peak_kib * 1024 / 1e9, "kept": kept, "dropped": dropped,
            "shards": shards}


def measure(row_counts: list[int], reference: str | None) -> dict[str, Any]:
    source = template()
    worktree = None
    if reference:
        worktree = WORK / "books" / f"code-{reference[:10]}"
        if not worktree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(worktree), reference], cwd=ROOT, check=True,
                           capture_output=True)
    results: dict[str, list[dict[str, float]]] = {"current": [], "reference": []}
    print(f"load before: {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for rows in row_counts:
            out = WORK / "books" / f"run-{rows}"
            inflate(source, rows, out)
            for name, code in (("current", ROOT), ("reference", worktree)):
                if code is None:
                    continue
                figures = child(out, code)
                if figures["kept"] + figures["dropped"] != rows:
                    raise RuntimeError(f"{name}: {figures['kept']} kept + {figures['dropped']} dropped != {rows}")
                results[name].append({"rows": rows, **figures})
                print(f"  {name:>9} {rows:>10,} rows: {figures['seconds']:7.1f} s, peak RSS "
                      f"{figures['peak_rss_gb']:.2f} GB, {figures['kept']:,} kept in {figures['shards']} shards",
                      flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if worktree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)
    print(f"load after: {os.getloadavg()[0]:.1f}", flush=True)
    current = results["current"]
    small, large = current[0], current[-1]
    exponent = (math.log(large["seconds"] / small["seconds"]) / math.log(large["rows"] / small["rows"])
                if len(current) > 1 else None)
    figures: dict[str, Any] = {"books_runs": current, "books_exponent": exponent,
                               "books_peak_rss_gb_largest": large["peak_rss_gb"]}
    if results["reference"]:
        figures["books_reference"] = {"commit": reference, "runs": results["reference"]}
        figures["books_rss_ratio_vs_reference_largest"] = results["reference"][-1]["peak_rss_gb"] / large["peak_rss_gb"]
    print(json.dumps({k: v for k, v in figures.items() if k != "books_runs"}, indent=1))
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=sizes, default=[1_000_000, 3_000_000], help="input rows, all surviving")
    parser.add_argument("--reference", help="also run this commit's code on the same folders")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/latest.json")
    args = parser.parse_args(argv)
    figures = measure(args.sizes, args.reference)
    if not args.no_write:
        merge_results(figures)
    return figures


if __name__ == "__main__":
    main()
