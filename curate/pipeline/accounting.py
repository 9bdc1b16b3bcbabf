"""The run's books: ledger, samples, stats.json, and the check that every input row is accounted for."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.pipeline.steps import STAGE_NAMES
from curate.schema import (
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    EMBEDDING,
    JPG,
    KEY,
    ROW,
    SHARD,
    STATUS,
    URL,
    table_schema,
)


class AccountingError(RuntimeError):
    pass


class NothingKept(ValueError):
    """Every input row was dropped: the books and the report were written and say why."""


def check_kept(stats: dict[str, Any], report: Any) -> None:
    if stats["kept"] == 0:
        raise NothingKept(f"no sample was kept: all {stats['input_rows']} input rows were dropped. The ledger, "
                          f"stats.json and the report say why: {report}")


# The columns ledger_table reads.
LEDGER_SOURCE = [KEY, ROW, URL, DROP_STAGE, DROP_REASON, DROP_DETAIL]


def ledger_table(table: pa.Table) -> pa.Table:
    """One row per dropped input row: key, row, url, stage, reason, detail."""
    dropped = table.filter(pc.is_valid(table[DROP_REASON]))
    columns = {KEY: dropped[KEY], ROW: dropped[ROW], URL: dropped[URL], "stage": dropped[DROP_STAGE],
               "reason": dropped[DROP_REASON], "detail": dropped[DROP_DETAIL]}
    return pa.table(columns).cast(table_schema("ledger")).sort_by(ROW)


def samples_table(table: pa.Table) -> pa.Table:
    """One row per kept sample, the samples schema's columns first, then the metadata carried through."""
    kept = table.filter(pc.and_(pc.is_null(table[DROP_REASON]), pc.greater_equal(table[SHARD], 0)))
    schema = table_schema("samples")
    # A column an older checkpoint lacks (the consent record, faces_blurred, caption_repair) is null, not an error.
    first = [kept[f.name].cast(f.type) if f.name in kept.column_names else pa.nulls(kept.num_rows, f.type)
             for f in schema]
    skip = set(schema.names) | {DROP_STAGE, DROP_REASON, DROP_DETAIL, JPG, EMBEDDING, STATUS, "error"}
    rest = [name for name in kept.column_names if name not in skip]
    return pa.table(first + [kept[name] for name in rest], names=schema.names + rest).sort_by(
        [(SHARD, "ascending"), ("position", "ascending")])


def check_rows(low: int, high: int, rows: np.ndarray) -> None:
    """The kept and dropped row numbers of one input range are exactly low … high - 1, each once."""
    rows = np.sort(rows)
    if len(rows) != high - low or not np.array_equal(rows, np.arange(low, high)):
        missing = np.setdiff1d(np.arange(low, high), rows)[:10].tolist()
        repeated = rows[1:][rows[1:] == rows[:-1]][:10].tolist()
        raise AccountingError(f"accounting failed for input rows {low}-{high - 1}: {len(rows)} accounted for; "
                              f"first missing rows: {missing}; first rows counted twice: {repeated}")


