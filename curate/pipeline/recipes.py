"""Recipes by name: published filtering rules as presets of the run options (`--recipe NAME`).

A preset sits between the defaults and the config file: any option the config file or the command line gives wins
over it (curate.config.load_config). Each preset names its source; the README's recipe table repeats them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Our rules are `keep aesthetic >= threshold` and `drop watermark > max_watermark`, comparing each score as its column
# stores it (curate.stages.verdict.as_stored: a float32 as its shortest text, a float64 exactly). A published strict
# rule is the nearest float64 on the right side of its value: "> 5.0" keeps a float64 5.0000001 and a float32
# 5.0000005, and drops 5.0 in either; "< 0.5" likewise.
JUST_ABOVE_5 = float(np.nextafter(5.0, np.inf))
JUST_BELOW_HALF = float(np.nextafter(0.5, 0.0))


@dataclass(frozen=True)
class Recipe:
    name: str
    values: dict[str, Any]  # Config field -> value; every other option keeps its default
    source: str


RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in (
    Recipe("laion-aesthetics-v2-5plus", {"threshold": 5.0, "max_watermark": 0.8, "min_size": 512},
           "LAION-Aesthetics v2 5+ (laion.ai/blog/laion-aesthetics), the set Stable Diffusion v1 trained on; "
           "the seed recipe and the defaults"),
    Recipe("sd-v1-improved-aesthetics", {"threshold": JUST_ABOVE_5, "max_watermark": JUST_BELOW_HALF, "min_size": 512},
           "Stable Diffusion v1.2 model card: laion-improved-aesthetics, original size >= 512x512, estimated "
           "aesthetics score > 5.0, estimated watermark probability < 0.5"),
    Recipe("sdxl", {"image_size": 1024, "resize_mode": "bucket", "buckets": 1024, "max_unsafe": 0.1,
                    "min_caption_words": 3, "junk_captions": True},
           "SDXL report (Podell et al. 2023, sec. 2.2-2.3): ~1024^2 multi-aspect buckets, size conditioning instead "
           "of discarding small images; it publishes no filter thresholds, so the safety cut is the SD 2.0 model "
           "card's (punsafe 0.1) and the caption cut DataComp's basic filter (more than 2 words)"),
)}
DEFAULT_RECIPE = "laion-aesthetics-v2-5plus"


def recipe_values(name: str) -> dict[str, Any]:
    """The options a recipe sets; raises naming --recipe and the known names when there is no such recipe."""
    if name not in RECIPES:
        raise ValueError(f"--recipe: {name!r} is not a recipe; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name].values)
