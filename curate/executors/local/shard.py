"""The local engine's last steps: shard the survivors, then write ledger, samples and stats, and check the books.

Both are global steps done in partitions, so memory is bounded however many rows reach select:
- the shuffle: each survivor's (row, key, seeded draw) is spilled into draw-range partitions; a survivor's position
  is the count of the lower partitions plus its rank inside its own (shuffle_order, as on one table and on Spark);
  the positions go back to the select parts through buckets of consecutive parts (partitions.VerdictRouter);
- then part by part: shard, aspect bucket and remainder verdict, the part's samples recorded in their shards'
  buckets (the bytes around each image and a reference to it, curate.wds.placed), and the part written to the shard
  checkpoint; then each tar is laid out and every download part read once, its images written into their tars;
- the books stream the shard checkpoint once: the ledger one input part at a time, with the `input = kept + dropped`
  check per part, and samples.parquet through position-range buckets, in (shard, position) order.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import download_workers
from curate.executors.local.engine import LocalRun
from curate.executors.local.partitions import VerdictRouter, partition_count, spill
from curate.pipeline import accounting, plan, steps
from curate.pipeline.steps import DROPPING_STAGES
from curate.schema import (
    CAPTION,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    KEY,
    POSITION,
    ROW,
    SHARD,
    URL,
    table_schema,
)
from curate.stages import shard as shard_stage
from curate.stages.buckets import bucket_counts
from curate.stages.download import JPG_BYTES
from curate.stages.verdict import alive
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.wds import placed
from curate.wds.index import index_document, sizes_document
from curate.wds.writer import CARRIED_SKIP, shard_path

log = logging.getLogger(__name__)

DRAW = "_draw"
SAMPLE_ROWS_PER_BUCKET = 500_000  # samples.parquet is ordered through buckets of this many positions
ROWS_PER_DRAW_PARTITION = 2_000_000  # survivors (row, key, draw): ~100 MB a partition
SIGNATURE = pa.schema([(ROW, pa.int64()), (KEY, pa.string()), (DRAW, pa.uint64())])


class Survivors:
    """The shuffle's signature step over the select checkpoint: the survivors' count and bytes, each part's first row,
    and the (row, key, draw) signatures spilled into draw-range partitions."""

    def __init__(self, select: io.Checkpoint, seed: int, input_rows: int, folder: Path) -> None:
        self.count, self.total_bytes, firsts = 0, 0, []
        reaching = sum(storage.parquet_file(path).metadata.num_rows for path in select.parts())
        self.partitions = partition_count(reaching, ROWS_PER_DRAW_PARTITION)

        def signatures() -> Iterator[pa.Table]:
            for part in select.iter_parts([KEY, ROW, DROP_REASON, CAPTION, JPG_BYTES]):
                firsts.append(part[ROW][0].as_py() if part.num_rows else None)
                live = part.filter(alive(part))
                captions = pc.sum(pc.binary_length(pc.fill_null(live[CAPTION], ""))).as_py() or 0
                self.count += live.num_rows
                self.total_bytes += (pc.sum(live[JPG_BYTES]).as_py() or 0) + captions
                draws = shard_stage.shuffle_draws(live[KEY].to_pylist(), seed)
                yield pa.table({ROW: live[ROW], KEY: live[KEY], DRAW: pa.array(draws, pa.uint64())})

        self.whole: pa.Table | None = None
        if self.partitions == 1:  # one partition is read whole anyway: it need not go to disk first
            self.files, self.whole = [], pa.concat_tables([SIGNATURE.empty_table(), *signatures()])
        else:
            self.files = spill(signatures(), lambda t: shard_stage.draw_ranges(t[DRAW].to_numpy(), self.partitions),
                               self.partitions, folder / "draws")
        self.total_bytes += self.count * shard_stage.estimated_sample_bytes(0, 0)
        self.starts = _part_starts(firsts, input_rows)

    def positions(self, folder: Path) -> Iterator[pa.Table]:
        """Per select part, its survivors' (row, position), sorted by row: one partition, then one bucket of
        consecutive parts, in memory at a time."""
        if self.whole is not None:
            yield from self._per_part(self.whole)
            return
        router, offset = VerdictRouter(folder / "positions", self.starts, self.partitions), 0
        for path in self.files:
            table = pq.read_table(path)
            order = shard_stage.shuffle_order(table[KEY].to_numpy(zero_copy_only=False), table[DRAW].to_numpy())
            router.write(pa.table({ROW: table[ROW].take(pa.array(order)),
                                   POSITION: pa.array(np.arange(offset, offset + len(order), dtype=np.int64))}))
            offset += len(order)
        yield from router.per_part(pa.schema([(ROW, pa.int64()), (POSITION, pa.int64())]))

    def _per_part(self, table: pa.Table) -> Iterator[pa.Table]:
        """The one partition's (row, position) cut at each part's first row, as VerdictRouter.per_part gives them."""
        order = shard_stage.shuffle_order(table[KEY].to_numpy(zero_copy_only=False), table[DRAW].to_numpy())
        found = pa.table({ROW: table[ROW].take(pa.array(order)),
                          POSITION: pa.array(np.arange(len(order), dtype=np.int64))}).sort_by(ROW)
        rows = found[ROW].to_numpy()
        cuts: list[int] = np.asarray(np.searchsorted(rows, np.r_[self.starts, np.iinfo(np.int64).max])).tolist()
        for low, high in itertools.pairwise(cuts):
            yield found.slice(low, high - low)


def _part_starts(firsts: list[int | None], end: int) -> np.ndarray:
    """Each part's first row, rising: an empty part takes the next part's first row (so it is given no rows)."""
    starts, following = [], end
    for first in reversed(firsts):
        following = following if first is None else first
        starts.append(following)
    return np.array(starts[::-1], dtype=np.int64)


def part_positions(part: pa.Table, found: pa.Table) -> np.ndarray:
    """The shuffle position of each row of a select part (-1 for rows dropped before)."""
    positions = np.full(part.num_rows, -1, dtype=np.int64)
    live = np.flatnonzero(alive(part).to_numpy(zero_copy_only=False))
    rows, found_rows = part[ROW].to_numpy()[live], found[ROW].to_numpy()
    at = np.searchsorted(found_rows, rows)
    if len(found_rows) != len(live) or not np.array_equal(found_rows[np.minimum(at, len(found_rows) - 1)], rows):
        raise RuntimeError(f"shard: {len(live)} survivors in a part, but {len(found_rows)} positions came back")
    positions[live] = found[POSITION].to_numpy()[at]
    return positions


def unified_schema(checkpoint: io.Checkpoint) -> pa.Schema:
    """One schema for every part (columns in order of first appearance, types promoted), as concatenating them
    would give: each part is conformed to it, so the parts' samples, tars and books agree."""
    return pa.unify_schemas([storage.read_schema(path) for path in checkpoint.parts()], promote_options="permissive")