def drop_counts(ledger: pa.Table, into: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """{stage: {reason: count}} in pipeline order, added to `into` (the counts of earlier ledger pieces)."""
    found = [(row["stage"], row["reason"], row[f"{KEY}_count"])
             for row in ledger.group_by(["stage", "reason"]).aggregate([(KEY, "count")]).to_pylist()]
    return merged_counts(found, into)


def merged_counts(found: list[tuple[str, str, int]],
                  into: dict[str, dict[str, int]] | None = None) -> dict[str, dict[str, int]]:
    """The books' {stage: {reason: count}} from (stage, reason, count) triples, however an executor counted them
    (the local one per ledger piece, Spark in one aggregation): stages in pipeline order, reasons sorted."""
    counts: dict[str, dict[str, int]] = {stage: dict(reasons) for stage, reasons in (into or {}).items()}
    for stage, reason, count in found:
        reasons = counts.setdefault(stage, {})
        reasons[reason] = reasons.get(reason, 0) + count
    return {stage: dict(sorted(counts[stage].items())) for stage in sorted(counts, key=_rank(STAGE_NAMES))}


def _rank(order: list[str]) -> Any:
    return lambda stage: order.index(stage) if stage in order else len(order)


def check_totals(input_rows: int, kept: int, dropped: int, distinct: int | None = None, low: int | None = None,
                 high: int | None = None) -> None:
    """input rows = kept + dropped (and, where the executor counted them, as many distinct row numbers, from 0 to
    input_rows - 1): the one check both executors' books pass, from the counts each supplies."""
    complete = kept + dropped == input_rows and (distinct is None or distinct == input_rows) and (
        input_rows == 0 or low is None or (low == 0 and high == input_rows - 1))
    if not complete:
        seen = "" if distinct is None else f" ({distinct} distinct row numbers from {low} to {high})"
        raise AccountingError(f"accounting failed: {input_rows} input rows, {kept} kept + {dropped} dropped = "
                              f"{kept + dropped}{seen}")


def funnel(input_rows: int, counts: dict[str, dict[str, int]], names: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows remaining after each stage (`names`: the run's enabled steps; every step by default)."""
    remaining, steps = input_rows, [{"stage": "input", "rows": input_rows, "dropped": 0}]
    names = STAGE_NAMES if names is None else names
    for stage in [name for name in names if name != "ingest" or name in counts]:  # ingest: broken tars only
        dropped = sum(counts.get(stage, {}).values())
        remaining -= dropped
        steps.append({"stage": stage, "rows": remaining, "dropped": dropped})
    return steps


def stats_document(*, input_rows: int, kept: int, counts: dict[str, dict[str, int]], judged_by: dict[str, Any],
                   not_reconsidered: dict[str, int], scores: str | None, dedup: dict[str, Any],
                   shards: dict[str, Any], timings: dict[str, float], config: dict[str, Any],
                   engine: str) -> dict[str, Any]:
    """stats.json, one shape for both engines. judged_by: the thresholds each row was judged by (prefilter's on the
    metadata before the download, select's after); not_reconsidered: rows prefilter dropped on metadata that select's
    thresholds would keep (a re-cut does not bring them back)."""
    dropped = sum(sum(reasons.values()) for reasons in counts.values())
    return {
        "input_rows": input_rows, "kept": kept, "dropped": dropped, "judged_by": judged_by,
        "not_reconsidered": not_reconsidered, "dropped_by_stage": counts,
        "funnel": funnel(input_rows, counts, enabled_names(config)),
        "scores_source": scores, "dedup": dedup,
        "shards": {name: shards.get(name) for name in ("num_shards", "samples_per_shard", "remainder", "seconds")},
        "timings": timings, "config": config, "versions": versions(), "engine": engine,
    }


def enabled_names(config: dict[str, Any]) -> list[str]:
    """The names of the steps a run with these settings has (stats.json's config)."""
    from curate.config import Config
    from curate.pipeline.steps import enabled

    return [step.name for step in enabled(Config(**config))]


def skipped_steps(stats: dict[str, Any]) -> list[str]:
    """What the options asked for and the run did not do (stats.json records it), one line each, for the summary."""
    dedup = stats.get("dedup") or {}
    semantic = str(dedup.get("semantic", ""))
    if "semantic" in (dedup.get("kinds") or []) and semantic.startswith("skipped"):
        reason = semantic.removeprefix("skipped").lstrip(": ")
        return [f"--dedup semantic was skipped: {reason}; semantic dedup needs the CLIP embeddings of --scores model "
                "(or auto without metadata scores)"]
    return []


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("curate", "pyarrow", "img2dataset", "webdataset", "pyspark", "torch", "open_clip_torch", "timm",
                    "faiss-cpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found
