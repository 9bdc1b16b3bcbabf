"""Figure 1: the download stage against the bare img2dataset command, same URLs, processes, threads, size, format.

Both run as commands a user would type (`curate download OUT` on a folder whose ingest and prefilter are done;
`img2dataset --url_list corpus.parquet ...`), interleaved, on the corpus bench.corpus serves from 127.0.0.1.

    .venv/bin/python -m bench.bench_download [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from bench.common import WORK, Series, bench_main, cores, interleaved, tool, wall
from bench.corpus import CorpusServer, ensure_images, write_corpus
from curate.config import Config
from curate.engines.local import LocalRun
from curate.io import Checkpoint
from curate.pipeline import check_same_run


@dataclass(frozen=True)
class Settings:
    """What both tools are given: processes, threads per process, rows per part/shard, image size and mode."""

    processes: int = 2
    threads: int = 16
    rows_per_part: int = 250
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    world_size: int = 8  # shards: world_size x 1 data-loader worker

    def config(self, **changes: Any) -> Config:
        return Config(image_size=self.image_size, resize_mode=self.resize_mode, threads=self.threads,
                      processes=self.processes, batch_size_rows=self.rows_per_part, allow_private_network=True,
                      min_size=256, world_size=self.world_size, workers_per_rank=1, **changes).validate()

    def img2dataset_command(self, corpus: Path, output: Path) -> list[str]:
        return [tool("img2dataset"), "--url_list", str(corpus), "--input_format", "parquet", "--url_col", "URL",
                "--caption_col", "TEXT", "--output_format", "parquet", "--output_folder", str(output),
                "--processes_count", str(self.processes), "--thread_count", str(self.threads),
                "--number_sample_per_shard", str(self.rows_per_part), "--image_size", str(self.image_size),
                "--resize_mode", self.resize_mode, "--resize_only_if_bigger", "True", "--encode_format", "jpg",
                "--encode_quality", "95", "--compute_hash", "sha256", "--timeout", "10", "--retries", "0",
                "--distributor", "multiprocessing", "--enable_wandb", "False"]


def prepare_ours(corpus: Path, out: Path, settings: Settings) -> None:
    """An output folder with ingest and prefilter done and every row alive, so download fetches every URL."""
    shutil.rmtree(out, ignore_errors=True)
    config = settings.config()
    check_same_run(out, config, [str(corpus)])
    run = LocalRun(out, config)
    run.ingest([str(corpus)])
    run.prefilter("model")  # no metadata thresholds: the same URLs img2dataset gets


def _ours(work: Path, counts: dict[str, int], inner: dict[str, list[float]]) -> Callable[[], float]:
    def body() -> float:
        seconds = wall([tool("curate"), "download", str(work / "ours")])
        counts["ours"] = ours_successes(work / "ours")
        inner.setdefault("ours", []).append(counts["ours"] / Checkpoint(work / "ours", "download").meta()["seconds"])
        return counts["ours"] / seconds

    return body


def _theirs(work: Path, corpus: Path, settings: Settings, counts: dict[str, int],
            inner: dict[str, list[float]]) -> Callable[[], float]:
    def body() -> float:
        shutil.rmtree(work / "img2dataset", ignore_errors=True)
        seconds = wall(settings.img2dataset_command(corpus, work / "img2dataset"))
        counts["img2dataset"] = theirs_successes(work / "img2dataset")
        inner.setdefault("img2dataset", []).append(counts["img2dataset"] / theirs_seconds(work / "img2dataset"))
        return counts["img2dataset"] / seconds

    return body


def ours_successes(out: Path) -> int:
    parts = sorted((out / "stages" / "download").glob("*.parquet"))
    return sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success") for p in parts)


def theirs_successes(output: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in output.glob("*_stats.json"))


def theirs_seconds(output: Path) -> float:
    """img2dataset's own span: first shard's start to last shard's end (its workers' start-up excluded)."""
    shards = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
    return max(s["end_time"] for s in shards) - min(s["start_time"] for s in shards)


def measure(rows: int, repeats: int, warmup_rows: int = 100, settings: Settings = Settings()) -> dict[str, Any]:
    """Interleaved runs of both commands after a small warm-up round of each; images/s are successful images per
    second of the command's wall time (interpreter start-up and worker spawning included, as a user sees it)."""
    ensure_images(rows)
    counts: dict[str, int] = {}
    inner: dict[str, list[float]] = {}
    with CorpusServer() as server:
        for size, rounds in ([(warmup_rows, 0)] if warmup_rows else []) + [(rows, repeats)]:
            work = WORK / f"download-{size}"
            corpus = write_corpus(size, server.base_url, work / "corpus.parquet")
            prepare_ours(corpus, work / "ours", settings)
            bodies = {"ours": _ours(work, counts, inner), "img2dataset": _theirs(work, corpus, settings, counts, inner)}
            runs = interleaved(bodies, rounds, warmup=1 if rounds == 0 else 0)
    ours_series = Series("curate download", "images/s", runs["ours"])
    theirs_series = Series("img2dataset", "images/s", runs["img2dataset"])
    ratios = Series("ratio ours/img2dataset", "", [a / b for a, b in zip(runs["ours"], runs["img2dataset"],
                                                                             strict=True)])
    print(f"download: {rows} URLs, {settings.processes} processes x {settings.threads} threads, "
          f"{settings.image_size} px {settings.resize_mode}, jpg q95, parquet output; "
          f"successes: ours {counts['ours']}, img2dataset {counts['img2dataset']}")
    for series in (ours_series, theirs_series, ratios):
        print("  " + series.describe())
    ratio = ours_series.median / theirs_series.median
    in_stage = Series("ratio inside the tools (start-up excluded)", "", [
        a / b for a, b in zip(inner["ours"][-repeats:], inner["img2dataset"][-repeats:], strict=True)])
    print("  " + in_stage.describe())
    print(f"  ratio of medians {ratio:.3f} (target >= 0.9); "
          f"{ours_series.median / cores():.1f} images/s per core ({cores()} cores)")
    return {
        "download_ratio_vs_img2dataset": round(ratio, 3),
        "download_ratio_min_max": [round(min(ratios.values), 3), round(max(ratios.values), 3)],
        "download_images_per_s": round(ours_series.median, 1),
        "download_images_per_s_min_max": [round(min(ours_series.values), 1), round(max(ours_series.values), 1)],
        "download_img2dataset_images_per_s": round(theirs_series.median, 1),
        "download_images_per_s_per_core": round(ours_series.median / cores(), 2),
        "download_ratio_in_stage": round(in_stage.median, 3),
        "download_bench_urls": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(__doc__, argv, measure, "URLs in the corpus (default 2,000)", repeats=3)


if __name__ == "__main__":
    main()
