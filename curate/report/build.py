"""OUT/report.html: the funnel, the score distributions, images at each threshold, the shard plan, the run's facts.

One self-contained file (charts and thumbnails embedded), built from stats.json, the ledger and the stage
checkpoints with a bounded number of rows and images, so it stays cheap for a 100M-row run.
"""

from __future__ import annotations

import json
import logging
import statistics
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from curate.report import data, html, plots, scores
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.storage.files import Location

log = logging.getLogger(__name__)
PER_GRID = 8  # images per grid
DUPLICATE_GROUPS, COPIES_PER_GROUP = 6, 4


def build_report(output: str | Path | Location) -> Location:
    """Write OUT/report.html from a finished run's files; returns its path."""
    out = storage.location(output)  # a local folder or an fsspec URL (s3://…)
    stats_path = out / "stats.json"
    if not stats_path.exists():
        raise ValueError(f"{out}: no stats.json; run `curate run` (or `curate shard`) on it first")
    stats = json.loads(stats_path.read_text())
    body = [header(out, stats), funnel_section(stats), distributions_section(out, stats),
            grids_section(out, stats), consent_section(out, stats), shard_plan_section(out), facts_section(stats)]
    path = out / "report.html"
    io.write_bytes(html.page(f"curate report: {out.name}", body).encode(), path)
    log.info("report written to %s", path)
    return path


def header(out: Location, stats: dict[str, Any]) -> str:
    config = stats["config"]
    facts = [f"{stats['input_rows']:,} rows in", f"{stats['kept']:,} kept", f"{stats['dropped']:,} dropped",
             f"scores from {stats.get('scores_source')}", f"aesthetic ≥ {config['threshold']:g}",
             f"watermark ≤ {config['max_watermark']:g}", f"shorter side ≥ {config['min_size']} px"]
    facts += [f"{name} {sign} {config[key]:g}" for name, sign, key in (("NSFW probability", "≤", "max_unsafe"),
                                                                      ("CLIP score", "≥", "min_clip_score"))
              if config.get(key) is not None]
    spans = "".join(f"<span>{escape(f)}</span>" for f in facts)
    return f'<h1>curate report</h1><p class="muted">{escape(str(out.resolve()))}</p><p class="facts">{spans}</p>'


def funnel_section(stats: dict[str, Any]) -> str:
    steps = [[s["stage"], s["rows"], s["dropped"]] for s in stats["funnel"]]
    total = max(stats["input_rows"], 1)
    reasons = [[stage, reason, count, f"{100 * count / total:.2f}%"]
               for stage, counts in stats["dropped_by_stage"].items() for reason, count in counts.items()]
    return ('<h2 id="funnel">Funnel</h2>' + html.chart(plots.funnel_chart(stats), "funnel")
            + '<div class="cols">' + html.table(["stage", "rows left", "dropped"], steps, "funnel")
            + html.table(["stage", "reason", "rows", "of input"], reasons, "reasons") + "</div>")


def distributions_section(out: Location, stats: dict[str, Any]) -> str:
    config = stats["config"]
    sample = data.distribution_sample(out, stats["input_rows"])
    if not sample.num_rows:
        return '<h2 id="distributions">Distributions</h2><p class="muted">no rows</p>'
    charts = [
        plots.kept_dropped_histogram(sample, "aesthetic", score_bins(sample, config["threshold"]), config["threshold"],
                                     "aesthetic score", "score (measured where it exists, else metadata)"),
        plots.kept_dropped_histogram(sample, "watermark", np.linspace(0, 1, 41), config["max_watermark"],
                                     "watermark probability", "probability"),
        plots.size_scatter(sample, config["min_size"]),
        plots.caption_histogram(sample),
        *scores.charts(sample, config),
    ]
    compared = plots.metadata_vs_measured(sample)
    note = (f"{sample.num_rows:,} of {stats['input_rows']:,} rows (a fixed sample)"
            if sample.num_rows < stats["input_rows"] else f"all {sample.num_rows:,} rows")
    if compared is None:
        charts_html = "".join(html.chart(c, "distribution") for c in charts)
        compared_html = ('<p class="muted">metadata vs measured scores: no row has both a metadata score and a '
                         f"model score (scores came from {escape(str(stats.get('scores_source')))})</p>")
    else:
        charts_html = "".join(html.chart(c, "distribution") for c in charts + [compared])
        compared_html = ""
    return (f'<h2 id="distributions">Distributions</h2><p class="muted">{escape(note)}; green kept, red dropped, '
            f'dashed lines are the cuts</p><div class="charts">{charts_html}</div>{compared_html}')


