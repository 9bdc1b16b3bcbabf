"""The benchmark harness on a tiny corpus: every piece runs and writes its keys; speed is never asserted."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import pytest

from bench import bench_books, bench_download, bench_e2e, bench_reshard, bench_scale, bench_shard, common, corpus
from bench.bench_download import Settings

SMALL = Settings(processes=1, threads=4, rows_per_part=20, world_size=2)


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Images, corpora and outputs under tmp_path instead of bench/work."""
    monkeypatch.setattr(corpus, "IMAGES", tmp_path / "images")
    for module in (bench_download, bench_e2e, bench_shard, bench_books):
        monkeypatch.setattr(module, "WORK", tmp_path)
    return tmp_path


def test_corpus_is_served_with_misses_and_sizes_in_range(work: Path) -> None:
    corpus.ensure_images(30, processes=1)
    sizes = [corpus.image_path(i).stat().st_size for i in range(30)]
    assert 150_000 < min(sizes) and max(sizes) < 2_500_000
    table = corpus.corpus_table(30, "http://x")
    assert table.num_rows == 30 and any("/missing/" in u for u in table["URL"].to_pylist())


def test_download_command_and_img2dataset_flags(work: Path) -> None:
    """`curate download` runs on the prepared folder; img2dataset is not run (its start-up alone is ~20 s here),
    but every flag the bench gives it must be a parameter of img2dataset.download."""
    import img2dataset

    corpus.ensure_images(20, processes=1)
    counts: dict[str, int] = {}
    inner: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with corpus.CorpusServer() as server:
        path = corpus.write_corpus(20, server.base_url, work / "corpus.parquet")
        bench_download.prepare_ours(path, work / "ours", SMALL)
        rate = bench_download._ours(work, counts, inner, cpu)()
    assert rate > 0 and 0 < counts["ours"] <= 20 and inner["ours"][0] > 0 and cpu["ours"][0] > 0
    flags = {arg[2:] for arg in SMALL.img2dataset_command(path, work / "out") if arg.startswith("--")}
    assert flags <= set(inspect.signature(img2dataset.download).parameters)


def test_e2e_shard_and_results(work: Path, tmp_path: Path) -> None:
    e2e = bench_e2e.measure(80, repeats=1, settings=SMALL)
    assert e2e["e2e_slowest_stage"] in e2e["e2e_stage_seconds"] and e2e["e2e_rows_per_s"] > 0
    assert isinstance(e2e["scale_exponent"], float)
    shard = bench_shard.measure(80, repeats=1, settings=SMALL)
    assert shard["shard_ratio_vs_tar"] > 0 and shard["shard_mb_per_s"] > 0
    path = tmp_path / "latest.json"
    path.write_text(json.dumps({"dedup_recall": 0.99}))
    common.merge_results({**e2e, **shard}, path)
    merged = json.loads(path.read_text())
    assert merged["dedup_recall"] == 0.99 and "scale_exponent" in merged and "shard_ratio_vs_tar" in merged
    assert merged["machine"] and merged["date"]


