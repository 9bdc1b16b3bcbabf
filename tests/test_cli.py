"""The CLI explains itself: defaults and plain switches in --help, the funnel after every re-cut, verify on stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import typer
from typer.testing import CliRunner

from curate.cli import app
from curate.config import default_of, option_fields
from curate.pipeline import run as pipeline

COMMANDS = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]


def _invoke(*arguments: str | Path) -> object:
    return CliRunner().invoke(app, [str(a) for a in arguments], env={"COLUMNS": "200"})


def _help(*command: str) -> str:
    result = _invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)], ids=lambda c: c[0] if c else "curate")
def test_switches_take_no_value_in_help(command):
    assert "<bool>" not in _help(*command)


def test_run_help_shows_the_default_of_every_option():
    text = _help("run")
    for field in option_fields():
        default = default_of(field)
        if default is None:
            continue
        name = field.name.replace("_", "-")
        shown = (",".join(default) if isinstance(default, list) else f"no-{name}" if default is False else
                 name if default is True else default)
        assert f"[default: {shown}]" in text, f"--{name}: no default in `curate run --help`"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_with_a_default_shows_it(command):
    click_command = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    with_default = [p for p in click_command.params
                    if p.param_type_name == "option" and p.default is not None and not p.required
                    and not (p.is_flag and not p.secondary_opts)]
    assert _help(command).count("[default:") >= len(with_default)


def test_options_left_at_their_default_do_not_override_the_config_file(tmp_path, monkeypatch):
    seen = {}

    def stop(inputs, output, settings, progress):
        seen["settings"] = settings
        raise ValueError("stopped before any work")

    monkeypatch.setattr(pipeline, "run_local", stop)
    config = tmp_path / "curate.toml"
    config.write_text("threshold = 6.5\nworld-size = 16\n")
    result = _invoke("run", tmp_path / "in.parquet", "--output", tmp_path / "out", "--config", config,
                     "--world-size", "256")
    assert result.exit_code == 2 and "stopped before any work" in result.output
    assert "Traceback" not in result.output
    assert seen["settings"].threshold == 6.5  # not given: the file's value stands
    assert seen["settings"].world_size == 256  # given, even at the default value: the command line wins


@pytest.fixture
def finished(tmp_path, corpus_factory, config_factory):
    corpus = corpus_factory(60)
    out = tmp_path / "out"
    pipeline.run_local([str(corpus.path)], out, config_factory())
    return out


def _printed_funnel(text: str) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for stage, reason, rows in re.findall(r"│\s*(\w+)\s*│\s*(\w+)\s*│\s*(\d+)\s*│", text):
        counts.setdefault(stage, {})[reason] = int(rows)
    return counts


def test_select_prints_its_funnel_then_verify_finds_the_shards_stale_until_shard(finished):
    result = _invoke("select", finished, "--threshold", "6.0")
    assert result.exit_code == 0, result.output
    headline = re.search(r"select: (\d+) rows in, (\d+) pass, (\d+) dropped", result.stdout)
    assert headline, result.stdout
    rows, passed, dropped = map(int, headline.groups())
    printed = _printed_funnel(result.stdout)
    assert f"curate shard {finished}" in result.stdout

    stale = _invoke("verify", finished)
    assert stale.exit_code == 1
    assert "shards are stale" in stale.stdout and f"run `curate shard {finished}`" in stale.stdout
    assert "stale" not in stale.stderr

    result = _invoke("shard", finished)
    assert result.exit_code == 0, result.output
    stats = json.loads((finished / "stats.json").read_text())
    assert f"{stats['kept']} kept" in result.stdout and _printed_funnel(result.stdout) == stats["dropped_by_stage"]
    remainder = stats["dropped_by_stage"].pop("shard", {}).get("shard_remainder", 0)
    assert printed == stats["dropped_by_stage"] and printed["select"]["low_aesthetic"] > 0
    assert (rows, passed, dropped) == (stats["input_rows"], stats["kept"] + remainder, stats["dropped"] - remainder)

    fresh = _invoke("verify", finished)
    assert fresh.exit_code == 0 and "OK" in fresh.stdout and fresh.stderr == ""


def test_an_earlier_stage_rerun_leaves_select_to_run_again(finished):
    result = _invoke("dedup", finished)
    assert result.exit_code == 0, result.output
    assert "dedup: " in result.stdout and f"`curate select {finished}`, then `curate shard {finished}`" in result.stdout
    stale = _invoke("verify", finished)
    assert stale.exit_code == 1 and f"run `curate select {finished}`" in stale.stdout


def test_retry_prints_its_funnel(finished):
    result = _invoke("retry", finished)
    assert result.exit_code == 0, result.output
    stats = json.loads((finished / "stats.json").read_text())
    assert f"{stats['input_rows']} rows in, {stats['kept']} kept" in result.stdout
    assert _printed_funnel(result.stdout) == stats["dropped_by_stage"]


def test_a_stage_without_its_checkpoint_is_an_error_not_a_traceback(finished):
    for part in (finished / "stages" / "select").glob("part-*.parquet"):
        part.unlink()
    result = _invoke("shard", finished)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(finished / "stages" / "select") in result.output


def test_missing_aesthetic_column_names_the_file(tmp_path, server):
    path = tmp_path / "no-scores.parquet"
    pq.write_table(pa.table({"url": [server.url("/a.jpg")], "caption": ["a"]}), path)
    result = _invoke("run", path, "--output", tmp_path / "out", "--scores", "metadata", "--allow-loopback")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert str(path) in result.output


def test_a_skipped_semantic_dedup_is_said_once_in_the_summary(tmp_path, server, corpus_factory):
    """--dedup semantic with --scores metadata was skipped with only a stats.json entry."""
    corpus = corpus_factory(40)
    result = _invoke("run", corpus.path, "--output", tmp_path / "out", "--allow-loopback", "--world-size", "2",
                     "--workers-per-rank", "1", "--scores", "metadata", "--min-size", "1",
                     "--dedup", "url,exact,semantic")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("--dedup semantic was skipped") == 1, text
    assert "no embeddings (scores from metadata)" in text and "--scores model" in text
    quiet = _invoke("run", corpus.path, "--output", tmp_path / "plain", "--allow-loopback", "--world-size", "2",
                    "--workers-per-rank", "1", "--scores", "metadata", "--min-size", "1", "--dedup", "url,exact")
    assert quiet.exit_code == 0 and "was skipped" not in quiet.output  # not asked for, nothing to say
