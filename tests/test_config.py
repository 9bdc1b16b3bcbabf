"""Every option is checked when the config is built: exit 2, the option and what it accepts, before any request."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.config import Config, load_config

BAD_OPTIONS = [
    (["--threshold", "nan"], "--threshold must be a finite number"),
    (["--threshold", "inf"], "--threshold must be a finite number"),
    (["--max-watermark", "1.5"], "--max-watermark must be a finite number in [0, 1]"),
    (["--max-unsafe", "-0.1"], "--max-unsafe must be a finite number in [0, 1]"),
    (["--timeout", "0"], "--timeout must be a finite number in more than 0"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["--batch-size-rows", "0"], "--batch-size-rows must be at least 1"),
    (["--resize-mode", "bogus"], "--resize-mode: 'bogus' is not allowed; choose from keep_ratio"),
    (["--scores", "magic"], "--scores: 'magic' is not allowed; choose from model, metadata, auto"),
    (["--dedup", "url,fuzzy"], "--dedup: 'fuzzy' is not allowed"),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
    (["--shard-name", "../x"], "--shard-name '../x'"),
    (["--min-size", "-1"], "--min-size must be 0 or more"),
    (["--buckets", "100"], "--buckets must be a multiple of 64 between 64 and 4096"),  # was 3 tiny buckets
    (["--buckets", "8192"], "--buckets must be a multiple of 64 between 64 and 4096"),
]


@pytest.mark.parametrize(("arguments", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_stops_the_run_before_any_request(tmp_path, server, corpus_factory, arguments, message):
    corpus = corpus_factory(12)
    before = len(server.requests)
    result = CliRunner().invoke(app, ["run", str(corpus.path), "--output", str(tmp_path / "out"), "--allow-loopback",
                                      "--world-size", "2", "--workers-per-rank", "1", *arguments])
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert message in text
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert len(server.requests) == before and not (tmp_path / "out" / "stages").exists()


@pytest.mark.parametrize(("toml", "message"), [
    ('threshold = "high"', "--threshold (`threshold` in a config file) must be a number, got 'high'"),
    ("world-size = 2.5", "--world-size (`world-size` in a config file) must be an integer, got 2.5"),
    ("allow-loopback = 1", "must be true or false, got 1"),
    ("dedup = [1, 2]", "must be a comma list of strings"),
])
def test_a_config_file_of_the_wrong_types_is_refused_naming_the_key(tmp_path, toml, message):
    path = tmp_path / "curate.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ValueError) as caught:
        load_config(path, {})
    assert message in str(caught.value)


def test_good_values_pass_and_off_options_may_be_none():
    config = load_config(None, {"threshold": 6, "max_unsafe": None, "device": "cuda:1", "dedup": "url,exact"})
    assert config.threshold == 6 and config.dedup == ["url", "exact"] and math.isfinite(config.timeout)
    assert Config().validate() == Config()
