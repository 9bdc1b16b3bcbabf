"""The local executor's two generic runners: a map step over checkpoint parts, and a global step as signatures
spilled into hash partitions on disk, each partition grouped alone, the verdicts routed back to the parts.

Every step without a runner of its own runs through these, so a new step touches no executor file.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.executors.local.engine import SCORE_SLICE_ROWS, LocalRun
from curate.executors.local.partitions import VerdictRouter, partition_count, spill
from curate.pipeline.steps import GROUP, Step
from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, ROW
from curate.stages.verdict import alive, apply_verdicts, verdict_schema, with_verdict_columns
from curate.storage import checkpoint as io
from curate.storage import files as storage


def map_step(run: LocalRun, step: Step, force: bool = False) -> dict[str, Any]:
    """step.bind's function over every part of the previous step's checkpoint, a slice at a time."""
    assert step.bind is not None, f"{step.name}: a map step without a function"
    apply = step.bind(run.config, run.facts)

    def body() -> dict[str, Any]:
        source, target = run.source(step.name), run.checkpoint(step.name)
        target.reset()
        live = alive if step.drops_rows else (lambda table: pc.is_valid(table[ROW]))
        for index, path in enumerate(source.parts()):
            if not storage.parquet_file(path).metadata.num_rows:
                part = apply(with_verdict_columns(storage.read_table(path)))
                target.write_split(index, part, live(part))
                continue
            slices = io.read_parquet_batches(str(path), SCORE_SLICE_ROWS)
            target.write_split_pieces(index, (apply(with_verdict_columns(piece)) for piece in slices), live)
        return {}

    return run._timed(step.name, body, force=force)


def first_verdicts(verdicts: pa.Table) -> pa.Table:
    """One verdict per row: the first in (detail, stage, reason) order, as Spark's min over the same struct."""
    if not verdicts.num_rows:
        return verdicts
    ordered = verdicts.sort_by([(ROW, "ascending"), (DROP_DETAIL, "ascending"), (DROP_STAGE, "ascending"),
                                (DROP_REASON, "ascending")])
    rows = ordered[ROW].to_numpy()
    first = np.concatenate([[True], rows[1:] != rows[:-1]])
    return ordered.filter(pa.array(first))


def _partitions(values: pa.ChunkedArray, partitions: int) -> np.ndarray:
    return pc.fill_null(values, 0).to_numpy().view(np.uint64) % np.uint64(partitions)


def global_step(run: LocalRun, step: Step, force: bool = False) -> dict[str, Any]:
    """signature -> group -> apply with the step's Global triple: the live rows' signatures and the reference files'
    entries spilled by GROUP into partitions (memory: one partition), each grouped alone, verdicts routed back."""
    spec = step.global_step
    assert spec is not None, f"{step.name}: a global step without signature, group and apply"
    config, facts = run.config, run.facts

    def body() -> dict[str, Any]:
        source, target = run.source(step.name), run.checkpoint(step.name)
        target.reset()
        work = storage.scratch(run.out, f"{step.name}-work")
        signature, group = spec.signature(config, facts), spec.group(config, facts)
        references = spec.references(config)
        reference_rows = sum(spec.reference_rows(config, path) for path in references)
        partitions = partition_count(run.live_rows(source.path.name) + reference_rows, spec.rows_per_partition)

        def signatures() -> Iterator[pa.Table]:
            for path in source.parts():
                names = set(storage.read_schema(path).names)
                part = storage.read_table(path, columns=[n for n in (*spec.columns, ROW, DROP_REASON) if n in names])
                part = with_verdict_columns(part)
                yield signature(part.filter(alive(part)))
            for reference in references:
                yield from spec.read_reference(config, reference)

        try:
            files = spill(signatures(), lambda t: _partitions(t[GROUP], partitions), partitions, work / "signatures")
            router = VerdictRouter(work / "verdicts", run.part_starts(), partitions)
            flagged = 0
            for path in files:
                found = group(pq.read_table(path)).select(verdict_schema().names).cast(verdict_schema())
                flagged += found.num_rows
                router.write(found)
            for index, (part, verdicts) in enumerate(zip(source.iter_parts(), router.per_part(verdict_schema()),
                                                         strict=True)):
                part = apply_verdicts(part, first_verdicts(verdicts))
                target.write_split(index, part, alive(part))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return {"reference_rows": reference_rows, "partitions": partitions}

    return run._timed(step.name, body, force=force)
