"""The local engine's download pool: worker processes pull groups of prefilter parts from one queue and stream them
through one fetch session and one thread pool each, writing every download part as soon as its rows are done.

A worker never waits on the last, slowest URLs of a group with its other threads idle: the next group's rows are
fetched meanwhile (curate.stages.download.download_stream). The span from the first part's start to the last part's
end in any worker is the stage's work time, its processes' start-up excluded (what img2dataset's shard times show).
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pyarrow as pa

from curate.net.origins import OriginCache
from curate.stages.consent import origins_table
from curate.stages.download import DownloadOptions, download, download_stream, warm_up
from curate.stages.verdict import alive
from curate.storage import checkpoint as io
from curate.storage import files as storage

Span = tuple[float, float]  # wall-clock start and end of a worker's work (time.time(), comparable across processes)
_tasks: Any = None  # the worker processes' queues, set by _initialize
_reports: Any = None
PARENT_POLL = 0.5  # seconds between a worker's checks that the run that started it is alive


def download_parts(out: str, edge: tuple[str, str], groups: list[list[int]], options: DownloadOptions, stored: bool,
                   processes: int, progress: Callable[[int], None]) -> Span | None:
    """The parts of checkpoint edge[0] to those of edge[1] (the step before download, and download), `groups` of them
    at a time; progress(parts) as parts are written. Returns
    the span from the first part's start to the last part's end (worker start-up excluded); None with no parts."""
    if processes <= 1:
        tasks: Any = queue.SimpleQueue()
        _fill(tasks, groups, 1)
        warm_up()  # start-up, as in a worker process
        return _span([_work(out, edge, options, stored, tasks, progress)])
    # spawn, not fork: the parent may hold torch's thread pools (models load before downloading).
    context = multiprocessing.get_context("spawn")
    tasks, reports = context.Queue(), context.Queue()
    _fill(tasks, groups, processes)
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_initialize,
                             initargs=(tasks, reports, os.getpid())) as pool:
        futures = [pool.submit(_worker, out, edge, options, stored) for _ in range(processes)]
        while not all(future.done() for future in futures):
            try:
                progress(reports.get(timeout=0.2))
            except queue.Empty:
                pass
        spans = [future.result() for future in futures]  # a worker's error is raised here
    while True:  # reports still in the pipe when the last worker finished
        try:
            progress(reports.get_nowait())
        except queue.Empty:
            break
    return _span(spans)


def _fill(tasks: Any, groups: list[list[int]], workers: int) -> None:
    for group in groups:
        tasks.put(group)
    for _ in range(workers):
        tasks.put(None)  # one end marker per worker call


def _span(spans: list[Span | None]) -> Span | None:
    found = [span for span in spans if span is not None]
    return (min(start for start, _ in found), max(end for _, end in found)) if found else None


def _initialize(tasks: Any, reports: Any, parent: int) -> None:
    global _tasks, _reports
    _tasks, _reports = tasks, reports
    warm_up()  # the modules the first image loads lazily: start-up, outside the work span
    threading.Thread(target=_exit_with_parent, args=(parent,), name="curate-parent-watch", daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A run killed with SIGKILL runs no cleanup, and its workers would wait on their queues forever (each holding
    its fetch session and a few hundred MB): a worker whose parent is gone exits."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL)
    os._exit(1)


def _worker(out: str, edge: tuple[str, str], options: DownloadOptions, stored: bool) -> Span | None:
    return _work(out, edge, options, stored, _tasks, _reports.put)


def _work(out: str, edge: tuple[str, str], options: DownloadOptions, stored: bool, tasks: Any,
          report: Callable[[int], None]) -> Span | None:
    """Groups from tasks until the end marker; None when there were none left for this worker."""
    started = time.time()
    groups: Iterator[list[int]] = iter(tasks.get, None)
    first = next(groups, None)
    if first is None:
        return None
    groups = itertools.chain([first], groups)
    source, target = io.Checkpoint(out, edge[0]), io.Checkpoint(out, edge[1])
    if stored:
        for group in groups:
            _decode_stored_group(source, target, group, options)
            report(len(group))
        return started, time.time()
    indices: list[int] = []  # the part index of each table in the stream
    origins = _load_origins(target)

    def tables() -> Iterator[pa.Table]:
        for group in groups:
            for index in group:
                part = storage.parquet_file(source.part_path(index)).read()  # one file: no pyarrow.dataset (~0.3 s)
                if part.num_rows:
                    indices.append(index)
                    yield part
                else:  # no rows to fetch: written at once, with the download columns
                    empty = download(part, options, origins)
                    target.write_split(index, empty, alive(empty))
                    report(1)

    stream = download_stream(tables(), options, origins=origins)
    for number, pieces in itertools.groupby(stream, key=lambda item: item[0]):
        target.write_split_pieces(indices[number], (chunk for _, chunk in pieces), alive)
        _save_origins(target, indices[number], origins)
        report(1)
    return started, time.time()


def _load_origins(target: io.Checkpoint) -> OriginCache:
    """The opt-out files earlier attempts of this run fetched (one origins part per download part that fetched any)."""
    origins = OriginCache(track=True)
    for path in storage.glob(target.path, "origins-*.parquet"):
        origins.load(storage.read_table(path).to_pylist())
    return origins


def _save_origins(target: io.Checkpoint, index: int, origins: OriginCache) -> None:
    """The files fetched since the last part, beside that part (atomically), so a resume never asks for them again."""
    learned = origins.learned()
    if learned:
        io.write_table(origins_table(learned), target.path / f"origins-{index:06d}.parquet")


def _decode_stored_group(source: io.Checkpoint, target: io.Checkpoint, group: list[int],
                         options: DownloadOptions) -> None:
    """WebDataset input: the images are in the rows already; each part decoded, checked and written in slices."""
    from curate.stages.stored import decode_stored_chunks

    for index in group:
        part = storage.read_table(source.part_path(index))
        target.write_split_pieces(index, decode_stored_chunks(part, options), alive)
