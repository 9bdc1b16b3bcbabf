"""Recipes by name: presets between the defaults and the config file / command line; `curate run --recipe sdxl`."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.config import Config, load_config
from curate.pipeline.recipes import DEFAULT_RECIPE, RECIPES
from curate.stages.verdict import above, below


def test_the_default_recipe_is_the_defaults():
    assert Config().recipe == DEFAULT_RECIPE
    assert load_config(None, {}) == Config()
    for name, value in RECIPES[DEFAULT_RECIPE].values.items():
        assert getattr(Config(), name) == value


def test_sd_v1_strict_rules_in_our_inclusive_ones():
    config = load_config(None, {"recipe": "sd-v1-improved-aesthetics"})
    for dtype in (pa.float32(), pa.float64()):  # aesthetic > 5.0: 5.0 is dropped, the next float32 kept
        scores = pa.array([5.0, float(np.nextafter(np.float32(5.0), np.float32(6))), 5.01], dtype)
        assert below(scores, config.threshold).to_pylist() == [True, False, False]
        marks = pa.array([0.5, float(np.nextafter(np.float32(0.5), np.float32(0))), 0.49], dtype)  # watermark < 0.5
        assert above(marks, config.max_watermark).to_pylist() == [True, False, False]
    assert config.min_size == 512
    # a float64 column compares exactly: 5.0000001 is > 5.0 and 0.4999999 < 0.5 (the float32 rule dropped them)
    assert below(pa.array([5.0000001, 5.0], pa.float64()), config.threshold).to_pylist() == [False, True]
    assert above(pa.array([0.4999999, 0.5], pa.float64()), config.max_watermark).to_pylist() == [False, True]


def test_the_strict_recipe_keeps_a_float64_score_just_over_five_in_prefilter_and_select():
    from curate.stages.ingest import normalize
    from curate.stages.prefilter import prefilter
    from curate.stages.select import scores_from_metadata, select
    from curate.stages.verdict import alive, with_verdict_columns

    config = load_config(None, {"recipe": "sd-v1-improved-aesthetics", "scores": "metadata"})
    scores, marks = [5.0000001, 5.0, 6.0, 6.0], [0.1, 0.1, 0.4999999, 0.5]
    table = normalize(pa.table({"URL": [f"http://example.com/{i}.jpg" for i in range(4)],
                                "TEXT": [f"a caption {i}" for i in range(4)], "WIDTH": [1024.0] * 4,
                                "HEIGHT": [1024.0] * 4, "AESTHETIC_SCORE": pa.array(scores, pa.float64()),
                                "pwatermark": pa.array(marks, pa.float64())}), 0)
    judged = prefilter(table, None, config.min_size, config.max_watermark, None, config.threshold)
    assert judged["drop_reason"].to_pylist() == [None, "metadata_low_aesthetic", None, "metadata_watermark"]
    size = pa.array([1024] * 4, pa.int32())
    scored = with_verdict_columns(scores_from_metadata(table).append_column("original_width", size)
                                  .append_column("original_height", size))
    picked = select(scored, config.min_size, config.threshold, config.max_watermark)
    assert alive(picked).to_pylist() == [True, False, True, False]  # the float32 score copy would drop row 0


def test_given_options_override_the_preset(tmp_path):
    sdxl = load_config(None, {"recipe": "sdxl"})
    assert (sdxl.image_size, sdxl.resize_mode, sdxl.buckets, sdxl.max_unsafe) == (1024, "bucket", 1024, 0.1)
    assert sdxl.min_caption_words == 3 and sdxl.junk_captions
    assert load_config(None, {"recipe": "sdxl", "image_size": 512, "max_unsafe": None}).image_size == 512
    path = tmp_path / "curate.toml"
    path.write_text('recipe = "sdxl"\nresize-mode = "keep_ratio"\nlanguages = "en"\n')
    from_file = load_config(path, {"min_caption_words": 5})
    assert (from_file.recipe, from_file.resize_mode, from_file.buckets) == ("sdxl", "keep_ratio", 1024)
    assert from_file.min_caption_words == 5 and from_file.languages == ["en"]
    cli_recipe = load_config(path, {"recipe": "sd-v1-improved-aesthetics"})  # the command line's recipe wins
    assert cli_recipe.image_size == Config().image_size and cli_recipe.resize_mode == "keep_ratio"


def test_bad_recipe_and_caption_options_are_named():
    with pytest.raises(ValueError, match="--recipe: 'sdx' is not a recipe; choose from"):
        load_config(None, {"recipe": "sdx"})
    with pytest.raises(ValueError, match="--languages: 'english'"):
        load_config(None, {"languages": "en,english"})
    with pytest.raises(ValueError, match="--max-caption-tokens"):
        load_config(None, {"max_caption_tokens": 2})
    with pytest.raises(ValueError, match="--min-caption-words"):
        load_config(None, {"min_caption_words": -1})


def test_curate_run_recipe_sdxl_on_the_demo_corpus(tmp_path):
    from curate.cli import app
    from curate.testing.server import ImageServer
    from curate.tools.demo import sample_rows, write_sample

    routes, rows = sample_rows(40)
    passing = {"punsafe": 0.0, "pwatermark": 0.0, "AESTHETIC_SCORE": 7.0, "WIDTH": 1024.0, "HEIGHT": 1024.0}
    rows = rows[:40] + [dict(rows[i], URL=f"/img/{i:05d}.jpg?junk", TEXT=text, **passing)
                        for i, text in enumerate(["IMG_1234.JPG", "https://example.com/a.jpg", "cat"])]
    with ImageServer(routes) as server:
        sample = tmp_path / "sample.parquet"
        write_sample(sample, rows, server)
        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["run", str(sample), "--output", str(out), "--recipe", "sdxl", "--scores",
                                          "metadata", "--world-size", "2", "--workers-per-rank", "1",
                                          "--allow-loopback", "--max-unsafe", "0.3", "--processes", "1"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    config = stats["config"]
    assert config["recipe"] == "sdxl" and config["resize_mode"] == "bucket" and config["image_size"] == 1024
    assert config["max_unsafe"] == 0.3  # given on the command line: wins over the preset's 0.1
    assert stats["judged_by"]["prefilter"]["junk_captions"] is True
    ledger = pq.read_table(out / "ledger.parquet").to_pylist()
    reasons = {row["url"].rsplit("/", 1)[-1]: row["reason"] for row in ledger}
    assert reasons["00000.jpg?junk"] == "junk_caption" and reasons["00001.jpg?junk"] == "junk_caption"
    assert reasons["00002.jpg?junk"] == "short_caption"
    punsafe = {row["URL"].rsplit("/", 1)[-1]: row["punsafe"] for row in rows}
    assert all(reason == "metadata_unsafe" for name, reason in reasons.items() if punsafe[name] > 0.3)
    samples = pq.read_table(out / "samples.parquet")
    assert samples.num_rows > 0 and max(pa.compute.max(samples["punsafe"]).as_py(), 0) <= 0.3