def score_bins(sample: Any, threshold: float) -> np.ndarray:
    """40 bins over the scores seen, widened to show the threshold."""
    scores = sample["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float64)
    scores = scores[~np.isnan(scores)]
    low = min(float(np.floor(scores.min())) if len(scores) else 0.0, threshold - 1)
    high = max(float(np.ceil(scores.max())) if len(scores) else 10.0, threshold + 1)
    return np.linspace(low, high, 41)


def grids_section(out: Location, stats: dict[str, Any]) -> str:
    """Every image grid; details and thumbnails are read once, for the chosen rows only."""
    config = stats["config"]
    threshold = config["threshold"]
    per_reason = data.sample_per_reason(out / "ledger.parquet", PER_GRID)
    boundary = data.aesthetic_picks(out, threshold, PER_GRID)
    at_cuts = scores.picks(out, config, PER_GRID)
    groups = data.duplicate_groups(out, per_reason, DUPLICATE_GROUPS, COPIES_PER_GROUP)
    chosen = {r for rows in [*per_reason.values(), *boundary.values()] for r in rows}
    chosen |= {r for sides in at_cuts.values() for rows in sides.values() for r in rows}
    chosen |= {r for survivor, copies in groups for r in [*copies, *([survivor] if survivor is not None else [])]}
    details = data.row_details(out, chosen)
    blurred = scores.blurred_rows(details, scores.blur_cut(config))
    for row in blurred:
        details[row]["blurred"] = True
    thumbs = data.thumbnails(out, chosen, blurred=blurred)
    parts = ['<h2 id="images">Images</h2>',
             f'<h3 id="boundary">At the aesthetic threshold ({threshold:g})</h3><div class="cols">',
             f"<div><p>kept, just above (the lowest-scored kept)</p>{html.grid(boundary['above'], details, thumbs)}"
             "</div>",
             f"<div><p>dropped for their aesthetic score, just below</p>"
             f"{html.grid(boundary['below'], details, thumbs)}</div></div>",
             f'<h3 id="highest">Highest-scored kept</h3>{html.grid(boundary["highest"], details, thumbs)}',
             scores.grids(config, at_cuts, details, thumbs),
             '<h3 id="duplicates">Duplicate groups (survivor first, outlined)</h3>']
    parts += [html.group(s, c, details, thumbs) for s, c in groups] or ['<p class="muted">no duplicates</p>']
    counts = {reason: n for reasons in stats["dropped_by_stage"].values() for reason, n in reasons.items()}
    parts.append('<h3 id="reasons">Dropped, per reason</h3>')
    for reason, rows in per_reason.items():
        parts.append(f'<section class="reason-grid" id="reason-{escape(reason)}" data-reason="{escape(reason)}">'
                     f"<h3>{escape(reason)} <span class=\"muted\">({counts.get(reason, len(rows)):,} rows, "
                     f"{len(rows)} shown)</span></h3>{html.grid(rows, details, thumbs)}</section>")
    return "".join(parts)


def consent_section(out: Location, stats: dict[str, Any]) -> str:
    """Per opt-out signal: the kept samples by outcome (samples.parquet's consent columns) and the rows it dropped."""
    kept = data.consent_counts(out / "samples.parquet")
    dropped = stats["dropped_by_stage"].get("download", {})
    rows = [[signal, value, count, ""] for signal, counts in kept.items() for value, count in counts.items()]
    rows += [[signal, "dropped", dropped[reason], reason] for signal, reason in data.CONSENT_REASONS.items()
             if dropped.get(reason)]
    return ('<h2 id="consent">Consent</h2><p class="muted">Opt-out signals checked per sample (README: Consent); '
            'kept samples by outcome, and rows each signal dropped.</p>'
            + html.table(["signal", "outcome", "rows", "ledger reason"], rows, "consent"))


def shard_plan_section(out: Location) -> str:
    index_path = out / "shards" / "index.json"
    if not index_path.exists():
        return '<h2 id="shards">Shard plan</h2><p class="muted">no shards/index.json</p>'
    index = json.loads(index_path.read_text())
    sizes = [entry["filesize"] for entry in index["shardlist"]] or [0]
    shards = len(index["shardlist"])
    rows = [["shards", shards], ["samples per shard", index["samples_per_shard"]],
            ["bytes per shard (min)", min(sizes)], ["bytes per shard (median)", int(statistics.median(sizes))],
            ["bytes per shard (max)", max(sizes)], ["total bytes", sum(sizes)],
            ["world size", index["world_size"]], ["workers per rank", index["workers_per_rank"]],
            ["shards per rank", shards // max(index["world_size"], 1)],
            ["samples per rank", index["samples_per_rank"]], ["global batch", index["global_batch_size"]],
            ["steps per epoch", index["steps_per_epoch"]], ["seed", index["seed"]]]
    return '<h2 id="shards">Shard plan</h2>' + html.table(["", "value"], rows, "shard-plan")


def facts_section(stats: dict[str, Any]) -> str:
    """Timings and throughput per stage, versions, and the whole configuration."""
    steps = stats["funnel"]
    entering = {step["stage"]: previous["rows"] for previous, step in zip(steps, steps[1:], strict=False)}
    entering["ingest"] = stats["input_rows"]
    timings = []
    for stage, seconds in stats["timings"].items():
        rows = entering.get(stage, stats["input_rows"])
        timings.append([stage, round(seconds, 3), rows, round(rows / seconds, 1) if seconds > 0 else None])
    versions = [[name, version] for name, version in stats["versions"].items()]
    config = [[name, value] for name, value in stats["config"].items()]
    return ('<h2 id="facts">Run facts</h2><div class="cols"><div><h3>Timings</h3>'
            + html.table(["stage", "seconds", "rows in", "rows/s"], timings, "timings")
            + "<h3>Versions</h3>" + html.table(["package", "version"], versions, "versions")
            + "</div><div><h3>Configuration</h3>" + html.table(["option", "value"], config, "config")
            + "</div></div>")
