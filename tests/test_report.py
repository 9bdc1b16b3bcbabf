"""report.html: built for a small real run (HTTP on 127.0.0.1), checked structurally, rendered in a real browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate.cli import app
from curate.config import Config
from curate.pipeline import run as pipeline
from curate.report import data as report_data
from curate.report.build import PER_GRID, build_report
from curate.testing.server import ImageServer, Response
from curate.tools.demo import generated_image, jpeg

THRESHOLD, MIN_SIZE = 5.0, 64


class ReportParser(HTMLParser):
    """Tables by class (rows of cell text), reason sections and their figures, every src/href value."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.sections: dict[str, list[dict[str, str]]] = {}
        self.links: list[str] = []
        self.tags: list[str] = []
        self._table: str | None = None
        self._section: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.links += [values[k] for k in ("src", "href") if k in values]
        if tag == "table":
            self._table = values.get("class", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "section" and "data-reason" in values:
            self._section = values["data-reason"]
            self.sections[self._section] = []
        elif tag == "figure" and self._section is not None:
            self.sections[self._section].append(values)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        elif tag == "section":
            self._section = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> ReportParser:
    parser = ReportParser()
    parser.feed(path.read_text())
    return parser


def corpus_rows(rng: np.random.Generator) -> tuple[dict[str, Response], list[dict[str, Any]]]:
    """~30 rows with small images and every kind of drop the report has a grid for."""
    routes: dict[str, Response] = {}
    rows: list[dict[str, Any]] = []

    def add(path: str, size: tuple[int, int], caption: str = "", claimed: tuple[int, int] | None = None,
            aesthetic: float = 6.0, watermark: float = 0.1, body: bytes | None = None) -> None:
        if body is not None or path not in routes:
            routes[path] = Response(body if body is not None else jpeg(generated_image(rng, *size)))
        width, height = claimed or size
        rows.append({"URL": path, "TEXT": caption or f"a photo #{len(rows)}", "WIDTH": float(width),
                     "HEIGHT": float(height), "AESTHETIC_SCORE": aesthetic, "pwatermark": watermark})

    for i in range(16):
        add(f"/img/{i}.jpg", (96 + 6 * i, 80 + 4 * i), aesthetic=4.6 + 0.18 * i)
    add("/small.jpg", (40, 40))  # metadata_low_resolution
    add("/liar.jpg", (40, 48), claimed=(200, 240))  # metadata lies: select's low_resolution
    add("/wm.jpg", (120, 100), watermark=0.95)  # metadata_watermark
    routes["/copy/0.jpg"] = routes["/copy/1.jpg"] = routes["/img/15.jpg"]  # duplicate_exact
    add("/copy/0.jpg", (156, 140), aesthetic=6.0)
    add("/copy/1.jpg", (156, 140), aesthetic=5.9)
    phash_copy = Image.open(__import__("io").BytesIO(routes["/img/14.jpg"].body)).resize((140, 126))
    add("/resized.jpg", (140, 126), body=jpeg(phash_copy), aesthetic=6.5)  # duplicate_phash
    rows.append(dict(rows[3]))  # duplicate_url
    add("/missing.jpg", (100, 100))  # http_error: no route
    routes.pop("/missing.jpg")
    add("/html.jpg", (100, 100), body=b"<html>not an image</html>")  # decode_failed
    add("/empty.jpg", (100, 100), caption=" ")  # empty_caption
    return routes, rows


@pytest.fixture(scope="module")
def run_output(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("report")
    routes, rows = corpus_rows(np.random.default_rng(0))
    with ImageServer(routes) as server:
        served = [dict(r, URL=server.url(r["URL"])) for r in rows]
        pq.write_table(pa.Table.from_pylist(served), root / "sample.parquet")
        config = Config(scores="metadata", world_size=2, workers_per_rank=1, allow_private_network=True,
                        min_size=MIN_SIZE, threshold=THRESHOLD, threads=4, timeout=5.0).validate()
        pipeline.run_local([str(root / "sample.parquet")], root / "out", config)
    yield root / "out"


def test_run_writes_a_self_contained_report(run_output: Path) -> None:
    report = parse(run_output / "report.html")
    assert report.links, "the report embeds charts and thumbnails"
    external = [link for link in report.links if re.match(r"(https?:)?//", link)]
    assert external == []
    assert all(link.startswith("data:image/") for link in report.links)
    assert "script" not in report.tags and "link" not in report.tags


def test_funnel_numbers_equal_stats(run_output: Path) -> None:
    stats = json.loads((run_output / "stats.json").read_text())
    report = parse(run_output / "report.html")
    funnel = [[stage, int(rows.replace(",", "")), int(dropped.replace(",", ""))]
              for stage, rows, dropped in report.tables["funnel"][1:]]
    assert funnel == [[s["stage"], s["rows"], s["dropped"]] for s in stats["funnel"]]
    reasons = {(stage, reason): int(rows.replace(",", "")) for stage, reason, rows, _ in report.tables["reasons"][1:]}
    assert reasons == {(stage, reason): count for stage, counts in stats["dropped_by_stage"].items()
                       for reason, count in counts.items()}


def test_every_ledger_reason_has_a_grid(run_output: Path) -> None:
    ledger = pq.read_table(run_output / "ledger.parquet")
    reasons = set(ledger["reason"].to_pylist())
    assert {"duplicate_exact", "duplicate_phash", "duplicate_url", "http_error", "metadata_low_resolution",
            "low_resolution"} <= reasons
    report = parse(run_output / "report.html")
    assert set(report.sections) == reasons
    for reason, figures in report.sections.items():
        rows = {int(f["data-row"]) for f in figures}
        assert figures and rows <= set(ledger.filter(pa.compute.equal(ledger["reason"], reason))["row"].to_pylist())


def test_rows_without_images_show_their_url(run_output: Path) -> None:
    text = (run_output / "report.html").read_text()
    section = text[text.index('data-reason="http_error"'):]
    section = section[: section.index("</section>")]
    assert "no stored image" in section and "/missing.jpg" in section


def test_duplicate_groups_put_the_survivor_first(run_output: Path) -> None:
    text = (run_output / "report.html").read_text()
    groups = re.findall(r'<div class="group">(.*?)</div>(?=<div class="group">|</div>)', text, flags=re.S) or []
    assert groups
    samples = set(pq.read_table(run_output / "samples.parquet", columns=["row"])["row"].to_pylist())
    ledger = pq.read_table(run_output / "ledger.parquet", columns=["row", "reason"]).to_pylist()
    later = {r["row"] for r in ledger if not r["reason"].startswith("duplicate_")}
    for group in groups:
        first = re.search(r'<figure class="survivor"[^>]*data-row="(\d+)"', group)
        # the survivor won dedup: it is kept, or lost a later stage (select, or the shard remainder, which a
        # download that failed under load can reshuffle)
        assert first is not None and int(first.group(1)) in samples | later
        copies = {int(row) for row in re.findall(r'data-row="(\d+)"', group)} - {int(first.group(1))}
        assert copies and not copies & samples


def test_boundary_grids_straddle_the_threshold(run_output: Path) -> None:
    above = report_data.aesthetic_picks(run_output, THRESHOLD, 4)
    details = report_data.row_details(run_output, set(above["above"] + above["below"]))
    assert above["above"] and above["below"]
    assert all(details[r]["aesthetic_score"] >= THRESHOLD for r in above["above"])
    # rows dropped before scoring carry only the metadata's score
    assert all(details[r].get("aesthetic_score", details[r].get("aesthetic")) < THRESHOLD for r in above["below"])


def test_distribution_sample_is_bounded(run_output: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stats = json.loads((run_output / "stats.json").read_text())
    assert report_data.distribution_sample(run_output, stats["input_rows"]).num_rows == stats["input_rows"]
    monkeypatch.setattr(report_data, "MAX_POINTS", 8)
    assert 0 < report_data.distribution_sample(run_output, stats["input_rows"]).num_rows < stats["input_rows"]


def test_top_k_keeps_the_extremes_across_batches() -> None:
    top = report_data.TopK(3, largest=True)
    top.add(np.array([1.0, 9.0, 5.0]), np.array([0, 1, 2]))
    top.add(np.array([7.0, 2.0, 9.0]), np.array([3, 4, 5]))
    assert top.result() == [1, 5, 3]


def test_cli_rebuilds_the_report(run_output: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run_output, tmp_path / "out")
    (copy / "report.html").unlink()
    result = CliRunner().invoke(app, ["report", str(copy)])
    assert result.exit_code == 0, result.output
    assert (copy / "report.html").exists()
    assert CliRunner().invoke(app, ["report", str(tmp_path / "nothing")]).exit_code == 2


def test_recut_rewrites_the_report(run_output: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(run_output, tmp_path / "out")
    config = pipeline.load_run_config(copy)
    config.threshold = 6.0
    stats = pipeline.recut(copy, config)
    assert "aesthetic ≥ 6" in (copy / "report.html").read_text()
    assert [int(r[1].replace(",", "")) for r in parse(copy / "report.html").tables["funnel"][1:]] == [
        s["rows"] for s in stats["funnel"]]


def test_missing_stats_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stats.json"):
        build_report(tmp_path)


def test_report_renders_in_a_browser(run_output: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    screenshot = tmp_path / "report.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'ud'}",
               f"--screenshot={screenshot}", "--window-size=1280,2000", (run_output / "report.html").as_uri()]
    subprocess.run(command, cwd=tmp_path, capture_output=True, timeout=90, check=False)
    assert screenshot.exists(), "chromium wrote no screenshot"
    pixels = np.asarray(Image.open(screenshot).convert("L"), dtype=np.float64)
    assert pixels.shape == (2000, 1280)
    assert pixels.std() > 10, "the screenshot is blank"


def test_metadata_vs_measured_scatter_needs_model_scores() -> None:
    from curate.report.plots import metadata_vs_measured

    values = {"metadata_aesthetic": [5.0, 6.0, 7.0], "measured_aesthetic": [5.2, 5.9, 6.5],
              "metadata_watermark": [0.1, 0.5, 0.9], "measured_watermark": [0.2, 0.4, 0.95]}
    model = pa.table({**values, "scores_source": ["model"] * 3})
    assert (metadata_vs_measured(model) or "").startswith("data:image/png;base64,")
    assert metadata_vs_measured(model.set_column(4, "scores_source", pa.array(["metadata"] * 3))) is None


# --- safety and CLIP-score parts (curate/report/scores.py) ---

def _served_run(root: Path, rows: list[dict[str, Any]], routes: dict[str, Response], config: Config) -> Path:
    with ImageServer(routes) as server:
        served = [dict(r, URL=server.url(r["URL"])) for r in rows]
        pq.write_table(pa.Table.from_pylist(served), root / "sample.parquet")
        pipeline.run_local([str(root / "sample.parquet")], root / "out", config)
    return root / "out"


@pytest.fixture(scope="module")
def safety_output(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run whose rows carry LAION's punsafe (0 to 0.75), judged without --max-unsafe, then re-cut at 0.5: the rows
    above it were downloaded, so select drops them with their images stored."""
    root = tmp_path_factory.mktemp("report-safety")
    routes, rows = corpus_rows(np.random.default_rng(1))
    for index, row in enumerate(rows):
        row["punsafe"] = 0.05 * (index % 16)
    config = Config(scores="metadata", world_size=2, workers_per_rank=1, allow_private_network=True,
                    min_size=MIN_SIZE, threshold=THRESHOLD, threads=4, timeout=5.0).validate()
    out = _served_run(root, rows, routes, config)
    config.max_unsafe = 0.5
    pipeline.recut(out, config)
    return out


def _thumbnail_detail(uri: str) -> float:
    """How far a thumbnail is from its own 4-px blur: the detail that makes a picture out (JPEG noise counts little)."""
    from PIL import ImageFilter

    image = Image.open(__import__("io").BytesIO(__import__("base64").b64decode(uri.split(",", 1)[1]))).convert("L")
    smooth = np.asarray(image.filter(ImageFilter.GaussianBlur(4)), dtype=np.float64)
    return float(np.abs(np.asarray(image, dtype=np.float64) - smooth).mean())


def test_safety_grid_straddles_the_cut_and_blurs_the_dropped(safety_output: Path) -> None:
    from curate.report import scores as report_scores

    cut = report_scores.cuts({"max_unsafe": 0.5})[0]
    picks = report_scores.cut_picks(safety_output, cut, PER_GRID)
    details = report_data.row_details(safety_output, set(picks["kept"] + picks["dropped"]))
    assert picks["kept"] and picks["dropped"]
    assert all(details[r]["punsafe"] <= 0.5 and details[r]["drop_reason"] is None for r in picks["kept"])
    assert all(details[r]["punsafe"] > 0.5 and details[r]["drop_reason"] == "unsafe" for r in picks["dropped"])
    assert max(details[r]["punsafe"] for r in picks["kept"]) == pytest.approx(0.5)  # the nearest kept come first
    text = (safety_output / "report.html").read_text()
    assert "NSFW probability ≤ 0.5" in text
    section = text[text.index('id="boundary-safety"'): text.index('id="boundary-clip-score"')]
    blurred = re.findall(r'<figure data-blurred="true"[^>]*data-row="(\d+)"><img src="([^"]+)"', section)
    assert {int(row) for row, _ in blurred} == set(picks["dropped"])
    sharp = report_data.thumbnails(safety_output, {int(row) for row, _ in blurred})
    for row, uri in blurred:
        assert _thumbnail_detail(uri) < min(1.0, 0.3 * _thumbnail_detail(sharp[int(row)]))
    assert "--min-clip-score is off" in text


def test_only_rows_above_the_safety_cut_are_blurred(safety_output: Path) -> None:
    from curate.report import scores as report_scores

    text = (safety_output / "report.html").read_text()
    blurred = {int(r) for r in re.findall(r'<figure data-blurred="true"[^>]*data-row="(\d+)"', text)}
    shown = {int(r) for r in re.findall(r'<figure[^>]*data-row="(\d+)"><img', text)}
    details = report_data.row_details(safety_output, shown)
    assert blurred and blurred == {r for r in shown if (details[r].get("punsafe") or 0) > 0.5}
    assert report_scores.blurred_rows({1: {"punsafe": 0.9}, 2: {"punsafe": 0.5}, 3: {}}, 0.5) == {1}
    assert report_scores.blur_cut({"max_unsafe": None}) == report_scores.BLUR_WITHOUT_CUT


def test_score_charts_appear_only_for_scores_present(run_output: Path, safety_output: Path) -> None:
    from curate.report import scores as report_scores

    stats = json.loads((run_output / "stats.json").read_text())
    assert report_scores.charts(report_data.distribution_sample(run_output, stats["input_rows"]), {}) == []
    sample = report_data.distribution_sample(safety_output, stats["input_rows"])
    charts = report_scores.charts(sample, {"max_unsafe": 0.5})
    assert len(charts) == 1 and charts[0].startswith("data:image/png;base64,")


@pytest.fixture(scope="module")
def clip_output(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A run with the tiny models' scores, re-cut at the median clip_score."""
    from curate.models.testing import write_tiny_weights

    root = tmp_path_factory.mktemp("report-clip")
    routes, rows = corpus_rows(np.random.default_rng(2))
    weights = write_tiny_weights(root / "weights")
    config = Config(scores="model", device="cpu", world_size=2, workers_per_rank=1, allow_private_network=True,
                    min_size=MIN_SIZE, threshold=-100.0, max_watermark=1.0, threads=4, timeout=5.0,
                    dedup=["url", "exact"], **weights).validate()
    out = _served_run(root, rows, routes, config)
    scores = pq.read_table(out / "stages" / "score", columns=["clip_score"])["clip_score"].drop_null().to_numpy()
    config.min_clip_score = float(np.median(scores))
    pipeline.recut(out, config)
    return out, config.min_clip_score


def test_clip_score_grid_straddles_the_cut(clip_output: tuple[Path, float]) -> None:
    from curate.report import scores as report_scores

    out, cut = clip_output
    picks = report_scores.cut_picks(out, report_scores.cuts({"min_clip_score": cut})[1], PER_GRID)
    details = report_data.row_details(out, set(picks["kept"] + picks["dropped"]))
    assert picks["kept"] and picks["dropped"]
    assert all(details[r]["clip_score"] >= cut and details[r]["drop_reason"] is None for r in picks["kept"])
    assert all(details[r]["clip_score"] < cut and details[r]["drop_reason"] == "low_clip_score"
               for r in picks["dropped"])
    text = (out / "report.html").read_text()
    section = text[text.index('id="boundary-clip-score"'):]
    section = section[: section.index("<h3", 10)]
    assert {int(r) for r in re.findall(r'data-row="(\d+)"', section)} == set(picks["kept"] + picks["dropped"])
    assert f"CLIP score ≥ {cut:g}" in text and re.search(r"clip -?\d\.\d\d</figcaption>", section)
    stats = json.loads((out / "stats.json").read_text())
    sample = report_data.distribution_sample(out, stats["input_rows"])
    assert len(report_scores.charts(sample, {"min_clip_score": cut})) == 2  # punsafe from the tiny safety model too


def test_constant_model_scores_plot_without_a_numpy_warning():
    """A --scores model run with near-constant scores put `RuntimeWarning: invalid value encountered in divide` on
    the console: np.corrcoef of a constant side divides 0 by 0."""
    import warnings

    from curate.report.plots import metadata_vs_measured, pearson

    sample = pa.table({"metadata_aesthetic": [5.0, 6.0, 7.0], "measured_aesthetic": pa.array([4.5] * 3, pa.float32()),
                       "metadata_watermark": [0.1, 0.2, 0.3], "measured_watermark": [0.2, 0.3, 0.5],
                       "scores_source": ["model"] * 3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metadata_vs_measured(sample) is not None
    assert pearson(np.array([1.0, 2.0]), np.array([3.0, 3.0])) is None and pearson(np.ones(1), np.ones(1)) is None
    assert pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 7.0])) == pytest.approx(0.9934, abs=1e-4)
