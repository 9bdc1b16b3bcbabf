"""The local engine: stages over parquet parts in-process, downloads in a process pool, checkpoints per stage."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import Config, download_workers
from curate.executors.local.download import download_parts
from curate.executors.local.partitions import (
    VerdictRouter,
    duplicate_verdicts,
    key_partitions,
    partition_count,
    rows_between,
    semantic_verdicts,
    spill,
)
from curate.pipeline import plan, steps
from curate.pipeline.plan import RunFacts
from curate.schema import (
    AESTHETIC,
    AESTHETIC_SCORE,
    CAPTION,
    CLIP_SCORE,
    DROP_REASON,
    EMBEDDING,
    JPG,
    KEY,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PHASH,
    PUNSAFE,
    PWATERMARK,
    ROW,
    SHA256,
    URL,
    WATERMARK_PROB,
)
from curate.stages import prefilter
from curate.stages.download import JPG_BYTES
from curate.stages.ingest import check_input_schema
from curate.stages.verdict import alive, apply_verdicts, verdict_schema, with_verdict_columns
from curate.storage import checkpoint as io
from curate.storage import files as storage
from curate.wds.reader import check_tar

log = logging.getLogger(__name__)
SCORE_SLICE_ROWS = 1024  # download rows read and scored at a time
Progress = Callable[[str, int, int], None]
# What dedup reads of each live row besides embeddings: duplicate signatures and the survivor rule's inputs.
DEDUP_SIGNATURE = [KEY, ROW, SHA256, PHASH, AESTHETIC_SCORE, WATERMARK_PROB, ORIGINAL_WIDTH, ORIGINAL_HEIGHT, PUNSAFE,
                   CLIP_SCORE]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class LocalRun:
    """One output folder; each stage reads the previous stage's checkpoint and writes its own."""

    def __init__(self, output: str | Path | storage.RemotePath, config: Config,
                 progress: Progress | None = None) -> None:
        self.out = storage.location(output)  # a local Path, or a RemotePath for an fsspec URL (s3://…)
        self.config = config
        self.progress = progress or _quiet
        self.timings: dict[str, float] = {}
        self._facts: RunFacts | None = None
        self.inputs: list[str] = []  # what ingest reads: the run's inputs, and check_inputs' files of them
        self.files: list[str] | None = None

    def checkpoint(self, stage: str) -> io.Checkpoint:
        return io.Checkpoint(self.out, stage)

    def source(self, stage: str) -> io.Checkpoint:
        """The checkpoint a step reads: the previous enabled step's (PIPELINE's edges)."""
        return self.checkpoint(steps.previous(stage, self.config).name)

    @property
    def facts(self) -> RunFacts:
        """What the ingested input decides: the scores' source and whether the images are in the input tars."""
        if self._facts is None:
            self._facts = RunFacts(self.resolve_scores(), self.stored_images())
        return self._facts

    def prepare(self) -> None:
        """After ingest, before any judging step: a missing score column or weight stops the run here."""
        if self.facts.scores == "metadata":
            self.require_metadata_scores()
        else:
            _load_scorer(self.config)  # a missing weight stops the run before any download

    def run_step(self, step: steps.Step, force: bool = False) -> dict[str, Any]:
        """One step: its own runner where it declares one, else the map or global runner."""
        from curate.executors.local import generic

        if step.local is not None:
            return dict(steps.runner(step.local)(self, step, force))
        run = generic.global_step if step.global_step is not None else generic.map_step
        return run(self, step, force)

    def _timed(self, stage: str, body: Callable[[], dict[str, Any] | None], force: bool = False) -> dict[str, Any]:
        checkpoint = self.checkpoint(stage)
        if checkpoint.done and not force:
            meta = checkpoint.meta()
            log.info("%s: done in an earlier run, resuming after it", stage)
        else:
            started = time.perf_counter()
            meta = body() or {}
            meta["seconds"] = time.perf_counter() - started
            checkpoint.finish(meta)
        self.timings[stage] = meta.get("seconds", 0.0)
        return meta

    # -- ingest -----------------------------------------------------------------------------------------
    def check_inputs(self, inputs: list[str]) -> list[str]:
        """The input files (with stored images: input_entries'), each one checked before any work starts; raises
        naming the file."""
        entries = plan.input_entries(self.config, inputs)
        if entries.stored:
            for path in entries.files:
                if path.endswith(".tar"):
                    check_tar(path)
            return entries.files
        files, rows = entries.files, 0
        for path in files:
            schema, count = io.parquet_footer(path)  # raises naming the file when it is no parquet
            try:
                names = check_input_schema(schema).values()
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
            if self.config.scores == "metadata" and AESTHETIC not in names:
                raise ValueError(f"{path}: no AESTHETIC_SCORE/aesthetic column, which --scores metadata needs in "
                                 "every input file; use --scores model (or auto) to compute the scores from the images")
            rows += count
        if rows == 0:
            raise ValueError(f"the input files hold no rows: {files}")
        return files

    def ingest(self, inputs: list[str], files: list[str] | None = None) -> dict[str, Any]:
        """Every input row to the canonical table; `files` are check_inputs' result when the caller has it."""
        files = files if files is not None else self.check_inputs(inputs)

        entries = plan.input_entries(self.config, inputs)
        tars, ignored = entries.stored, entries.ignored
        read = steps.bound("ingest", self.config, RunFacts(stored=tars))

        def body() -> dict[str, Any]:
            checkpoint, rows, part = self.checkpoint("ingest"), 0, 0
            checkpoint.reset()
            damage: list[dict[str, Any]] = []
            for path in files:
                for batch in read(path, rows, damage):
                    checkpoint.write_part(part, batch)
                    rows, part = rows + batch.num_rows, part + 1
            if rows == 0:
                raise ValueError(f"the input files hold no rows: {files}")
            return {"input_files": files, "input_rows": rows, "parts": part,
                    "input_format": "webdataset" if tars else "parquet", "damaged_inputs": damage,
                    "ignored_inputs": ignored}

        return self._timed("ingest", body)

    def score_column_nulls(self) -> dict[str, int]:
        """Null count of each LAION score column every ingested part has (reads those two columns only)."""
        nulls: dict[str, int] = {}
        for index, path in enumerate(self.checkpoint("ingest").parts()):
            names = storage.read_schema(path).names
            present = [c for c in (AESTHETIC, PWATERMARK) if c in names and (index == 0 or c in nulls)]
            columns = storage.read_table(path, columns=present)
            nulls = {c: nulls.get(c, 0) + columns[c].null_count for c in present}
        return nulls

    def resolve_scores(self) -> str:
        """model/metadata by the plan's rule, from the ingested parts' score columns."""
        return plan.resolve_scores(self.config, self.score_column_nulls)

    def require_metadata_scores(self) -> None:
        if AESTHETIC not in self.score_column_nulls():
            raise ValueError(
                "--scores metadata needs an AESTHETIC_SCORE/aesthetic column in every input file and the input "
                "lacks it; use --scores model to compute scores from the images"
            )

    # -- prefilter --------------------------------------------------------------------------------------
    def stored_images(self) -> bool:
        """True when the input is WebDataset tars: the images are read from them, not fetched."""
        return self.checkpoint("ingest").meta().get("input_format") == "webdataset"

    def part_starts(self) -> np.ndarray:
        """The first row number of every ingest part (from the parquet footers)."""
        counts = [storage.parquet_file(path).metadata.num_rows for path in self.checkpoint("ingest").parts()]
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if counts else np.zeros(0, np.int64)

    def url_flags(self) -> Iterator[pa.Table | None]:
        """Per ingest part, its url+caption duplicate verdicts: signatures spilled by key, grouped per partition."""
        source, work = self.checkpoint("ingest"), storage.scratch(self.out, "prefilter-work")
        starts = self.part_starts()
        if "url" not in self.config.dedup:
            yield from (None for _ in starts)
            return
        partitions = partition_count(self.checkpoint("ingest").meta().get("input_rows", 0))
        files = spill((prefilter.url_signature(p) for p in source.iter_parts([KEY, ROW, URL, CAPTION])),
                      lambda table: key_partitions(table[KEY], partitions), partitions, work / "signatures")
        router = VerdictRouter(work / "verdicts", starts, partitions)
        for path in files:
            router.write(prefilter.group_url_duplicates(pq.read_table(path)))
        yield from router.per_part(verdict_schema())
        shutil.rmtree(work, ignore_errors=True)

    def prefilter(self, force: bool = False) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            source, target = self.source("prefilter"), self.checkpoint("prefilter")
            target.reset()
            facts = self.facts
            judged_by = plan.prefilter_arguments(self.config, facts)
            judge = steps.bound("prefilter", self.config, facts)
            live = 0
            for index, (part, url_flags) in enumerate(zip(source.iter_parts(), self.url_flags(), strict=True)):
                part = judge(part, url_flags)
                keep = alive(part)
                live += pc.sum(keep.cast("int64")).as_py() or 0
                target.write_split(index, part, keep)
            return {"parts": len(source.parts()), "live_rows": live, "judged_by": judged_by}

        return self._timed("prefilter", body, force=force)

    # -- download ---------------------------------------------------------------------------------------
    def download(self, force: bool = False) -> dict[str, Any]:
        if force:
            self.checkpoint("download").reset()

        def body() -> dict[str, Any]:
            source, target = self.source("download"), self.checkpoint("download")
            todo = [i for i in range(len(source.parts())) if not target.has_part(i)]
            total, done = len(source.parts()), len(source.parts()) - len(todo)
            self.progress("download", done, total)
            live = [storage.parquet_file(source.part_path(i)).metadata.num_rows for i in todo]
            options, stored = plan.download_options(self.config), self.stored_images()
            groups = job_groups(todo, live, self.config.batch_size_rows)
            processes = min(download_workers(self.config)[0], len(groups))

            def written(parts: int) -> None:
                nonlocal done
                done += parts
                self.progress("download", done, total)

            # work_seconds: the workers' span, their start-up excluded (the bench's in-tool figure); work_span: its
            # start and end (time.time()), where the bench measures the tool's CPU
            span = download_parts(str(self.out), (source.path.name, target.path.name), groups, options, stored,
                                  processes, written)
            return {"parts": total, "work_seconds": span[1] - span[0] if span else 0.0, "work_span": span}

        return self._timed("download", body, force=force)

    # -- score ------------------------------------------------------------------------------------------
    def score(self, force: bool = False) -> dict[str, Any]:
        if force:
            self.checkpoint("score").reset()
        scores = self.facts.scores

        def body() -> dict[str, Any]:
            source, target = self.source("score"), self.checkpoint("score")
            if scores == "model":
                _load_scorer(self.config)  # the models load (or fail) before the first part
            score = steps.bound("score", self.config, RunFacts(scores))
            metadata = steps.bound("score", self.config, RunFacts("metadata"))  # an empty part's score columns
            for index, path in enumerate(source.parts()):
                if target.has_part(index):
                    continue
                if scores == "model" and storage.parquet_file(path).metadata.num_rows:
                    # read and scored a slice at a time: a part of 10,000 images is gigabytes
                    slices = io.read_parquet_batches(str(path), SCORE_SLICE_ROWS)
                    target.write_split_pieces(index, (score(piece) for piece in slices), alive)
                    continue
                names = storage.read_schema(path).names
                # Scores from the metadata need the images' lengths only (jpg_bytes), not their bytes.
                columns = [n for n in names if n != JPG] if JPG_BYTES in names else None
                part = metadata(storage.read_table(path, columns=columns))
                target.write_split(index, part, alive(part))
            return {"scores": scores}

        return self._timed("score", body, force=force)

    # -- dedup and select -------------------------------------------------------------------------------
    def live_rows(self, stage: str) -> int:
        """Rows no stage has dropped yet in a finished stage's checkpoint (reads the drop_reason column only)."""
        return sum(part[DROP_REASON].null_count for part in self.checkpoint(stage).iter_parts([DROP_REASON]))

    def not_reconsidered(self) -> dict[str, int]:
        """Rows prefilter dropped on metadata that this run's thresholds would keep: a re-cut cannot bring them back."""
        counts: dict[str, int] = {}
        for path in self.checkpoint("prefilter").dropped_parts():
            names = storage.read_schema(path).names  # only the columns the thresholds read, not the whole rows
            part = storage.read_table(path, columns=[n for n in prefilter.RECOVERABLE_COLUMNS if n in names])
            for reason, count in prefilter.recoverable(part, **plan.metadata_thresholds(self.config)).items():
                counts[reason] = counts.get(reason, 0) + count
        return counts

    def dedup(self, force: bool = False) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            c, kinds = self.config, self.config.dedup
            source, target = self.source("dedup"), self.checkpoint("dedup")
            target.reset()
            present = set().union(*(storage.read_schema(path).names for path in source.parts()))
            semantic = "semantic" in kinds and EMBEDDING in present
            columns = [n for n in DEDUP_SIGNATURE if n in present]

            # Copies that pass the select thresholds survive before copies that fail them (the survivor rule).
            survivor_rule = steps.bound("dedup", c, self.facts)

            def signatures(live_only: bool = True) -> Iterator[pa.Table]:
                for path in source.parts():
                    names = set(storage.read_schema(path).names)
                    part = storage.read_table(path, columns=[n for n in columns if n in names])
                    part = with_verdict_columns(part)
                    yield survivor_rule(part.filter(alive(part)) if live_only else part)

            partitions = partition_count(self.live_rows(source.path.name))
            verdicts = duplicate_verdicts(signatures(), kinds, c.phash_distance, partitions,
                                          storage.scratch(self.out, "dedup-work"))
            if semantic:  # on the rows exact and pHash left: clusters spilled to disk, embeddings from a memory map
                exact_rows = verdicts[ROW].to_numpy()

                def judged_parts() -> Iterator[pa.Table]:  # every row, in checkpoint order: row i is vector row i
                    return (_with_part_verdicts(part, verdicts, exact_rows) for part in signatures(live_only=False))

                folder = storage.scratch(self.out, "dedup-embeddings")
                try:
                    vectors, has_vector = embedding_map(source, folder)
                    found = semantic_verdicts(judged_parts, vectors, has_vector, c.semdedup_threshold,
                                              c.semdedup_clusters, c.seed, folder / "clusters")
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
                verdicts = pa.concat_tables([verdicts, found]).sort_by(ROW)
            rows = verdicts[ROW].to_numpy()
            # No later stage reads the embeddings (1.5 KB a row; a rerun's dedup reads them from score's checkpoint):
            # they stay out of dedup's and select's checkpoints and out of the shard stage's memory.
            carried = source.iter_parts() if EMBEDDING not in present else (
                storage.read_table(path, columns=[n for n in storage.read_schema(path).names if n != EMBEDDING])
                for path in source.parts())
            for index, part in enumerate(carried):
                part = _with_part_verdicts(part, verdicts, rows)
                target.write_split(index, part, alive(part))
            return {"kinds": kinds, "semantic": "ran" if semantic else "skipped: no embeddings (scores from metadata)"}

        return self._timed("dedup", body, force=force)

    def select(self, force: bool = False) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            c, target = self.config, self.checkpoint("select")
            target.reset()
            judge = steps.bound("select", c, self.facts)
            for index, part in enumerate(self.source("select").iter_parts()):
                target.write_part(index, judge(part))
            lost = self.not_reconsidered()
            if lost:
                log.warning("%d rows that these thresholds would keep were dropped on their metadata before the "
                            "download (%s) and are not brought back; a new `curate run` into another --output with "
                            "these thresholds fetches them", sum(lost.values()), lost)
            judged_by = plan.select_arguments(c)
            return {**judged_by, "judged_by": judged_by, "not_reconsidered": lost}

        return self._timed("select", body, force=force)


