"""The README tells the truth: its demo output is what `curate demo` prints, and its reader snippet runs cleanly."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_BLOCK_AFTER = "prints the funnel when it ends"
HOW_TO_UPDATE = ("README.md's demo output is stale: run `make demo` (or `curate demo --output demo-out`) and paste "
                 f"what it prints into the code block after '{DEMO_BLOCK_AFTER}'")


def readme_block(after: str, language: str = "") -> str:
    """The first fenced code block (of the given language) after the line that contains `after`."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"^```{language}\n(.*?)^```", re.M | re.S).search(text, start)
    assert match, f"README.md: no ```{language} block after {after!r}"
    return match.group(1)


def summary_numbers(text: str) -> dict:
    """The numbers a funnel summary prints: rows in, kept, dropped, per stage and reason, shards N x M."""
    headline = re.search(r"curate:\s*(\d+)\s+rows in,\s*(\d+)\s+kept,\s*(\d+)\s+dropped", text)
    shards = re.search(r"shards:\s*(\d+)\s*x\s*(\d+)\s+samples", text)
    assert headline and shards, f"no curate summary in:\n{text}"
    reasons: dict[str, dict[str, int]] = {}
    for stage, reason, rows in re.findall(r"│\s*(\w+)\s*│\s*(\w+)\s*│\s*(\d+)\s*│", text):
        reasons.setdefault(stage, {})[reason] = int(rows)
    rows_in, kept, dropped = map(int, headline.groups())
    return {"input_rows": rows_in, "kept": kept, "dropped": dropped, "dropped_by_stage": reasons,
            "shards": tuple(map(int, shards.groups()))}


def stats_numbers(stats: dict) -> dict:
    return {"input_rows": stats["input_rows"], "kept": stats["kept"], "dropped": stats["dropped"],
            "dropped_by_stage": stats["dropped_by_stage"],
            "shards": (stats["shards"]["num_shards"], stats["shards"]["samples_per_shard"])}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """`curate demo` with its defaults, as the README shows it: (output folder, what it printed)."""
    out = tmp_path_factory.mktemp("readme") / "demo-out"
    result = CliRunner().invoke(app, ["demo", "--output", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_the_readme_demo_output_is_what_the_demo_prints(demo):
    out, printed = demo
    stats = json.loads((out / "stats.json").read_text())
    assert summary_numbers(printed) == stats_numbers(stats)  # the parser reads what the demo prints
    assert summary_numbers(readme_block(DEMO_BLOCK_AFTER)) == stats_numbers(stats), HOW_TO_UPDATE


def test_the_readme_reader_snippet_runs_without_warnings(demo, tmp_path, monkeypatch):
    out, _ = demo
    snippet = readme_block("Reading them back", "python")
    assert '"out/shards/*.tar"' in snippet, "the test points the snippet's out/ at a curated output"
    (tmp_path / "out").symlink_to(out)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # webdataset leaves closing its tar files to the garbage collector: nothing the snippet can change
        warnings.filterwarnings("ignore", category=ResourceWarning)
        exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        samples = list(namespace["dataset"])
    kept = json.loads((out / "stats.json").read_text())["kept"]
    assert len(samples) == kept
    image, caption, meta = samples[0]
    assert image.size[0] > 0 and isinstance(caption, str) and meta["caption"] == caption
