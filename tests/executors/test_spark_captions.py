"""The caption filters through `curate run` and the Spark job: the same rows dropped for the same reasons, same tars."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from curate.cli import app
from curate.config import load_config
from curate.testing.server import ImageServer, Response
from curate.tools.demo import generated_image, jpeg
from tests.executors.test_spark import OPTIONS, assert_same_dataset, job_flags

HARBOR = ("a wide photograph of a quiet harbor at sunrise with small wooden fishing boats tied to the pier, gulls "
          "circling above the water, nets drying on the rocks, a red lighthouse on the far point, low clouds over the "
          "hills behind the town, and an old man in a yellow coat mending a net by a stack of crates on the dock near "
          "the market while a dog sleeps")  # 77 CLIP tokens with start and end: exactly CLIP's context
# Caption -> the prefilter reason it gets (None: kept) with --min-caption-words 3 --junk-captions --languages en,de
# --max-caption-tokens 77.
CAPTIONS: dict[str, str | None] = {
    "a red barn in a snowy field at dawn": None,
    "a bowl of fresh strawberries on a wooden table": None,
    "two children flying a kite on the beach": None,
    "an old stone bridge over a quiet river": None,
    "a black cat sleeping on a sunny windowsill": None,
    "a vintage car parked on a city street": None,
    "mountains reflected in a calm alpine lake": None,
    "a cup of coffee next to an open book": None,
    "ein roter Traktor steht im Herbst auf dem Feld": None,
    "eine alte Kirche in einem kleinen Dorf am See": None,
    HARBOR: None,
    "une petite maison au bord de la mer en été": "caption_language",
    "un chien qui court dans le jardin avec une balle": "caption_language",
    "un perro grande corriendo en la playa al atardecer": "caption_language",
    "sunset": "short_caption",
    "blue car": "short_caption",
    "IMG_1234.JPG": "junk_caption",  # one word too, but junk is the more specific reason
    "DSC_0042": "junk_caption",
    "holiday photo 2019.png": "junk_caption",
    "https://example.com/photos/beach.jpg": "junk_caption",
    "sale sale sale sale": "junk_caption",
    "dog dog dog v17": "junk_caption",  # one word in 3 of 4
    "黒猫": "short_caption",  # two ideographs: two words
    "一只黑猫在沙发上睡觉": "caption_language",  # ten words, not one: the language check sees it
    HARBOR + " in": "long_caption",
    "a naïve café crème brûlée on a façade terrace, with a résumé and a piñata " * 4: "long_caption",
}
CAPTION_OPTIONS: dict[str, Any] = {**OPTIONS, "world_size": 2, "target_shard_size": 20_000, "min_caption_words": 3,
                                   "junk_captions": True, "languages": "en,de", "max_caption_tokens": 77}


def write_caption_corpus(folder: Path, server: ImageServer) -> list[str]:
    """One served image per caption, in two parquet files; returns the captions in row order."""
    rng = np.random.default_rng(13)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        width, height = int(rng.integers(72, 150)), int(rng.integers(72, 150))
        server.routes[f"/captions/{i}.jpg"] = Response(jpeg(generated_image(rng, width, height)))
        rows.append({"URL": server.url(f"/captions/{i}.jpg"), "TEXT": caption, "WIDTH": float(width),
                     "HEIGHT": float(height), "AESTHETIC_SCORE": 6.5, "pwatermark": 0.1, "punsafe": 0.0})
    folder.mkdir(parents=True)
    half = len(rows) // 2
    pq.write_table(pa.Table.from_pylist(rows[:half]), folder / "part-a.parquet")
    pq.write_table(pa.Table.from_pylist(rows[half:]), folder / "part-b.parquet")
    return list(CAPTIONS)


def test_caption_filters_on_spark_match_curate_run(spark: Any, tmp_path: Path) -> None:
    from curate.executors.spark.engine import run_spark

    with ImageServer() as server:
        captions = write_caption_corpus(tmp_path / "input", server)
        inputs = [str(tmp_path / "input")]
        result = CliRunner().invoke(app, ["run", *inputs, "--output", str(tmp_path / "local"),
                                          *job_flags(CAPTION_OPTIONS)])
        assert result.exit_code == 0, result.output
        config = load_config(None, CAPTION_OPTIONS)  # what `curate run` resolved from those flags
        stats = run_spark(spark, inputs, str(tmp_path / "spark"), config)
    local = pq.read_table(tmp_path / "local" / "ledger.parquet").to_pylist()
    prefiltered = {r["row"]: r["reason"] for r in local if r["stage"] == "prefilter"}
    assert [prefiltered.get(row) for row in range(len(captions))] == list(CAPTIONS.values())
    details = {captions[r["row"]]: r["detail"] for r in local if r["stage"] == "prefilter"}
    assert details[HARBOR + " in"] == "78" and details["IMG_1234.JPG"] == "file_name"
    assert details["une petite maison au bord de la mer en été"].startswith("fr ")
    assert stats["dropped_by_stage"] == json.loads((tmp_path / "local" / "stats.json").read_text())["dropped_by_stage"]
    assert stats["dropped_by_stage"]["prefilter"] == {
        "caption_language": 4, "short_caption": 3, "junk_caption": 6, "long_caption": 2}
    assert_same_dataset(tmp_path / "local", tmp_path / "spark")
