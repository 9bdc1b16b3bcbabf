"""A real Spark standalone cluster on 127.0.0.1: one Master and two Workers started with the pyspark package's own
`spark-class` (no download), each worker with its own work folder (its executors run there), 1 core and 1 GB."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SPARK_BIN = Path(sys.executable).parent  # pyspark installs spark-class and spark-submit next to the interpreter


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def clean_env() -> dict[str, str]:
    """The environment of the cluster's processes: no PYTHONPATH, so executors import only the shipped wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPARK_HOME", "PYSPARK_SUBMIT_ARGS")}
    env.update(SPARK_LOCAL_IP="127.0.0.1", SPARK_DAEMON_MEMORY="256m", SPARK_NO_DAEMONIZE="1")
    return env


def children(pid: int) -> list[int]:
    """Every descendant of pid (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Cluster:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.work_dirs: list[Path] = []

    def _start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - open for the process's life
        process = subprocess.Popen([str(SPARK_BIN / "spark-class"), *args], stdout=log, stderr=subprocess.STDOUT,
                                   env=clean_env(), cwd=self.folder, start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, text: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no {text!r} after {timeout} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def start(self, workers: int = 2) -> None:
        self._start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
                    str(self.port), "--webui-port", str(free_port()))
        self.wait_for("master", "I have been elected leader")
        for index in range(workers):
            work = self.folder / f"worker-{index}"
            work.mkdir()
            self.work_dirs.append(work)
            self._start(f"worker-{index}", "org.apache.spark.deploy.worker.Worker", self.url, "--host", "127.0.0.1",
                        "--port", str(free_port()), "--webui-port", str(free_port()), "--cores", "1", "--memory",
                        "1g", "--work-dir", str(work))
        for index in range(workers):
            self.wait_for(f"worker-{index}", "Successfully registered with master")

    def kill_worker(self, index: int) -> list[int]:
        """SIGKILL worker `index`, its executor and that executor's Python workers, as a lost machine."""
        worker = self.processes[1 + index]
        doomed = [worker.pid, *children(worker.pid)]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.wait(30)
        return doomed

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                for pid in [*children(process.pid), process.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.wait(30)
