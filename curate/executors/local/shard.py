"""The local engine's last steps: shard the survivors, then write ledger, samples and stats, and check the books."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import download_workers
from curate.executors.local.engine import LocalRun
from curate.executors.local.partitions import rows_between
from curate.pipeline import accounting
from curate.pipeline.plan import DROPPING_STAGES
from curate.schema import (
    CAPTION,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    KEY,
    ROW,
    SHARD,
    URL,
    table_schema,
)
from curate.stages import shard as shard_stage
from curate.stages.buckets import add_buckets, bucket_counts
from curate.stages.verdict import alive, with_reason
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.wds.index import index_document, sizes_document
from curate.wds.writer import CARRIED_SKIP, scatter, shard_path, write_shard

log = logging.getLogger(__name__)

def plan(run: LocalRun, table: pa.Table) -> tuple[pa.Table, shard_stage.ShardPlan]:
    """Shuffle the survivors, plan the shards, assign each survivor a shard or the remainder."""
    c = run.config
    survivors = table.filter(alive(table))
    caption_bytes = pc.sum(pc.binary_length(pc.fill_null(survivors[CAPTION], ""))).as_py() or 0
    total = (pc.sum(survivors["jpg_bytes"]).as_py() or 0) + caption_bytes
    total += survivors.num_rows * shard_stage.estimated_sample_bytes(0, 0)
    if survivors.num_rows == 0:  # nothing kept is a result: no shard, and books that say why
        shard_plan = shard_stage.ShardPlan(0, 0, 0, c.world_size, c.workers_per_rank, c.global_batch_size)
    else:
        shard_plan = shard_stage.plan_shards(survivors.num_rows, total, c.world_size, c.workers_per_rank,
                                             c.target_shard_size, c.global_batch_size)
    positions = np.full(table.num_rows, -1, dtype=np.int64)
    is_alive = alive(table).to_numpy(zero_copy_only=False)
    positions[is_alive] = shard_stage.shuffle_positions(survivors[KEY].to_pylist(), c.seed)
    table = add_buckets(shard_stage.assign_shards(table, shard_plan, positions), c.buckets)
    remainder = pc.and_(alive(table), pc.equal(table[SHARD], -1))
    detail = f"{shard_plan.remainder} samples do not fill {shard_plan.num_shards} equal shards"
    return with_reason(table, remainder, "shard", "shard_remainder", detail), shard_plan


def shard(run: LocalRun) -> dict[str, Any]:
    """Write equal tars and index.json; a rerun after a crash rebuilds buckets and skips finished tars."""
    def body() -> dict[str, Any]:
        table = run.checkpoint("select").read()
        try:
            table, shard_plan = plan(run, table)
        except shard_stage.ShardPlanError as error:
            # Still show why rows went: the ledger of everything dropped so far.
            write_ledger(run, table)
            raise shard_stage.ShardPlanError(f"{error}; the dropped rows are in {run.out / 'ledger.parquet'}") from None
        assignment = table.filter(pc.greater_equal(table[SHARD], 0))
        metadata_columns = [n for n in table.column_names if n not in CARRIED_SKIP]
        shard_dir, buckets = run.out / "shards", storage.scratch(run.out, "shard-buckets")  # buckets stay local
        shutil.rmtree(buckets, ignore_errors=True)
        storage.remove(shard_dir)
        scatter(row_groups(run.checkpoint("download").parts()), assignment, buckets, metadata_columns)
        entries = []
        for index in range(shard_plan.num_shards):
            bucket = buckets / f"{index:06d}.bucket"
            if not bucket.exists():
                bucket.touch()
        shard_dir.mkdir(parents=True, exist_ok=True)

        def write(index: int) -> dict[str, Any]:
            return write_shard(buckets / f"{index:06d}.bucket", shard_path(shard_dir, run.config.shard_name, index))

        # One tar per thread, one thread per core: the copy, the sha256 and the fsync all run outside the GIL.
        with ThreadPoolExecutor(max(1, min(download_workers(run.config)[0], shard_plan.num_shards))) as pool:
            for index, entry in enumerate(pool.map(write, range(shard_plan.num_shards))):
                entries.append(entry)
                run.progress("shard", index + 1, shard_plan.num_shards)
        shutil.rmtree(buckets)
        per_bucket = bucket_counts(assignment)
        entries = [{**entry, "buckets": per_bucket.get(index, {})} for index, entry in enumerate(entries)]
        io.write_json(index_document(run.config, shard_plan, entries), shard_dir / "index.json")
        io.write_json(sizes_document(entries), shard_dir / "sizes.json")
        run.checkpoint("shard").write_part(0, table)
        return {"num_shards": shard_plan.num_shards, "samples_per_shard": shard_plan.samples_per_shard,
                "remainder": shard_plan.remainder}

    return run._timed("shard", body, force=True)


def row_groups(paths: list[storage.Location]) -> Iterator[pa.Table]:
    """Parquet parts a row group at a time (~16 MiB of images, storage.parquet_options): the memory of one group is
    reused for the next, where reading whole parts faulted in hundreds of fresh megabytes each."""
    for path in paths:
        reader = storage.parquet_file(path)
        for group in range(reader.num_row_groups):
            yield reader.read_row_group(group)


LEDGER_SOURCE = [KEY, ROW, URL, DROP_STAGE, DROP_REASON, DROP_DETAIL]


def ledger_chunks(run: LocalRun, late: pa.Table) -> Iterator[tuple[int, int, pa.Table]]:
    """(first row, end row, ledger rows) per ingest part, in row order: the rows each dropping stage kept in its
    dropped parts, then the select and shard verdicts of `late` (the rows that reached select)."""
    late = accounting.ledger_table(late)
    late_rows = late[ROW].to_numpy()
    starts = run.part_starts()
    ends = np.r_[starts[1:], run.checkpoint("ingest").meta()["input_rows"]]
    for index, (low, high) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        pieces = [accounting.ledger_table(storage.read_table(path, columns=LEDGER_SOURCE))
                  for stage in DROPPING_STAGES if (path := run.checkpoint(stage).dropped_path(index)).exists()]
        pieces.append(rows_between(late, late_rows, low, high))
        yield low, high, pa.concat_tables(pieces).sort_by(ROW)


def write_ledger(run: LocalRun, late: pa.Table, samples: pa.Table | None = None) -> dict[str, dict[str, int]]:
    """Stream OUT/ledger.parquet one input part at a time; with samples, check every input row is kept or dropped
    exactly once on the way. Returns the drop counts."""
    counts: dict[str, dict[str, int]] = {}
    sample_rows = np.sort(samples[ROW].to_numpy()) if samples is not None else None

    def checked() -> Iterator[pa.Table]:
        nonlocal counts
        for low, high, chunk in ledger_chunks(run, late):
            if sample_rows is not None:
                kept = sample_rows[np.searchsorted(sample_rows, low):np.searchsorted(sample_rows, high)]
                accounting.check_rows(low, high, np.concatenate([kept, chunk[ROW].to_numpy()]))
            counts = accounting.drop_counts(chunk, counts)
            yield chunk

    io.write_tables(checked(), table_schema("ledger"), run.out / "ledger.parquet")
    return counts


def finish(run: LocalRun, started: float) -> dict[str, Any]:
    """Ledger, samples and stats; fails loudly if a row went missing or was counted twice."""
    table = run.checkpoint("shard").read()
    samples = accounting.samples_table(table)
    input_rows = run.checkpoint("ingest").meta()["input_rows"]
    counts = write_ledger(run, table, samples)
    dropped = sum(sum(reasons.values()) for reasons in counts.values())
    if samples.num_rows + dropped != input_rows:
        raise accounting.AccountingError(f"accounting failed: {input_rows} input rows, {samples.num_rows} kept + "
                                         f"{dropped} dropped")
    io.write_table(samples, run.out / "samples.parquet")
    shard_meta = run.checkpoint("shard").meta()
    select_meta = run.checkpoint("select").meta()
    stats = {
        "input_rows": input_rows, "kept": samples.num_rows, "dropped": dropped,
        # the thresholds each row was judged by: metadata ones before the download, the rest in select
        "judged_by": {"prefilter": run.checkpoint("prefilter").meta().get("judged_by"),
                      "select": select_meta.get("judged_by")},
        "not_reconsidered": select_meta.get("not_reconsidered", {}),
        "dropped_by_stage": counts, "funnel": accounting.funnel(input_rows, counts),
        "scores_source": run.checkpoint("score").meta().get("scores"),
        "dedup": run.checkpoint("dedup").meta(), "shards": shard_meta,
        "timings": {**run.timings, "total": time.perf_counter() - started},
        "config": run.config.to_dict(), "versions": accounting.versions(),
    }
    io.write_json(stats, run.out / "stats.json")
    return stats
