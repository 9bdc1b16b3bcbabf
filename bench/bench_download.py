"""Figure 1: the download stage against the bare img2dataset command, same URLs, size and format.

Both run as commands a user would type (`curate download OUT` on a folder whose ingest and prefilter are done, with
curate run's default processes and threads; `img2dataset --url_list corpus.parquet ...` with its tuned 2 processes
x 16 threads), interleaved, on two corpora bench.corpus serves from 127.0.0.1: the bench corpus (noise-like
quality-100 JPEGs, one origin, 256 px) and a LAION-like one (photo-like JPEGs of 512-2,000 px, quality 75-95, 8
origins) at 1024 px (the SDXL recipe) and 256 px. Then the cost of the consent checks: `curate download` with and
without --respect-robots/--respect-tdm on the LAION-like corpus (256 px), and the opt-out files fetched per origin.

    .venv/bin/python -m bench.bench_download [--rows 2000] [--repeats 3]
    .venv/bin/python -m bench.bench_download --robots-only [--rows 2000] [--repeats 3]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.common import WORK, CpuTrace, Series, bench_main, cores, interleaved, tool, wall
from bench.corpus import (
    CorpusServer,
    LaionlikeServer,
    ensure_images,
    ensure_laionlike_images,
    laionlike_corpus_table,
    write_corpus,
)
from curate.config import Config
from curate.executors.local.engine import LocalRun
from curate.pipeline.run import check_same_run
from curate.storage.checkpoint import Checkpoint


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
        values: dict[str, Any] = dict(image_size=self.image_size, resize_mode=self.resize_mode, threads=self.threads,
                                      processes=self.processes, batch_size_rows=self.rows_per_part,
                                      allow_private_network=True, min_size=256, world_size=self.world_size,
                                      workers_per_rank=1)
        return Config(**{**values, **changes}).validate()

    def img2dataset_command(self, corpus: Path, output: Path) -> list[str]:
        return [tool("img2dataset"), "--url_list", str(corpus), "--input_format", "parquet", "--url_col", "URL",
                "--caption_col", "TEXT", "--output_format", "parquet", "--output_folder", str(output),
                "--processes_count", str(self.processes), "--thread_count", str(self.threads),
                "--number_sample_per_shard", str(self.rows_per_part), "--image_size", str(self.image_size),
                "--resize_mode", self.resize_mode, "--resize_only_if_bigger", "True", "--encode_format", "jpg",
                "--encode_quality", "95", "--compute_hash", "sha256", "--timeout", "10", "--retries", "0",
                "--distributor", "multiprocessing", "--enable_wandb", "False"]


def prepare_ours(corpus: Path, out: Path, settings: Settings, defaults: bool = False) -> None:
    """An output folder with ingest and prefilter done and every row alive, so download fetches every URL; with
    defaults, curate run's own processes and threads (the usable cores) instead of the settings'."""
    shutil.rmtree(out, ignore_errors=True)
    config = settings.config(processes=None, threads=None) if defaults else settings.config()
    check_same_run(out, config, [str(corpus)])
    run = LocalRun(out, config)
    run.ingest([str(corpus)])
    run.prefilter()  # scores from the models (the default): no metadata thresholds, the same URLs img2dataset gets


def _ours(work: Path, counts: dict[str, int], inner: dict[str, list[float]],
          cpu: dict[str, list[float]]) -> Callable[[], float]:
    def body() -> float:
        trace = CpuTrace()
        seconds = wall([tool("curate"), "download", str(work / "ours")], cpu=trace)
        counts["ours"] = ours_successes(work / "ours")
        inner.setdefault("ours", []).append(counts["ours"] / ours_seconds(work / "ours"))
        cpu.setdefault("ours", []).append(1000 * trace.between(*ours_span(work / "ours")) / counts["ours"])
        return counts["ours"] / seconds

    return body


def _theirs(work: Path, corpus: Path, settings: Settings, counts: dict[str, int], inner: dict[str, list[float]],
            cpu: dict[str, list[float]]) -> Callable[[], float]:
    def body() -> float:
        shutil.rmtree(work / "img2dataset", ignore_errors=True)
        trace = CpuTrace()
        seconds = wall(settings.img2dataset_command(corpus, work / "img2dataset"), cpu=trace)
        counts["img2dataset"] = theirs_successes(work / "img2dataset")
        inner.setdefault("img2dataset", []).append(counts["img2dataset"] / theirs_seconds(work / "img2dataset"))
        cpu.setdefault("img2dataset", []).append(
            1000 * trace.between(*theirs_span(work / "img2dataset")) / counts["img2dataset"])
        return counts["img2dataset"] / seconds

    return body


def ours_successes(out: Path) -> int:
    parts = sorted((out / "stages" / "download").glob("part-*.parquet"))  # not the origins-N parts
    return sum(pq.read_table(p, columns=["status"])["status"].to_pylist().count("success") for p in parts)


def theirs_successes(output: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in output.glob("*_stats.json"))


def ours_seconds(out: Path) -> float:
    """curate's own span: the download workers' first part's start to last part's end (their start-up excluded, as
    in theirs_seconds); the stage's whole time for a checkpoint written before the workers reported it."""
    meta = Checkpoint(out, "download").meta()
    return meta.get("work_seconds") or meta["seconds"]