def _with_part_verdicts(part: pa.Table, verdicts: pa.Table, rows: np.ndarray) -> pa.Table:
    """A checkpoint part with the global step's verdicts on its rows (verdicts sorted by ROW; rows its ROW column)."""
    low, high = (part[ROW][0].as_py(), part[ROW][-1].as_py() + 1) if part.num_rows else (0, 0)
    return apply_verdicts(part, rows_between(verdicts, rows, low, high))


def embedding_map(checkpoint: io.Checkpoint, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every row's embedding in checkpoint order (zeros where it has none), in a memory map on local disk, and which
    rows have one: semantic dedup reads it a batch or a cluster at a time, so memory is not n x 768 floats."""
    from curate.stages.semantic import embedding_matrix

    parts = checkpoint.parts()
    schemas = [storage.read_schema(path) for path in parts]
    kind = next(schema.field(EMBEDDING).type for schema in schemas if EMBEDDING in schema.names)
    rows = sum(storage.parquet_file(path).metadata.num_rows for path in parts)
    folder.mkdir(parents=True, exist_ok=True)
    vectors = np.lib.format.open_memmap(folder / "embeddings.npy", mode="w+", shape=(rows, kind.list_size),
                                        dtype=kind.value_type.to_pandas_dtype())
    has_vector = np.zeros(rows, dtype=bool)
    start = 0
    for path, schema in zip(parts, schemas, strict=True):
        if EMBEDDING not in schema.names:
            start += storage.parquet_file(path).metadata.num_rows
            continue
        column = storage.read_table(path, columns=[EMBEDDING])[EMBEDDING]
        valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
        if valid.any():
            vectors[start + np.flatnonzero(valid)] = embedding_matrix(column.filter(pa.array(valid)))
        has_vector[start:start + len(valid)] = valid
        start += len(valid)
    vectors.flush()
    return vectors, has_vector


def job_groups(indices: list[int], live: list[int], rows: int) -> list[list[int]]:
    """Consecutive parts joined until a job holds about `rows` live rows: with few live rows spread over many parts
    (a 10M-row file with 1,000 survivors), a job still keeps every download thread busy."""
    groups: list[list[int]] = []
    count = rows
    for index, alive_rows in zip(indices, live, strict=True):
        if count >= rows or (groups and index != groups[-1][-1] + 1):
            groups.append([])
            count = 0
        groups[-1].append(index)
        count += alive_rows
    return groups


def _load_scorer(config: Config) -> Any:
    from curate.stages.score import load_scorer

    return load_scorer(config)

