"""Shared pieces of the benchmarks: timing with medians and spread, the machine, bench/results/latest.json."""

from __future__ import annotations

import argparse
import bisect
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "work"  # git-ignored: generated images, corpora, outputs
RESULTS = BENCH / "results" / "latest.json"
VENV_BIN = ROOT / ".venv" / "bin"


def tool(name: str) -> str:
    """The venv's console script when there is one (make bench runs outside an activated venv)."""
    path = VENV_BIN / name
    return str(path) if path.exists() else name


@dataclass
class Series:
    """Repeated measurements of one figure (warm-up already excluded)."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def describe(self, digits: int = 2) -> str:
        low, high = min(self.values), max(self.values)
        return (f"{self.name}: median {self.median:.{digits}f} {self.unit} "
                f"(min {low:.{digits}f} – max {high:.{digits}f}, n={len(self.values)})")


def interleaved(bodies: dict[str, Callable[[], float]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every body once per round, alternating, so load from other processes falls on all of them alike."""
    results: dict[str, list[float]] = {name: [] for name in bodies}
    for round_index in range(warmup + repeats):
        for name, body in bodies.items():
            value = body()
            if round_index >= warmup:
                results[name].append(value)
    return results


def wall(command: Sequence[str], cpu: CpuTrace | None = None, **kwargs: Any) -> float:
    """Seconds a command takes; raises with its output when it fails. With a CpuTrace, its process tree's CPU is
    sampled while it runs."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # albumentations (img2dataset) phones home on import
    started = time.perf_counter()
    with subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          **kwargs) as process:
        with cpu.sampling(process.pid) if cpu is not None else contextlib.nullcontext():
            stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        output = f"{stdout[-2000:]}\n{stderr[-4000:]}"
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}:\n{output}")
    return seconds


class CpuTrace:
    """The CPU time (user + system, all threads) of a command's process tree, sampled every `every` seconds from
    /proc while it runs, so that between(start, end) is the CPU its processes spent inside a span of wall-clock time:
    what a tool costs per item with its start-up left out, whatever the other processes on the machine did (the
    server, the load). A process that ends keeps the CPU last seen (at most one interval of it is missed)."""

    TICK = os.sysconf("SC_CLK_TCK")  # /proc's unit of CPU time

    def __init__(self, every: float = 0.1) -> None:
        self.every = every
        self.samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)

    @contextlib.contextmanager
    def sampling(self, root: int) -> Iterator[None]:
        self.samples.clear()
        seen: dict[int, float] = {}
        done = threading.Event()

        def sample() -> None:
            while True:
                self._add(root, seen)
                if done.wait(self.every):
                    return

        sampler = threading.Thread(target=sample, name="cpu-trace", daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()

    def _add(self, root: int, seen: dict[int, float]) -> None:
        children: dict[int, list[int]] = {}
        cpu: dict[int, float] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
            pid = int(entry.name)
            children.setdefault(int(fields[1]), []).append(pid)
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self.TICK
        tree, frontier = {root}, [root]
        while frontier:
            below = children.get(frontier.pop(), [])
            tree.update(below)
            frontier.extend(below)
        seen.update({pid: cpu[pid] for pid in tree if pid in cpu})
        self.samples.append((time.time(), sum(seen.values())))

    def at(self, when: float) -> float:
        """CPU seconds spent by `when`, interpolated between the samples around it."""
        times = [t for t, _ in self.samples]
        i = bisect.bisect_left(times, when)
        if i == 0:
            return self.samples[0][1]
        if i == len(times):
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (when - t0) / (t1 - t0) if t1 > t0 else c1

    def between(self, start: float, end: float) -> float:
        return self.at(end) - self.at(start)


# Runs a command as its own fork and reports the child's peak RSS (ru_maxrss, KiB) on stderr's last line. A child
# spawned straight from a large process reports at least that process's memory at the spawn (Linux keeps the
# pre-exec high-water mark in ru_maxrss), so a benchmark that built a corpus in-process would measure itself.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measured_command(command: Sequence[str]) -> list[str]:
    """command run through the small launcher: its peak RSS in KiB is the last line it writes to stderr."""
    return [sys.executable, "-c", _LAUNCHER, *command]


def machine() -> str:
    """CPU model, cores and OS, as bench_dedup describes the machine."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores, {platform.system()}"


def merge_results(figures: dict[str, Any], path: Path = RESULTS) -> dict[str, Any]:
    """Update these keys of latest.json, keeping every other benchmark's keys; atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(figures)
    results["machine"] = machine()
    results["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
    return results


def cores() -> int:
    return os.cpu_count() or 1


def bench_main(doc: str | None, argv: list[str] | None, measure: Callable[[int, int], dict[str, Any]],
               rows_help: str, repeats: int = 3) -> dict[str, Any]:
    """The --rows/--repeats/--no-write command line every corpus benchmark shares: measure, then merge the figures."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help=rows_help)
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds after a warm-up ({repeats})")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/results/latest.json")
    args = parser.parse_args(argv)
    figures = measure(args.rows, args.repeats)
    if not args.no_write:
        merge_results(figures)
    return figures
