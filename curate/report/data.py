"""What the report reads: bounded, streaming selections over the run's tables; no step holds every row or image."""

from __future__ import annotations

import base64
import io as bytes_io
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFilter

from curate.schema import (
    AESTHETIC,
    AESTHETIC_SCORE,
    CAPTION,
    CLIP_SCORE,
    DROP_DETAIL,
    DROP_REASON,
    HEIGHT,
    JPG,
    KEY,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PUNSAFE,
    PWATERMARK,
    ROW,
    URL,
    WATERMARK_PROB,
    WIDTH,
)
from curate.storage import files as storage
from curate.storage.files import Location

log = logging.getLogger(__name__)
MAX_POINTS = 100_000  # rows sampled for the distributions, whatever the run's size
AESTHETIC_REASONS = ("low_aesthetic", "metadata_low_aesthetic")
DETAIL_COLUMNS = [ROW, KEY, URL, CAPTION, DROP_REASON, DROP_DETAIL, AESTHETIC_SCORE, AESTHETIC, WATERMARK_PROB,
                  PWATERMARK, ORIGINAL_WIDTH, ORIGINAL_HEIGHT, WIDTH, HEIGHT, PUNSAFE, CLIP_SCORE]
# Blur radius of a thumbnail above the safety cut, as a fraction of its size: shapes and colours stay, nothing more.
BLUR_FRACTION = 0.1


# Opt-out signal -> the ledger reason it drops a row with (curate.stages.consent).
CONSENT_REASONS = {"robots": "robots_disallowed", "tdm": "tdm_reserved", "headers": "opted_out"}


def consent_counts(samples: Location) -> dict[str, dict[str, int]]:
    """{signal: {outcome: kept samples}} from samples.parquet's consent columns, read a batch at a time."""
    names = [f"consent_{signal}" for signal in CONSENT_REASONS]
    if not samples.exists():
        return {}
    dataset = storage.parquet_dataset(samples)  # a file (local engine) or a folder of parts (Spark)
    present = [name for name in names if name in dataset.schema.names]
    counts: dict[str, dict[str, int]] = {}
    for batch in dataset.to_batches(columns=present, batch_size=1 << 20):
        for name in present:
            for entry in pc.value_counts(batch[name]).to_pylist():
                signal = counts.setdefault(name.removeprefix("consent_"), {})
                value = entry["values"] or "unknown"
                signal[value] = signal.get(value, 0) + entry["counts"]
    return {signal: dict(sorted(values.items())) for signal, values in counts.items()}


