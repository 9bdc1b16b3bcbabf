"""The report's charts: matplotlib figures rendered to embedded PNG data URIs (no pyplot, no display)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.figure import Figure

KEPT, DROPPED, LINE = "#2b8a3e", "#c92a2a", "#1c1c1c"


def figure_uri(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _axes(width: float = 6.0, height: float = 3.4) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height))
    return figure, figure.add_subplot()


def funnel_chart(stats: dict[str, Any]) -> str:
    """Rows left after each stage, and the drops per reason, side by side."""
    figure = Figure(figsize=(11, 3.8))
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.3]})
    steps = stats["funnel"]
    left.barh([s["stage"] for s in steps][::-1], [s["rows"] for s in steps][::-1], color=KEPT)
    for index, step in enumerate(steps[::-1]):
        left.text(step["rows"], index, f" {step['rows']:,}", va="center", fontsize=8)
    left.set_title("rows left after each stage")
    left.set_xlim(0, max(stats["input_rows"], 1) * 1.2)
    labels, counts = [], []
    for stage, reasons in stats["dropped_by_stage"].items():
        for reason, count in reasons.items():
            labels.append(f"{stage}: {reason}")
            counts.append(count)
    right.barh(labels[::-1] or ["(nothing dropped)"], counts[::-1] or [0], color=DROPPED)
    right.set_title("rows dropped, per reason")
    right.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    return figure_uri(figure)


def _values(sample: pa.Table, column: str, mask: Any = None) -> np.ndarray:
    values = sample.filter(mask) if mask is not None else sample
    array = values[column].to_numpy(zero_copy_only=False).astype(np.float64)
    return array[~np.isnan(array)]


def kept_dropped_histogram(sample: pa.Table, column: str, bins: np.ndarray, cut: float | None,
                           title: str, xlabel: str, log_rows: bool = False,
                           marks: Sequence[tuple[float, str]] = ()) -> str:
    """Kept and dropped rows stacked, with the threshold as a vertical line (and marks as dotted ones)."""
    figure, axes = _axes()
    kept = _values(sample, column, sample["kept"])
    dropped = _values(sample, column, pc.invert(sample["kept"]))
    axes.hist([np.clip(kept, bins[0], bins[-1]), np.clip(dropped, bins[0], bins[-1])], bins=bins, stacked=True,
              color=[KEPT, DROPPED], label=["kept", "dropped"])
    if cut is not None:
        axes.axvline(cut, color=LINE, linestyle="--", label=f"cut {cut:g}")
    for value, label in marks:
        axes.axvline(value, color="#868e96", linestyle=":", label=label)
    if log_rows:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("rows")
    axes.legend(fontsize=8)
    return figure_uri(figure)


def size_scatter(sample: pa.Table, min_size: int) -> str:
    """Original width × height on log axes, with the minimum-size lines."""
    figure, axes = _axes(6.0, 4.2)
    for mask, color, label in ((pc.invert(sample["kept"]), DROPPED, "dropped"), (sample["kept"], KEPT, "kept")):
        part = sample.filter(mask)
        width, height = (part[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in ("width", "height"))
        ok = (width > 0) & (height > 0)
        axes.scatter(width[ok], height[ok], s=14, alpha=0.6, color=color, label=label, linewidths=0)
    axes.axvline(min_size, color=LINE, linestyle="--", linewidth=1)
    axes.axhline(min_size, color=LINE, linestyle="--", linewidth=1, label=f"min size {min_size}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("original width (px)")
    axes.set_ylabel("original height (px)")
    axes.set_title("original size")
    axes.legend(fontsize=8)
    return figure_uri(figure)


def caption_histogram(sample: pa.Table) -> str:
    figure, axes = _axes()
    lengths = _values(sample, "caption_length")
    top = max(50.0, float(np.percentile(lengths, 99)) if len(lengths) else 50.0)
    axes.hist(np.clip(lengths, 0, top), bins=40, color="#1971c2")
    axes.set_title("caption length")
    axes.set_xlabel("characters (clipped at the 99th percentile)")
    axes.set_ylabel("rows")
    return figure_uri(figure)


def measured_pairs(sample: pa.Table, metadata: str, measured: str) -> tuple[np.ndarray, np.ndarray]:
    """(metadata, measured) where both exist and the measured value came from a model."""
    if "scores_source" not in sample.column_names:
        return np.empty(0), np.empty(0)
    model = pc.fill_null(pc.equal(sample["scores_source"], "model"), False)
    both = sample.filter(model)
    x, y = (both[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in (metadata, measured))
    ok = ~np.isnan(x) & ~np.isnan(y)
    return x[ok], y[ok]


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, None where it is undefined: fewer than 2 points, or either side constant (as a tiny or untrained
    model's scores are; np.corrcoef then divides 0 by 0 and warns)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def metadata_vs_measured(sample: pa.Table) -> str | None:
    """Metadata score against the model's, aesthetic and watermark; None when no row has both."""
    pairs = [measured_pairs(sample, "metadata_aesthetic", "measured_aesthetic"),
             measured_pairs(sample, "metadata_watermark", "measured_watermark")]
    if not any(len(x) for x, _ in pairs):
        return None
    figure = Figure(figsize=(10, 4))
    for axes, (x, y), name in zip(figure.subplots(1, 2), pairs, ("aesthetic score", "watermark probability"),
                                  strict=True):
        axes.scatter(x, y, s=6, alpha=0.5, linewidths=0)
        if len(x):
            low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            axes.plot([low, high], [low, high], color=LINE, linewidth=1, linestyle="--")
            correlation = pearson(x, y)
            r = "undefined: constant scores" if correlation is None else f"{correlation:.2f}"
            axes.set_title(f"{name}: metadata vs measured (r = {r}, n = {len(x):,})")
        axes.set_xlabel("metadata")
        axes.set_ylabel("measured")
    figure.tight_layout()
    return figure_uri(figure)