def ours_span(out: Path) -> tuple[float, float]:
    """curate's own span as (start, end) in time.time()."""
    start, end = Checkpoint(out, "download").meta()["work_span"]
    return start, end


def theirs_seconds(output: Path) -> float:
    """img2dataset's own span: first shard's start to last shard's end (its workers' start-up excluded)."""
    start, end = theirs_span(output)
    return end - start


def theirs_span(output: Path) -> tuple[float, float]:
    shards = [json.loads(p.read_text()) for p in output.glob("*_stats.json")]
    return min(s["start_time"] for s in shards), max(s["end_time"] for s in shards)


def compare(corpus_of: Callable[[int, Path], Path], rows: int, repeats: int, warmup_rows: int, settings: Settings,
            name: str) -> dict[str, Any]:
    """Interleaved runs of both commands after a small warm-up round of each; images/s are successful images per
    second of the command's wall time (interpreter start-up and worker spawning included, as a user sees it) and of
    each tool's own span (start-up excluded); CPU per image is the tool's process tree's CPU inside its own span over
    its successes (neither the server's CPU nor the machine's other load counts)."""
    counts: dict[str, int] = {}
    inner: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    runs: dict[str, list[float]] = {}
    for size, rounds in ([(warmup_rows, 0)] if warmup_rows else []) + [(rows, repeats)]:
        work = WORK / f"download-{name}-{size}"
        corpus = corpus_of(size, work / "corpus.parquet")
        prepare_ours(corpus, work / "ours", settings, defaults=True)
        bodies = {"ours": _ours(work, counts, inner, cpu),
                  "img2dataset": _theirs(work, corpus, settings, counts, inner, cpu)}
        runs = interleaved(bodies, rounds, warmup=1 if rounds == 0 else 0)
    ours_series = Series("curate download", "images/s", runs["ours"])
    theirs_series = Series("img2dataset", "images/s", runs["img2dataset"])
    ratios = Series("ratio ours/img2dataset", "", [a / b for a, b in zip(runs["ours"], runs["img2dataset"],
                                                                             strict=True)])
    in_stage = Series("ratio inside the tools (start-up excluded)", "", [
        a / b for a, b in zip(inner["ours"][-repeats:], inner["img2dataset"][-repeats:], strict=True)])
    inner_ours = Series("curate inside", "images/s", inner["ours"][-repeats:])
    cpu_ours = Series("curate CPU per image inside its span", "ms", cpu["ours"][-repeats:])
    cpu_theirs = Series("img2dataset CPU per image inside its span", "ms", cpu["img2dataset"][-repeats:])
    cpu_ratios = Series("CPU ratio img2dataset/ours", "", [
        b / a for a, b in zip(cpu["ours"][-repeats:], cpu["img2dataset"][-repeats:], strict=True)])
    print(f"download, {name}: {rows} URLs, curate run's defaults vs img2dataset {settings.processes} processes x "
          f"{settings.threads} threads, {settings.image_size} px {settings.resize_mode}, jpg q95; successes: ours "
          f"{counts['ours']}, img2dataset {counts['img2dataset']}; load average {os.getloadavg()[0]:.1f}")
    for series in (ours_series, theirs_series, ratios, in_stage, cpu_ours, cpu_theirs, cpu_ratios):
        print("  " + series.describe())
    per_core = inner_ours.median / cores()
    print(f"  in-tool ratio {in_stage.median:.3f} (target >= 1.5); {per_core:.1f} images/s per core inside the "
          f"tool ({cores()} cores)")
    return {"ratio": ours_series.median / theirs_series.median, "ratios": ratios.values, "ours": ours_series,
            "theirs": theirs_series, "in_stage": in_stage, "per_core": per_core, "cpu_ours": cpu_ours,
            "cpu_theirs": cpu_theirs, "cpu_ratio": cpu_ratios}


