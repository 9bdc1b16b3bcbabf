"""Figure 2: the shard stage against GNU tar packing the same member files from disk, and dd's sequential write.

Ours: curate's whole shard stage (shuffle, plan, placement and the shard checkpoint, each image written once into its
tar, sha256 and one fsync per tar, index.json) on a finished end-to-end run. Reference: the same members, extracted
once into one folder per shard, packed by `tar -cf` per shard then fsync'd; and `dd if=/dev/zero conv=fsync` writing
as many bytes. All interleaved, page cache warm. The load average is recorded before and after: on a saturated
machine the figure falls towards the ratio of CPU seconds (tar hashes nothing and runs no Python).

    .venv/bin/python -m bench.bench_shard [--rows 2000] [--repeats 5]
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import tarfile
import time
from pathlib import Path
from typing import Any

from bench.bench_download import Settings
from bench.bench_e2e import SETTINGS, run_once
from bench.common import WORK, Series, bench_main, interleaved, wall
from bench.corpus import CorpusServer, ensure_images, write_corpus
from curate.executors.local.engine import LocalRun
from curate.executors.local.shard import shard

MB = 1_000_000


def finished_run(rows: int, out: Path, settings: Settings = SETTINGS) -> Path:
    """A finished end-to-end run to re-shard (reused when an earlier bench left one with the same rows)."""
    stats = out / "stats.json"
    if stats.exists() and json.loads(stats.read_text())["input_rows"] == rows:
        return out
    ensure_images(rows)
    with CorpusServer() as server:
        run_once(write_corpus(rows, server.base_url, out.parent / f"corpus-{rows}.parquet"), out, settings)
    return out


def extract_members(out: Path, files: Path) -> list[Path]:
    """Every shard's members as files, one folder per shard; returns the folders in shard order."""
    shutil.rmtree(files, ignore_errors=True)
    folders = []
    for tar_path in sorted((out / "shards").glob("*.tar")):
        folder = files / tar_path.stem
        with tarfile.open(tar_path) as tar:
            tar.extractall(folder, filter="data")
        folders.append(folder)
    return folders


def shard_stage(out: Path, settings: Settings = SETTINGS) -> int:
    """Run curate's shard stage; returns the bytes of tar it wrote."""
    shard(LocalRun(out, settings.config(scores="metadata")))
    index = json.loads((out / "shards" / "index.json").read_text())
    return sum(entry["filesize"] for entry in index["shardlist"])


def gnu_tar(folders: list[Path], destination: Path) -> int:
    """`tar -cf` of each folder (members in the shard's order), then fsync, as the shard stage does."""
    shutil.rmtree(destination, ignore_errors=True)
    destination.mkdir(parents=True)
    total = 0
    for folder in folders:
        target = destination / f"{folder.name}.tar"
        names = sorted(os.listdir(folder))
        wall(["tar", "-cf", str(target), "-C", str(folder), *names])
        descriptor = os.open(target, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)
        total += target.stat().st_size
    return total


def measure(rows: int, repeats: int, settings: Settings = SETTINGS) -> dict[str, Any]:
    out = finished_run(rows, WORK / "e2e" / f"out-{rows}", settings)
    shard_stage(out, settings)
    folders = extract_members(out, WORK / "shard-files")
    written: dict[str, int] = {}
    cpu: dict[str, list[float]] = {"ours": [], "tar": [], "dd": []}

    def timed(name: str, body: Any) -> float:
        # CPU seconds: this process's for ours (its threads included), the children's for tar and dd
        who = resource.RUSAGE_SELF if name == "ours" else resource.RUSAGE_CHILDREN
        before, started = resource.getrusage(who), time.perf_counter()
        written[name] = body()
        seconds, after = time.perf_counter() - started, resource.getrusage(who)
        cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        return written[name] / seconds / MB

    def dd() -> int:
        count = max(1, written.get("ours", 64 * MB) // MB)
        wall(["dd", "if=/dev/zero", f"of={WORK / 'dd.bin'}", "bs=1M", f"count={count}", "conv=fsync"])
        return count * (1 << 20)

    load_before = os.getloadavg()
    runs = interleaved({"ours": lambda: timed("ours", lambda: shard_stage(out, settings)),
                        "tar": lambda: timed("tar", lambda: gnu_tar(folders, WORK / "tar-out")),
                        "dd": lambda: timed("dd", dd)}, repeats)
    (WORK / "dd.bin").unlink(missing_ok=True)
    load = [[round(x, 2) for x in load_before], [round(x, 2) for x in os.getloadavg()]]
    cpu_ours, cpu_tar = (statistics.median(cpu[name][1:]) for name in ("ours", "tar"))  # warm-up left out
    series = {name: Series(label, "MB/s", runs[name]) for name, label in
              (("ours", "curate shard stage"), ("tar", "GNU tar + fsync"), ("dd", "dd conv=fsync"))}
    ratios = Series("ratio ours/tar", "", [a / b for a, b in zip(runs["ours"], runs["tar"], strict=True)])
    print(f"shard: {len(folders)} shards, {written['ours'] / MB:.1f} MB of tar (GNU tar wrote "
          f"{written['tar'] / MB:.1f} MB) from a {rows}-row run")
    for item in (*series.values(), ratios):
        print("  " + item.describe())
    ratio = series["ours"].median / series["tar"].median
    print(f"  ratio of medians {ratio:.3f} (target >= 0.8); "
          f"{series['ours'].median / series['dd'].median:.2f} of dd's sequential write")
    print(f"  CPU seconds per run (median): curate {cpu_ours:.3f}, GNU tar {cpu_tar:.3f}; load average (1, 5, 15 min) "
          f"{load[0]} before, {load[1]} after")
    return {
        "shard_ratio_vs_tar": round(ratio, 3),
        "shard_ratio_min_max": [round(min(ratios.values), 3), round(max(ratios.values), 3)],
        "shard_mb_per_s": round(series["ours"].median, 1),
        "shard_mb_per_s_min_max": [round(min(series["ours"].values), 1), round(max(series["ours"].values), 1)],
        "shard_tar_mb_per_s": round(series["tar"].median, 1),
        "shard_dd_mb_per_s": round(series["dd"].median, 1),
        "shard_fraction_of_dd": round(series["ours"].median / series["dd"].median, 3),
        "shard_cpu_seconds_ours_tar": [round(cpu_ours, 3), round(cpu_tar, 3)],
        "shard_load_average_before_after": load,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(__doc__, argv, measure, "rows of the run whose shards are rewritten", repeats=5)


if __name__ == "__main__":
    main()
