"""The local engine: stages over parquet parts in-process, downloads in a process pool, checkpoints per stage."""

from __future__ import annotations

import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import io
from curate.config import Config
from curate.fetch import FetchPolicy
from curate.schema import AESTHETIC, CAPTION, DROP_REASON, JPG, PASSES_THRESHOLDS, PWATERMARK, ROW
from curate.stages import dedup, prefilter, select
from curate.stages.download import DownloadOptions, download
from curate.stages.ingest import check_input_schema, normalize
from curate.stages.verdict import alive

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
STAGES = ["ingest", "prefilter", "download", "score", "dedup", "select", "shard"]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


class LocalRun:
    """One output folder; each stage reads the previous stage's checkpoint and writes its own."""

    def __init__(self, output: str | Path, config: Config, progress: Progress | None = None) -> None:
        self.out = Path(output)
        self.config = config
        self.progress = progress or _quiet
        self.timings: dict[str, float] = {}

    def checkpoint(self, stage: str) -> io.Checkpoint:
        return io.Checkpoint(self.out, stage)

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
    @staticmethod
    def check_inputs(inputs: list[str]) -> list[str]:
        """The input files, each one's schema checked before any work starts; raises naming the file."""
        files, rows = io.expand_inputs(inputs), 0
        for path in files:
            schema, count = io.parquet_footer(path)  # raises naming the file when it is no parquet
            try:
                check_input_schema(schema)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error
            rows += count
        if rows == 0:
            raise ValueError(f"the input files hold no rows: {files}")
        return files

    def ingest(self, inputs: list[str], files: list[str] | None = None) -> dict[str, Any]:
        """Every input row to the canonical table; `files` are check_inputs' result when the caller has it."""
        files = files if files is not None else self.check_inputs(inputs)

        def body() -> dict[str, Any]:
            checkpoint, rows, part = self.checkpoint("ingest"), 0, 0
            checkpoint.reset()
            for path in files:
                for batch in io.read_parquet_batches(path, self.config.batch_size_rows):
                    checkpoint.write_part(part, normalize(batch, rows))
                    rows, part = rows + batch.num_rows, part + 1
            if rows == 0:
                raise ValueError(f"the input files hold no rows: {files}")
            return {"input_files": files, "input_rows": rows, "parts": part}

        return self._timed("ingest", body)

    def score_column_nulls(self) -> dict[str, int]:
        """Null count of each LAION score column every ingested part has (reads those two columns only)."""
        nulls: dict[str, int] = {}
        for index, path in enumerate(self.checkpoint("ingest").parts()):
            names = pq.read_schema(path).names
            present = [c for c in (AESTHETIC, PWATERMARK) if c in names and (index == 0 or c in nulls)]
            columns = pq.read_table(path, columns=present)
            nulls = {c: nulls.get(c, 0) + columns[c].null_count for c in present}
        return nulls

    def resolve_scores(self) -> str:
        """model/metadata, deciding `auto` from whether every row carries LAION's score columns."""
        if self.config.scores != "auto":
            return self.config.scores
        nulls = self.score_column_nulls()
        return "metadata" if all(nulls.get(c) == 0 for c in (AESTHETIC, PWATERMARK)) else "model"

    def require_metadata_scores(self) -> None:
        if AESTHETIC not in self.score_column_nulls():
            raise ValueError(
                "--scores metadata needs an AESTHETIC_SCORE/aesthetic column in every input file and the input "
                "lacks it; use --scores model to compute scores from the images"
            )

    # -- prefilter --------------------------------------------------------------------------------------
    def prefilter(self, scores: str) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            source, target = self.checkpoint("ingest"), self.checkpoint("prefilter")
            target.reset()
            firsts = None
            if "url" in self.config.dedup:
                columns = ["key", ROW, "url", CAPTION]
                firsts = prefilter.merge_first_rows([prefilter.first_rows(p) for p in source.iter_parts(columns)])
            judged_by = prefilter_thresholds(self.config, scores)
            live = 0
            for index, part in enumerate(source.iter_parts()):
                part = prefilter.prefilter(part, firsts, **judged_by)
                live += pc.sum(alive(part).cast("int64")).as_py() or 0
                target.write_part(index, part)
            return {"parts": len(source.parts()), "live_rows": live, "judged_by": judged_by}

        return self._timed("prefilter", body)

    # -- download ---------------------------------------------------------------------------------------
    def download_options(self) -> DownloadOptions:
        c = self.config
        policy = FetchPolicy(timeout=c.timeout, max_bytes=c.max_image_bytes,
                             allow_private_network=c.allow_private_network, allow_loopback=c.allow_loopback,
                             allow_link_local=c.allow_link_local,
                             disallowed_directives=tuple(d.lower() for d in c.disallowed_header_directives),
                             user_agent_token=c.user_agent_token)
        return DownloadOptions(image_size=c.image_size, resize_mode=c.resize_mode, threads=c.threads, policy=policy)

    def download(self) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            source, target = self.checkpoint("prefilter"), self.checkpoint("download")
            todo = [i for i in range(len(source.parts())) if not target.has_part(i)]
            total, done = len(source.parts()), len(source.parts()) - len(todo)
            self.progress("download", done, total)
            jobs = [(str(self.out), i, self.download_options()) for i in todo]
            if self.config.processes > 1 and len(jobs) > 1:
                # spawn, not fork: the parent may hold torch's thread pools (models load before downloading).
                context = multiprocessing.get_context("spawn")
                with ProcessPoolExecutor(self.config.processes, mp_context=context) as pool:
                    for _ in pool.map(_download_part, jobs):
                        done += 1
                        self.progress("download", done, total)
            else:
                for job in jobs:
                    _download_part(job)
                    done += 1
                    self.progress("download", done, total)
            return {"parts": total}

        return self._timed("download", body)

    # -- score ------------------------------------------------------------------------------------------
    def score(self, scores: str) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            source, target = self.checkpoint("download"), self.checkpoint("score")
            scorer = _load_scorer(self.config) if scores == "model" else None
            for index, part in enumerate(source.iter_parts()):
                if target.has_part(index):
                    continue
                part = part.append_column("jpg_bytes", pc.binary_length(part[JPG]))
                if scorer is not None:
                    from curate.stages.score import score_images

                    part = score_images(part, scorer)
                else:
                    part = select.scores_from_metadata(part)
                target.write_part(index, part.drop_columns([JPG]))
            return {"scores": scores}

        return self._timed("score", body)

    # -- dedup and select -------------------------------------------------------------------------------
    def live_rows(self, stage: str) -> int:
        """Rows no stage has dropped yet in a finished stage's checkpoint (reads the drop_reason column only)."""
        return sum(part.num_rows - part[DROP_REASON].null_count
                   for part in self.checkpoint(stage).iter_parts([DROP_REASON]))

    def not_reconsidered(self) -> dict[str, int]:
        """Rows prefilter dropped on metadata that this run's thresholds would keep: a re-cut cannot bring them back."""
        counts: dict[str, int] = {}
        for part in self.checkpoint("prefilter").iter_parts():
            c = self.config
            for reason, count in prefilter.recoverable(part, c.min_size, c.threshold, c.max_watermark,
                                                       c.max_unsafe).items():
                counts[reason] = counts.get(reason, 0) + count
        return counts

    def dedup(self, force: bool = False) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            c, kinds = self.config, self.config.dedup
            # Copies that pass the select thresholds survive before copies that fail them (the survivor rule).
            table = select.with_threshold_pass(self.checkpoint("score").read(), c.min_size, c.threshold,
                                               c.max_watermark, c.max_unsafe)
            if "exact" in kinds:
                table = dedup.flag_exact_duplicates(table)
            if "phash" in kinds:
                table = dedup.flag_phash_duplicates(table, self.config.phash_distance)
            semantic = "semantic" in kinds and "embedding" in table.column_names
            if semantic:
                from curate.stages.semantic import flag_semantic_duplicates

                table = flag_semantic_duplicates(table, self.config.semdedup_threshold,
                                                 self.config.semdedup_clusters, self.config.seed)
            self.checkpoint("dedup").write_part(0, table.drop_columns([PASSES_THRESHOLDS]))
            return {"kinds": kinds, "semantic": "ran" if semantic else "skipped: no embeddings (scores from metadata)"}

        return self._timed("dedup", body, force=force)

    def select(self, force: bool = False) -> dict[str, Any]:
        def body() -> dict[str, Any]:
            table = self.checkpoint("dedup").read()
            c = self.config
            self.checkpoint("select").write_part(
                0, select.select(table, c.min_size, c.threshold, c.max_watermark, c.max_unsafe))
            lost = self.not_reconsidered()
            if lost:
                log.warning("%d rows that these thresholds would keep were dropped on their metadata before the "
                            "download (%s) and are not brought back; a new `curate run` into another --output with "
                            "these thresholds fetches them", sum(lost.values()), lost)
            judged_by = {"threshold": c.threshold, "min_size": c.min_size, "max_watermark": c.max_watermark,
                         "max_unsafe": c.max_unsafe}
            return {**judged_by, "judged_by": judged_by, "not_reconsidered": lost}

        return self._timed("select", body, force=force)


def prefilter_thresholds(config: Config, scores: str) -> dict[str, Any]:
    """The prefilter's arguments: metadata scores are judged before download only when they are the scores."""
    on_metadata = scores == "metadata"
    return {"min_size": config.min_size, "max_watermark": config.max_watermark if on_metadata else None,
            "max_unsafe": config.max_unsafe, "aesthetic_threshold": config.threshold if on_metadata else None}


def _download_part(job: tuple[str, int, DownloadOptions]) -> None:
    """One prefilter part to one download part (a picklable unit of work for the process pool)."""
    out, index, options = job
    part = io.Checkpoint(out, "prefilter").parts()[index]
    io.Checkpoint(out, "download").write_part(index, download(pq.read_table(part), options))


def _load_scorer(config: Config) -> Any:
    from curate.stages.score import load_scorer

    return load_scorer(config)