def origin_files_per_origin(out: Path) -> float:
    """robots.txt fetches per origin in the last download (one per origin per download process at most)."""
    parts = sorted((out / "stages" / "download").glob("origins-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
    if table is None:
        return 0.0
    robots = table.filter(pc.equal(table["kind"], "robots"))
    return robots.num_rows / max(1, len(set(robots["origin"].to_pylist())))


def measure_robots(rows: int, repeats: int, settings: Settings = Settings()) -> dict[str, Any]:
    """`curate download` (curate run's default processes and threads) with the consent checks on and off, interleaved,
    on the LAION-like corpus at 256 px (where the fetch, not the resize, is most of the time); images/s inside the
    tool, and robots.txt fetches per origin (its robots.txt and tdmrep.json answer 404: the cost is the requests)."""
    ensure_laionlike_images(rows)
    on_off = {"robots on": {}, "robots off": {"respect_robots": False, "respect_tdm": False}}
    inner: dict[str, list[float]] = {}
    fetches: list[float] = []
    with LaionlikeServer() as server:
        work = WORK / f"download-robots-{rows}"
        corpus = work / "corpus.parquet"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(laionlike_corpus_table(rows, server.base_urls), corpus)

        def body(name: str, changes: dict[str, Any]) -> Callable[[], float]:
            out = work / name.replace(" ", "-")
            config = settings.config(processes=None, threads=None, **changes)
            shutil.rmtree(out, ignore_errors=True)
            check_same_run(out, config, [str(corpus)])
            run = LocalRun(out, config)
            run.ingest([str(corpus)])
            run.prefilter("model")

            def once() -> float:
                seconds = wall([tool("curate"), "download", str(out)])
                inner.setdefault(name, []).append(ours_successes(out) / ours_seconds(out))
                if name == "robots on":
                    fetches.append(origin_files_per_origin(out))
                return ours_successes(out) / seconds
            return once

        runs = interleaved({name: body(name, changes) for name, changes in on_off.items()}, repeats)
    with_robots = Series("with robots.txt + tdmrep.json", "images/s", inner["robots on"][-repeats:])
    without = Series("without", "images/s", inner["robots off"][-repeats:])
    ratio = Series("ratio with/without", "", [a / b for a, b in zip(with_robots.values, without.values, strict=True)])
    print(f"consent checks, LAION-like corpus ({rows} URLs, 256 px), load average {os.getloadavg()[0]:.1f}")
    for series in (with_robots, without, ratio):
        print("  " + series.describe())
    print(f"  robots.txt fetches per origin: {fetches[-1]:.1f} (one per download process at most); command wall "
          f"images/s with {runs['robots on']} without {runs['robots off']}")
    return {"download_robots_images_per_s": [round(with_robots.median, 1), round(without.median, 1)],
            "download_robots_images_per_s_min_max": [[round(min(with_robots.values), 1),
                                                      round(max(with_robots.values), 1)],
                                                     [round(min(without.values), 1), round(max(without.values), 1)]],
            "download_robots_ratio": round(ratio.median, 3),
            "download_robots_ratio_min_max": [round(min(ratio.values), 3), round(max(ratio.values), 3)],
            "download_robots_fetches_per_origin": round(fetches[-1], 2),
            "download_robots_urls": rows, "download_robots_load_average": round(os.getloadavg()[0], 2)}


def measure(rows: int, repeats: int, warmup_rows: int = 100, settings: Settings = Settings()) -> dict[str, Any]:
    """The bench corpus at 256 px, then the LAION-like corpus at 1024 and 256 px."""
    ensure_images(rows)
    with CorpusServer() as server:
        bench = compare(lambda size, path: write_corpus(size, server.base_url, path), rows, repeats, warmup_rows,
                        settings, "bench")
    ensure_laionlike_images(rows)
    laion: dict[int, dict[str, Any]] = {}
    with LaionlikeServer() as laion_server:
        def laion_corpus(size: int, path: Path) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(laionlike_corpus_table(size, laion_server.base_urls), path)
            return path

        for image_size in (1024, 256):
            laion[image_size] = compare(laion_corpus, rows, repeats, 0, replace(settings, image_size=image_size),
                                        f"laionlike-{image_size}")
    return {
        "download_ratio_vs_img2dataset": round(bench["ratio"], 3),
        "download_ratio_min_max": [round(min(bench["ratios"]), 3), round(max(bench["ratios"]), 3)],
        "download_images_per_s": round(bench["ours"].median, 1),
        "download_images_per_s_min_max": [round(min(bench["ours"].values), 1), round(max(bench["ours"].values), 1)],
        "download_img2dataset_images_per_s": round(bench["theirs"].median, 1),
        "download_images_per_s_per_core": round(bench["per_core"], 2),
        "download_ratio_in_stage": round(bench["in_stage"].median, 3),
        "download_ratio_in_stage_min_max": [round(min(bench["in_stage"].values), 3),
                                            round(max(bench["in_stage"].values), 3)],
        "download_ratio_in_stage_laionlike": round(laion[1024]["in_stage"].median, 3),
        "download_ratio_in_stage_laionlike_min_max": [round(min(laion[1024]["in_stage"].values), 3),
                                                      round(max(laion[1024]["in_stage"].values), 3)],
        "download_images_per_s_per_core_laionlike": round(laion[1024]["per_core"], 2),
        "download_ratio_in_stage_laionlike_256": round(laion[256]["in_stage"].median, 3),
        "download_images_per_s_per_core_laionlike_256": round(laion[256]["per_core"], 2),
        **{f"download_cpu_ms_per_image{suffix}": [round(r["cpu_ours"].median, 2), round(r["cpu_theirs"].median, 2)]
           for suffix, r in (("", bench), ("_laionlike", laion[1024]), ("_laionlike_256", laion[256]))},
        **{f"download_cpu_ratio_in_stage{suffix}": round(r["cpu_ratio"].median, 3)
           for suffix, r in (("", bench), ("_laionlike", laion[1024]), ("_laionlike_256", laion[256]))},
        "download_bench_urls": rows,
        "download_bench_load_average": round(os.getloadavg()[0], 2),
        **measure_robots(rows, repeats, settings),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    robots_only = "--robots-only" in argv
    figures = [a for a in argv if a != "--robots-only"]
    return bench_main(__doc__, figures, measure_robots if robots_only else measure,
                      "URLs in the corpus (default 2,000)", repeats=3)


if __name__ == "__main__":
    main()
