"""Shared pieces of the benchmarks: timing with medians and spread, the machine, bench/results/latest.json."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


def wall(command: Sequence[str], **kwargs: Any) -> float:
    """Seconds a command takes; raises with its output when it fails."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # albumentations (img2dataset) phones home on import
    started = time.perf_counter()
    done = subprocess.run(list(command), capture_output=True, text=True, env=env, **kwargs)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        output = f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{output}")
    return seconds


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