def row_hash(rows: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random 64-bit value per row number (splitmix64): a deterministic sample order."""
    with np.errstate(over="ignore"):
        x = rows.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class TopK:
    """The k rows with the smallest (or largest) value seen so far, fed batch by batch."""

    def __init__(self, k: int, largest: bool = False) -> None:
        self.k, self.sign = k, -1.0 if largest else 1.0
        self.values, self.rows = np.empty(0), np.empty(0, dtype=np.int64)

    def add(self, values: np.ndarray, rows: np.ndarray) -> None:
        values = np.concatenate([self.values, self.sign * np.asarray(values, dtype=np.float64)])
        rows = np.concatenate([self.rows, np.asarray(rows, dtype=np.int64)])
        order = np.lexsort((rows, values))[: self.k]  # ties broken by row number: deterministic
        self.values, self.rows = values[order], rows[order]

    def result(self) -> list[int]:
        return self.rows.tolist()


def _present(path: Location, wanted: list[str]) -> list[str]:
    names = set(storage.read_schema(path).names)
    return [name for name in wanted if name in names]


def checkpoint_parts(out: Location, stage: str) -> list[Location]:
    parts = storage.glob(out / "stages" / stage, "part-*.parquet")
    if not parts:
        raise ValueError(f"{out}: no {stage} checkpoint; run `curate run` (or `curate shard`) first")
    return parts


def row_parts(out: Location) -> list[Location]:
    """Files that together hold every input row once: the rows that reached select (the shard checkpoint), and
    the rows each earlier stage dropped (its dropped-NNNNNN.parquet parts)."""
    return checkpoint_parts(out, "shard") + storage.glob(out / "stages", "*/dropped-*.parquet")


def iter_columns(parts: list[Location], wanted: list[str], filters: Any = None) -> Iterator[pa.Table]:
    """Each part's wanted columns that exist; filters prune row groups by their statistics."""
    for part in parts:
        table = storage.read_table(part, columns=_present(part, wanted), filters=filters)
        if table.num_rows:
            yield table


def coalesce(table: pa.Table, first: str, second: str) -> pa.ChunkedArray | pa.Array:
    """first where it is set, else second (measured value, else the metadata's), as float64."""
    names = table.column_names
    values = [pc.cast(table[n], pa.float64()) for n in (first, second) if n in names]
    if not values:
        return pa.nulls(table.num_rows, pa.float64())
    return pc.coalesce(*values) if len(values) > 1 else values[0]


def distribution_sample(out: Location, input_rows: int) -> pa.Table:
    """At most ~MAX_POINTS rows (a fixed hash sample) with the values the distribution plots need."""
    fraction = min(1.0, MAX_POINTS / max(input_rows, 1))
    pieces = []
    wanted = [ROW, CAPTION, DROP_REASON, AESTHETIC_SCORE, AESTHETIC, WATERMARK_PROB, PWATERMARK,
              ORIGINAL_WIDTH, ORIGINAL_HEIGHT, WIDTH, HEIGHT, "scores_source", PUNSAFE, CLIP_SCORE]
    for table in iter_columns(row_parts(out), wanted):
        uniform = (row_hash(table[ROW].to_numpy()) >> np.uint64(11)).astype(np.float64) / 2.0**53
        table = table.filter(pa.array(uniform < fraction))
        names = table.column_names
        captions = table[CAPTION] if CAPTION in names else pa.nulls(table.num_rows, pa.string())
        measured = [table[n] if n in names else pa.nulls(table.num_rows, pa.float64())
                    for n in (AESTHETIC_SCORE, WATERMARK_PROB)]
        source = table["scores_source"] if "scores_source" in names else pa.nulls(table.num_rows, pa.string())
        pieces.append(pa.table({
            "kept": pc.is_null(table[DROP_REASON]),
            "reason": table[DROP_REASON],
            "aesthetic": coalesce(table, AESTHETIC_SCORE, AESTHETIC),
            "watermark": coalesce(table, WATERMARK_PROB, PWATERMARK),
            "width": coalesce(table, ORIGINAL_WIDTH, WIDTH),
            "height": coalesce(table, ORIGINAL_HEIGHT, HEIGHT),
            "caption_length": pc.utf8_length(pc.fill_null(captions, "")),
            "metadata_aesthetic": coalesce(table, AESTHETIC, AESTHETIC),
            "measured_aesthetic": pc.cast(measured[0], pa.float64()),
            "metadata_watermark": coalesce(table, PWATERMARK, PWATERMARK),
            "measured_watermark": pc.cast(measured[1], pa.float64()),
            "scores_source": source,
            "punsafe": coalesce(table, PUNSAFE, PUNSAFE),
            "clip_score": coalesce(table, CLIP_SCORE, CLIP_SCORE),
        }))
    return pa.concat_tables(pieces) if pieces else pa.table({})


def ledger_batches(ledger: Location, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The ledger in bounded batches, a file (local engine) or a folder of parts (Spark engine) alike."""
    yield from storage.parquet_dataset(ledger).to_batches(columns=columns, batch_size=1 << 20)


def sample_per_reason(ledger: Location, k: int) -> dict[str, list[int]]:
    """Up to k ledger rows per reason, a fixed hash sample spread over the whole run."""
    picks: dict[str, TopK] = {}
    for batch in ledger_batches(ledger, [ROW, "reason"]):
        rows, reasons = batch.column(ROW).to_numpy(), batch.column("reason")
        hashes = row_hash(rows).astype(np.float64)
        for reason in pc.unique(reasons).to_pylist():
            mask = pc.equal(reasons, reason).to_numpy(zero_copy_only=False)
            picks.setdefault(reason, TopK(k)).add(hashes[mask], rows[mask])
    return {reason: top.result() for reason, top in sorted(picks.items())}


def aesthetic_picks(out: Location, threshold: float, k: int) -> dict[str, list[int]]:
    """Kept just above the threshold, dropped just below it, and the highest-scored kept rows."""
    above, below, highest = TopK(k), TopK(k, largest=True), TopK(k, largest=True)
    wanted = [ROW, DROP_REASON, AESTHETIC_SCORE, AESTHETIC]
    for table in iter_columns(row_parts(out), wanted):
        score = coalesce(table, AESTHETIC_SCORE, AESTHETIC).to_numpy(zero_copy_only=False)
        rows = table[ROW].to_numpy()
        reasons = table[DROP_REASON]
        kept = pc.is_null(reasons).to_numpy(zero_copy_only=False) & ~np.isnan(score)
        low = pc.is_in(reasons, pa.array(AESTHETIC_REASONS)).to_numpy(zero_copy_only=False) & ~np.isnan(score)
        above.add(score[kept & (score >= threshold)], rows[kept & (score >= threshold)])
        below.add(score[low & (score < threshold)], rows[low & (score < threshold)])
        highest.add(score[kept], rows[kept])
    return {"above": above.result(), "below": below.result(), "highest": highest.result()}


def duplicate_groups(out: Location, sampled: dict[str, list[int]], groups: int,
                     members: int) -> list[tuple[int | None, list[int]]]:
    """(survivor row, dropped copies) per group. The ledger's detail names the survivor: its key for the content
    duplicates, its row for duplicate_url (a url+caption repeat shares the survivor's key)."""
    chosen_rows = [row for reason, rows in sampled.items() if reason.startswith("duplicate_") for row in rows]
    if not chosen_rows:
        return []
    ledger = out / "ledger.parquet"
    first = storage.read_table(ledger, columns=[ROW, "reason", "detail"], filters=[(ROW, "in", chosen_rows)])
    first = first.sort_by(ROW).to_pylist()
    picked = list(dict.fromkeys(_survivor_ref(r["reason"], r["detail"]) for r in first if r["detail"]))[:groups]
    copies: dict[tuple[bool, str], list[int]] = {ref: [] for ref in picked}
    details = pa.array(sorted({detail for _, detail in picked}))
    for batch in ledger_batches(ledger, [ROW, "reason", "detail"]):
        mask = pc.and_(pc.starts_with(batch.column("reason"), "duplicate_"), pc.is_in(batch.column("detail"), details))
        hits = batch.filter(mask)
        for row, reason, detail in zip(*(hits.column(c).to_pylist() for c in (ROW, "reason", "detail")), strict=True):
            group = copies.get(_survivor_ref(reason, detail))
            if group is not None and len(group) < members:
                group.append(row)
    found = survivor_rows(out, [detail for by_row, detail in picked if not by_row])
    return [(int(detail) if by_row else found.get(detail), copies[(by_row, detail)]) for by_row, detail in picked]


def _survivor_ref(reason: str, detail: str) -> tuple[bool, str]:
    """(whether detail is the survivor's row, detail)."""
    return reason == "duplicate_url", detail


def survivor_rows(out: Location, keys: list[str]) -> dict[str, int]:
    """The row of each survivor key. Keys repeat (url duplicates share one), and a survivor may itself be a
    duplicate of a later kind, so prefer a kept row, then any other verdict, then a later duplicate kind."""
    best: dict[str, tuple[int, int]] = {}
    if not keys:
        return {}
    for table in iter_columns(row_parts(out), [ROW, KEY, DROP_REASON], [(KEY, "in", keys)]):
        for key, row, reason in zip(table[KEY].to_pylist(), table[ROW].to_pylist(), table[DROP_REASON].to_pylist(),
                                    strict=True):
            rank = 0 if reason is None else 3 if reason == "duplicate_url" else 2 if reason.startswith(
                "duplicate_") else 1
            best[key] = min(best.get(key, (rank, row)), (rank, row))
    return {key: row for key, (_, row) in best.items()}


def row_details(out: Location, rows: set[int]) -> dict[int, dict[str, Any]]:
    """The small columns of the chosen rows, from row_parts (every input row is there once)."""
    details: dict[int, dict[str, Any]] = {}
    if not rows:
        return details
    for table in iter_columns(row_parts(out), DETAIL_COLUMNS, [(ROW, "in", sorted(rows))]):
        for record in table.to_pylist():
            details[record[ROW]] = record
    return details


def thumbnails(out: Location, rows: set[int], size: int = 160, blurred: set[int] | None = None) -> dict[int, str]:
    """A small JPEG data URI per chosen row that has stored bytes, blurred for the rows in `blurred`; reads only row
    groups holding chosen rows."""
    blurred = blurred or set()
    wanted, found = np.array(sorted(rows), dtype=np.int64), {}
    parts = storage.glob(out / "stages" / "download", "part-*.parquet")
    if not parts:
        log.warning("%s: no download checkpoint, so the report shows no thumbnails", out)
    for part in parts:
        reader = storage.parquet_file(part)
        row_index = reader.schema_arrow.get_field_index(ROW)
        for group in range(reader.num_row_groups):
            stats = reader.metadata.row_group(group).column(row_index).statistics
            if stats is not None and stats.has_min_max:
                inside = wanted[(wanted >= stats.min) & (wanted <= stats.max)]
                if not len(inside):
                    continue
            table = reader.read_row_group(group, columns=[ROW, JPG])
            table = table.filter(pc.and_(pc.is_in(table[ROW], pa.array(wanted)), pc.is_valid(table[JPG])))
            for row, data in zip(table[ROW].to_pylist(), table[JPG].to_pylist(), strict=True):
                found[row] = thumbnail_uri(data, size, blur=row in blurred)
    return {row: uri for row, uri in found.items() if uri}


def thumbnail_uri(data: bytes, size: int, blur: bool = False) -> str:
    """The image as a JPEG data URI of at most size × size; blurred past recognition when blur is set."""
    try:
        with Image.open(bytes_io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
        image.thumbnail((size, size))
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(radius=max(2.0, BLUR_FRACTION * max(image.size))))
        buffer = bytes_io.BytesIO()
        image.save(buffer, "JPEG", quality=70)
    except Exception as error:  # a stored image that no longer decodes is shown as a placeholder
        log.warning("thumbnail failed: %s", error)
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