def conformed(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([schema.empty_table(), table], promote_options="permissive")


def shard(run: LocalRun) -> dict[str, Any]:
    """Write equal tars and index.json; a rerun after a crash rebuilds buckets and skips finished tars."""
    def body() -> dict[str, Any]:
        c, select, target = run.config, run.source("shard"), run.checkpoint("shard")
        images = run.checkpoint(steps.images_step(c).name)  # the checkpoint that keeps the image bytes
        selected, downloads = select.required_parts(), images.required_parts()
        if len(downloads) != len(selected):
            raise RuntimeError(f"shard: {len(selected)} {select.path.name} parts but {len(downloads)} "
                               f"{images.path.name} parts")
        work = storage.scratch(run.out, "shard-work")
        shutil.rmtree(work, ignore_errors=True)
        survivors = Survivors(select, c.seed, run.checkpoint("ingest").meta()["input_rows"], work)
        try:
            shard_plan = plan.shard_plan(c, survivors.count, survivors.total_bytes)
        except shard_stage.ShardPlanError as error:
            shutil.rmtree(work, ignore_errors=True)
            # Still show why rows went: the ledger of everything dropped so far.
            write_ledger(run, select.path.name)
            raise shard_stage.ShardPlanError(f"{error}; the dropped rows are in {run.out / 'ledger.parquet'}") from None
        target.reset()
        shard_dir, buckets = run.out / "shards", storage.scratch(run.out, "shard-buckets")  # buckets stay local
        shutil.rmtree(buckets, ignore_errors=True)
        buckets.mkdir(parents=True)
        storage.remove(shard_dir)
        schema = unified_schema(select)
        place = steps.bound("shard", c, run.facts, plan=shard_plan)
        per_bucket: dict[int, dict[str, int]] = {}
        positions = survivors.positions(work)
        # Each checkpoint part is written (and fsync'd) by a thread while the next part is placed; one at a time.
        with ThreadPoolExecutor(1) as checkpoint_writer:
            pending: Future[None] | None = None
            for index, (part, found) in enumerate(zip(select.iter_parts(), positions, strict=True)):
                part = conformed(part, schema)
                part = place(part.append_column(POSITION, pa.array(part_positions(part, found))))
                assignment = part.filter(pc.greater_equal(part[SHARD], 0))
                if assignment.num_rows:
                    placed.record(placed.metadata_groups(downloads[index]), index, assignment, buckets,
                                  [n for n in part.column_names if n not in CARRIED_SKIP])
                    for number, counts in bucket_counts(assignment).items():
                        merged = per_bucket.setdefault(number, {})
                        for name, count in counts.items():
                            merged[name] = merged.get(name, 0) + count
                if pending is not None:
                    pending.result()
                pending = checkpoint_writer.submit(target.write_part, index, part)
            if pending is not None:
                pending.result()
        shutil.rmtree(work, ignore_errors=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        # Each image goes once from its download part into its tar, at the offset the plan gives it.
        entries = [{**entry, "buckets": dict(sorted(per_bucket.get(index, {}).items()))}
                   for index, entry in enumerate(placed.write_tars(
                       buckets, downloads, shard_plan.num_shards,
                       lambda index: shard_path(shard_dir, c.shard_name, index), download_workers(c)[0],
                       lambda done: run.progress("shard", done, shard_plan.num_shards)))]
        shutil.rmtree(buckets)
        io.write_json(index_document(c, shard_plan, entries), shard_dir / "index.json")
        io.write_json(sizes_document(entries), shard_dir / "sizes.json")
        return {"num_shards": shard_plan.num_shards, "samples_per_shard": shard_plan.samples_per_shard,
                "remainder": shard_plan.remainder}

    return run._timed("shard", body, force=True)


KEPT = "_kept"
SOURCE_SCHEMA = pa.schema([(KEY, pa.string()), (ROW, pa.int64()), (URL, pa.string()), (DROP_STAGE, pa.string()),
                           (DROP_REASON, pa.string()), (DROP_DETAIL, pa.string()), (KEPT, pa.bool_())])


def _ledger_source(part: pa.Table) -> pa.Table:
    """A late part reduced to what the books need of it: the ledger's columns and whether the row is kept."""
    kept = (pc.and_(pc.is_null(part[DROP_REASON]), pc.greater_equal(part[SHARD], 0)) if SHARD in part.column_names
            else pa.array(np.zeros(part.num_rows, bool)))
    source = part.select(accounting.LEDGER_SOURCE).append_column(KEPT, pc.fill_null(kept, False))
    return source.cast(SOURCE_SCHEMA).sort_by(ROW)


def _between(tables: Iterator[pa.Table], ends: list[int]) -> Iterator[pa.Table]:
    """Tables whose rows rise across and within them, cut at each end: the rows below ends[0], then below ends[1]…"""
    current: pa.Table | None = None
    for high in ends:
        pieces = [SOURCE_SCHEMA.empty_table()]
        while True:
            if current is None:
                current = next(tables, None)
                if current is None:
                    break
            cut = int(np.searchsorted(current[ROW].to_numpy(), high))
            pieces.append(current.slice(0, cut))
            if cut < current.num_rows:
                current = current.slice(cut)
                break
            current = None
        yield pa.concat_tables(pieces)


def ledger_chunks(run: LocalRun, late: Iterator[pa.Table]) -> Iterator[tuple[int, int, pa.Table, np.ndarray]]:
    """(first row, end row, ledger rows, kept rows) per ingest part, in row order: the rows each dropping stage kept
    in its dropped parts, then the verdicts of the late parts (the rows that reached select, reduced by
    _ledger_source) in that range."""
    starts = run.part_starts()
    ends = np.r_[starts[1:], run.checkpoint("ingest").meta()["input_rows"]].tolist()
    for index, (low, high, rows) in enumerate(zip(starts.tolist(), ends, _between(late, ends), strict=True)):
        pieces = [accounting.ledger_table(storage.read_table(path, columns=accounting.LEDGER_SOURCE))
                  for stage in DROPPING_STAGES if (path := run.checkpoint(stage).dropped_path(index)).exists()]
        pieces.append(accounting.ledger_table(rows.drop_columns([KEPT])))
        kept = rows.filter(rows[KEPT])[ROW].to_numpy()
        yield low, high, pa.concat_tables(pieces).sort_by(ROW), kept


def write_ledger(run: LocalRun, late_stage: str,
                 samples: SampleBuckets | None = None) -> tuple[dict[str, dict[str, int]], int]:
    """Stream OUT/ledger.parquet one input part at a time from the dropped parts and late_stage's checkpoint; with
    samples (shard's checkpoint), check every input row is kept or dropped exactly once on the way, and spill the kept
    rows into samples. Returns the drop counts and the rows kept."""
    counts: dict[str, dict[str, int]] = {}
    kept_rows = 0
    late = run.checkpoint(late_stage)
    schema = unified_schema(late)

    def late_parts() -> Iterator[pa.Table]:
        for part in late.iter_parts():
            part = conformed(part, schema)
            if samples is not None:
                samples.add(part)
            yield _ledger_source(part)

    def checked() -> Iterator[pa.Table]:
        nonlocal counts, kept_rows
        for low, high, chunk, kept in ledger_chunks(run, late_parts()):
            if samples is not None:
                accounting.check_rows(low, high, np.concatenate([kept, chunk[ROW].to_numpy()]))
            kept_rows += len(kept)
            counts = accounting.drop_counts(chunk, counts)
            yield chunk

    io.write_tables(checked(), table_schema("ledger"), run.out / "ledger.parquet")
    return counts, kept_rows


class SampleBuckets:
    """samples.parquet in (shard, position) order, in bounded memory: each part's kept samples are spilled into
    buckets of position ranges, then each bucket is sorted and appended in turn."""

    def __init__(self, kept: int, schema: pa.Schema, folder: Path) -> None:
        self.kept, self.schema = kept, accounting.samples_table(schema.empty_table()).schema
        self.buckets = partition_count(kept, SAMPLE_ROWS_PER_BUCKET)
        self.folder = folder
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.writers: dict[int, pq.ParquetWriter] = {}

    def add(self, part: pa.Table) -> None:
        samples = accounting.samples_table(part)
        if not samples.num_rows:
            return
        bucket = samples[POSITION].to_numpy() * self.buckets // max(self.kept, 1)
        for number in np.unique(bucket).tolist():
            if number not in self.writers:
                self.writers[number] = pq.ParquetWriter(self.folder / f"{number:06d}.parquet", self.schema)
            self.writers[number].write_table(samples.filter(pa.array(bucket == number)).cast(self.schema))

    def write(self, target: storage.Location) -> int:
        for writer in self.writers.values():
            writer.close()
        written = 0

        def ordered() -> Iterator[pa.Table]:
            nonlocal written
            for number in sorted(self.writers):
                table = pq.read_table(self.folder / f"{number:06d}.parquet").sort_by(
                    [(SHARD, "ascending"), (POSITION, "ascending")])
                written += table.num_rows
                yield table

        io.write_tables(ordered(), self.schema, target)
        shutil.rmtree(self.folder, ignore_errors=True)
        return written


def finish(run: LocalRun, started: float) -> dict[str, Any]:
    """Ledger, samples and stats; fails loudly if a row went missing or was counted twice."""
    input_rows = run.checkpoint("ingest").meta()["input_rows"]
    shard_meta = run.checkpoint("shard").meta()
    placed = shard_meta.get("num_shards", 0) * shard_meta.get("samples_per_shard", 0)
    samples = SampleBuckets(placed, unified_schema(run.checkpoint("shard")), storage.scratch(run.out, "samples-work"))
    counts, kept = write_ledger(run, "shard", samples)
    dropped = sum(sum(reasons.values()) for reasons in counts.values())
    written = samples.write(run.out / "samples.parquet")
    if written != kept:
        raise accounting.AccountingError(f"accounting failed: {kept} rows kept but {written} samples written")
    accounting.check_totals(input_rows, kept, dropped)  # every row once per input part: write_ledger's check_rows
    select_meta = run.checkpoint("select").meta()
    stats = accounting.stats_document(
        input_rows=input_rows, kept=kept, counts=counts,
        judged_by={"prefilter": run.checkpoint("prefilter").meta().get("judged_by"),
                   "select": select_meta.get("judged_by")},
        not_reconsidered=select_meta.get("not_reconsidered", {}), scores=run.checkpoint("score").meta().get("scores"),
        dedup=run.checkpoint("dedup").meta(), shards=shard_meta,
        timings={**run.timings, "total": time.perf_counter() - started}, config=run.config.to_dict(), engine="local")
    io.write_json(stats, run.out / "stats.json")
    return stats