def test_scale_corpus_and_local_runs(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scale corpus keeps exactly its live rows after the prefilter; `curate run` runs twice in a child."""
    monkeypatch.setattr(bench_scale, "WORK", work)
    rows = corpus.scale_chunk(corpus.ScaleLayout(2000, 20, 0, "http://live"), 0, 2000).to_pylist()
    seen: set[tuple[str, str]] = set()
    passing = []
    for row in rows:
        first = (row["URL"], row["TEXT"]) not in seen
        seen.add((row["URL"], row["TEXT"]))
        metadata = row["AESTHETIC_SCORE"] >= 5 and row["pwatermark"] <= 0.8 and min(row["WIDTH"], row["HEIGHT"]) >= 512
        if first and metadata:
            passing.append(row["URL"])
    assert len(passing) == 20 and all(url.startswith("http://live/img/") for url in passing)
    assert 50 < len(rows) - len(seen) < 150  # about 5 % url+caption repeats
    figures = bench_scale.main(["--sizes", "2000,4000", "--live", "20", "--no-spark", "--no-write"])
    assert isinstance(figures["scale_local_exponent"], float) and figures["scale_local_peak_rss_gb_4k"] > 0
    assert set(figures["scale_local_download_seconds"]) == {"2000", "4000"}
    assert all(stats["total"] > 0 for stats in figures["scale_local_stage_seconds"].values())


def test_reshard_runs_both_sides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """img2dataset-format tars in; curate and the hand-rolled script both run, and the ratio is reported."""
    monkeypatch.setattr(bench_reshard, "WORK", tmp_path)
    figures = bench_reshard.measure(20, repeats=1)
    assert figures["reshard_ratio_vs_handrolled"] > 0 and figures["reshard_rows"] == 20
    assert (tmp_path / "reshard" / "handrolled.tar").stat().st_size > 0


def test_gpu_bench_starts_on_cpu(tmp_path: Path) -> None:
    """bench_gpu --smoke: the GPU benchmark's code paths (tensor decoder, PIL path, DataLoader reference) on CPU."""
    from bench import bench_gpu

    figures = bench_gpu.main(["--smoke", "--no-write", "--out", str(tmp_path / "gpu.json")])
    assert figures["gpu_device"] == "CPU (smoke)" and figures["gpu_decode_fallbacks"] == 0
    assert all(figures[key] > 0 for key in ("gpu_score_images_per_s", "gpu_models_images_per_s",
                                            "gpu_pil_path_images_per_s", "gpu_reference_images_per_s"))
    assert json.loads((tmp_path / "gpu.json").read_text())["gpu_ratio_vs_reference"] > 0


def test_books_bench_inflates_a_run_and_runs_both_codes(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row of the inflated folders is accounted for by this checkout's code and by a reference commit's."""
    monkeypatch.setattr(bench_books, "TEMPLATE_ROWS", 60)
    monkeypatch.setattr(bench_books, "PART_ROWS", 700)
    figures = bench_books.measure([1500, 3000], reference="HEAD")
    assert [run["kept"] + run["dropped"] for run in figures["books_runs"]] == [1500, 3000]
    assert [run["rows"] for run in figures["books_reference"]["runs"]] == [1500, 3000]
    assert figures["books_peak_rss_gb_largest"] > 0 and isinstance(figures["books_exponent"], float)


_BURN = """
import multiprocessing, time

def burn(seconds):
    started = time.process_time()
    while time.process_time() - started < seconds:
        pass

if __name__ == "__main__":
    time.sleep(0.5)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.map(burn, [1.0, 1.0])
    time.sleep(0.5)
"""


def test_cpu_trace_counts_a_commands_process_tree_inside_a_span(tmp_path: Path) -> None:
    """Two spawned workers burn 1 s of CPU each between two idle half-seconds: the trace sees the children's CPU,
    and none of it in the first idle half-second."""
    script = tmp_path / "burn.py"
    script.write_text(_BURN)
    trace = common.CpuTrace(every=0.05)
    common.wall([sys.executable, str(script)], cpu=trace)
    start, end = trace.samples[0][0], trace.samples[-1][0]
    assert 1.9 <= trace.between(start, end) <= 2.0 + 1.0  # the burns, and at most ~1 s of interpreters' start-up
    assert trace.between(start, start + 0.3) < 0.3


def test_global_steps_bench_flags_planted_duplicates(tmp_path: Path) -> None:
    """bench_global's children on a few thousand synthetic rows: planted pHash and url duplicates are flagged, the
    recall sample finds every brute-force pair, and exponents come from the two largest sizes up to 10^7."""
    from bench import bench_global

    phash = bench_global.run_child("phash", 5000, tmp_path / "phash")
    url = bench_global.run_child("url", 5000, tmp_path / "url")
    assert 300 <= phash["removed"] <= 600 and 1000 <= url["removed"] <= 2500
    assert bench_global.recall(3000) == 1.0
    runs = {10**6: {"seconds": 2.0}, 10**7: {"seconds": 20.0}, 10**8: {"seconds": 1.0}}
    assert abs(bench_global.exponent(runs) - 1.0) < 1e-9
