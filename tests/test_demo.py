"""`curate demo` (what `make demo` runs): a served LAION-schema sample through the whole pipeline."""

from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_config


def test_demo_prints_a_summary_and_leaves_verifiable_shards(tmp_path):
    out = tmp_path / "demo-out"
    result = CliRunner().invoke(app, ["demo", "--output", str(out), "--rows", "120"])
    assert result.exit_code == 0, result.output
    assert "rows in" in result.output and "kept" in result.output
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0


def test_config_file_then_command_line(tmp_path):
    path = tmp_path / "curate.toml"
    path.write_text('threshold = 6.5\nworld-size = 16\ndedup = "url,exact"\n')
    config = load_config(path, {"world_size": 32, "threshold": None})
    assert config.threshold == 6.5 and config.world_size == 32 and config.dedup == ["url", "exact"]


def test_unknown_config_key_is_named(tmp_path):
    import pytest

    path = tmp_path / "curate.toml"
    path.write_text("treshold = 6.5\n")
    with pytest.raises(ValueError, match="unknown key 'treshold'"):
        load_config(path, {})


def test_fsspec_url_inputs(tmp_path, corpus_factory, config_factory):
    from curate.pipeline.run import run_local

    corpus = corpus_factory(30)
    stats = run_local([f"file://{corpus.path}"], tmp_path / "out", config_factory(world_size=2, workers_per_rank=1))
    assert stats["input_rows"] == len(corpus.rows)
