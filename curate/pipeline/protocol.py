"""The step protocol: what one step declares (curate.pipeline.steps lists them in order as PIPELINE)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from curate.config import Config
from curate.pipeline.plan import RunFacts

Batch = Callable[[pa.Table], pa.Table]
GROUP = "_group"  # the int64 column of a global step's signature rows that names their group
REFERENCE_ROW = -1  # ROW of a signature row that comes from a reference file, not from the run's rows


def _always(config: Config) -> bool:
    return True


def _nothing(config: Config) -> None:
    return None


@dataclass(frozen=True)
class Global:
    """A global step: signature -> group -> apply (the apply sets the verdicts the group function returns)."""

    signature: Callable[[Config, RunFacts], Batch]  # live rows -> signature rows (ROW, GROUP, whatever group needs)
    group: Callable[[Config, RunFacts], Batch]  # the signature rows of whole groups -> verdicts
    columns: tuple[str, ...]  # the columns signature reads of each part (the executor reads only these)
    references: Callable[[Config], list[str]] = lambda config: []  # files whose entries join the rows
    read_reference: Callable[[Config, str], Iterator[pa.Table]] = lambda config, path: iter(())  # -> ROW -1 rows
    reference_rows: Callable[[Config, str], int] = lambda config, path: 0  # about how many entries a file holds
    rows_per_partition: int = 2_000_000  # local spill: signature rows a partition holds (its memory when grouped)


@dataclass(frozen=True)
class Step:
    name: str
    adds: tuple[str, ...]  # schema files (curate/schemas/NAME.arrow.json) of the columns it adds
    options: frozenset[str]  # the Config fields it reads
    bind: Callable[..., Callable[..., Any]] | None = None  # map step (and a custom runner's per-batch function)
    global_step: Global | None = None
    drops_rows: bool = True  # passes only live rows on (the local engine keeps the others in dropped parts)
    redo: str = "resume"  # a rerun: "resume" a finished checkpoint, redo it when its options "changed", or "always"
    enabled: Callable[[Config], bool] = _always  # whether a run with this config has the step at all
    check: Callable[[Config], None] = _nothing  # raises for a problem knowable before any work (a missing file)
    local: str | None = None  # "module:function(run, step, force) -> meta": the local executor's custom runner
    spark: str | None = None  # "module:function(run, step, frame) -> frame": the Spark executor's custom runner
    holds_images: bool = False  # its checkpoint keeps the image bytes the shard writers copy (and retry re-fetches)
    rerun_from: str | None = None  # `curate NAME OUT` redoes this earlier step first (it reads NAME's options)
    internal: tuple[str, ...] = ()  # columns it adds for later steps that never reach the books
    reasons: tuple[str, ...] = ()  # the ledger reasons it writes (documentation, and the docs' table)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "global" if self.global_step is not None else "map"


def runner(path: str) -> Callable[..., Any]:
    """The function "module:function" names (a step's custom runner, imported when it first runs)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
