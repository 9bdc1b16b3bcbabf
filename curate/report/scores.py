"""The report's safety and CLIP-score parts: their distributions with the cuts, and the images either side of each cut.

Thumbnails whose NSFW probability is above the safety cut (--max-unsafe, else BLUR_WITHOUT_CUT) are blurred wherever
the report shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.report import data, html, plots
from curate.schema import CLIP_SCORE, DROP_REASON, PUNSAFE, ROW
from curate.stages.verdict import above
from curate.storage.files import Location

# Without --max-unsafe there is no cut, but an image the detector finds more likely unsafe than not is still blurred.
BLUR_WITHOUT_CUT = 0.5
DATACOMP_FRACTION = 0.3  # DataComp's L/14 CLIP-score baseline keeps the top 30 % of its pool


@dataclass(frozen=True)
class Cut:
    """One threshold on a score column: rows on the `drops` side of `value` leave with one of `reasons`."""

    column: str
    title: str
    option: str
    value: float | None
    drops: str  # "above" or "below"
    reasons: tuple[str, ...]
    anchor: str


def cuts(config: dict[str, Any]) -> list[Cut]:
    """The safety and CLIP-score cuts of a run's configuration (value None where the option is off)."""
    return [
        Cut(PUNSAFE, "NSFW probability (punsafe)", "--max-unsafe", config.get("max_unsafe"), "above",
            ("unsafe", "metadata_unsafe"), "safety"),
        Cut(CLIP_SCORE, "CLIP score (ViT-L/14 image–caption cosine)", "--min-clip-score", config.get("min_clip_score"),
            "below", ("low_clip_score",), "clip-score"),
    ]


def blur_cut(config: dict[str, Any]) -> float:
    value = config.get("max_unsafe")
    return BLUR_WITHOUT_CUT if value is None else float(value)


def blurred_rows(details: dict[int, dict[str, Any]], cut: float) -> set[int]:
    """Rows whose punsafe is above the cut (the same float32 rule select applies)."""
    rows = [row for row, detail in details.items() if detail.get(PUNSAFE) is not None]
    if not rows:
        return set()
    hits = above(pa.array([details[row][PUNSAFE] for row in rows], pa.float64()), cut).to_pylist()
    return {row for row, hit in zip(rows, hits, strict=True) if hit}


def _values(sample: pa.Table, column: str) -> np.ndarray:
    if column not in sample.column_names:
        return np.empty(0)
    values = sample[column].to_numpy(zero_copy_only=False).astype(np.float64)
    return values[~np.isnan(values)]


def charts(sample: pa.Table, config: dict[str, Any]) -> list[str]:
    """A kept/dropped histogram per cut column that has values in the sample, with its cut."""
    out = []
    for cut in cuts(config):
        values = _values(sample, cut.column)
        if not len(values):
            continue
        if cut.column == PUNSAFE:
            out.append(plots.kept_dropped_histogram(sample, cut.column, np.linspace(0, 1, 41), cut.value, cut.title,
                                                    "probability (rows on a log scale)", log_rows=True))
            continue
        edges = [float(values.min()), float(values.max()), *([cut.value] if cut.value is not None else [])]
        bins = np.linspace(min(edges) - 0.02, max(edges) + 0.02, 41)
        top = float(np.quantile(values, 1 - DATACOMP_FRACTION))
        out.append(plots.kept_dropped_histogram(sample, cut.column, bins, cut.value, cut.title, "cosine",
                                                marks=[(top, f"top {DATACOMP_FRACTION:.0%} from {top:.3f}")]))
    return out


def cut_picks(out: Location, cut: Cut, k: int) -> dict[str, list[int]]:
    """The k kept rows nearest the cut on its kept side, and the k rows it dropped nearest it on the other."""
    assert cut.value is not None
    upper = cut.drops == "above"
    kept_side, dropped_side = data.TopK(k, largest=upper), data.TopK(k, largest=not upper)
    for table in data.iter_columns(data.row_parts(out), [ROW, DROP_REASON, cut.column]):
        if cut.column not in table.column_names:
            continue
        values = data.coalesce(table, cut.column, cut.column).to_numpy(zero_copy_only=False)
        rows, reasons = table[ROW].to_numpy(), table[DROP_REASON]
        known = ~np.isnan(values)
        kept = pc.is_null(reasons).to_numpy(zero_copy_only=False) & known
        dropped = pc.is_in(reasons, pa.array(cut.reasons)).to_numpy(zero_copy_only=False) & known
        kept_side.add(values[kept], rows[kept])
        dropped_side.add(values[dropped], rows[dropped])
    return {"kept": kept_side.result(), "dropped": dropped_side.result()}


def picks(out: Location, config: dict[str, Any], k: int) -> dict[str, dict[str, list[int]]]:
    """cut_picks of every cut that is set, by its anchor."""
    return {cut.anchor: cut_picks(out, cut, k) for cut in cuts(config) if cut.value is not None}


def grids(config: dict[str, Any], chosen: dict[str, dict[str, list[int]]], details: dict[int, dict[str, Any]],
          thumbs: dict[int, str]) -> str:
    """The boundary grids of the safety and CLIP-score cuts; a line saying so where a cut is off."""
    parts = []
    for cut in cuts(config):
        if cut.value is None:
            parts.append(f'<h3 id="boundary-{cut.anchor}">At the {escape(cut.title)} cut</h3><p class="muted">'
                         f"no cut: {escape(cut.option)} is off</p>")
            continue
        rows = chosen.get(cut.anchor, {"kept": [], "dropped": []})
        sign, other = ("≤", "above") if cut.drops == "above" else ("≥", "below")
        blurred = " (blurred)" if cut.column == PUNSAFE else ""
        parts.append(f'<h3 id="boundary-{cut.anchor}">At the {escape(cut.title)} cut ({escape(cut.option)} '
                     f'{cut.value:g})</h3><div class="cols">'
                     f"<div><p>kept, just {sign} the cut</p>{html.grid(rows['kept'], details, thumbs)}</div>"
                     f"<div><p>dropped, just {other} it{blurred}</p>{html.grid(rows['dropped'], details, thumbs)}"
                     "</div></div>")
    return "".join(parts)
