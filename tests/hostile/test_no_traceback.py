"""No traceback reaches a user for an input problem: one message naming the file, column or option, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.testing.server import ImageServer, Response
from tests.hostile.conftest import jpeg, row, serve, write_rows
from tests.hostile.test_rows import row_cases

RUN = ["--allow-loopback", "--world-size", "1", "--workers-per-rank", "1", "--min-size", "32", "--image-size", "64",
       "--scores", "metadata", "--dedup", "url", "--timeout", "5"]


def _bad_inputs(folder: Path, server: ImageServer) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, text the message must hold)."""
    good = write_rows(folder / "good.parquet", [row(serve(server, "/g.jpg", Response(jpeg(400))), "one")])
    data = good.read_bytes()
    (folder / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (folder / "garbage.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    (folder / "text.parquet").write_text("url,caption\nhttp://x/a.jpg,a\n")
    pq.write_table(pa.table({"URL": [1, 2], "TEXT": ["a", "b"]}), folder / "int-urls.parquet")
    pq.write_table(pa.table({"link": ["http://x/a"], "TEXT": ["a"]}), folder / "no-url.parquet")
    pq.write_table(pa.table({"URL": ["http://x/a"], "url": ["http://x/b"]}), folder / "two-urls.parquet")
    pq.write_table(pa.table({"URL": ["http://x/a"], "WIDTH": pa.array([[1, 2]])}), folder / "list-width.parquet")
    write_rows(folder / "empty.parquet", [], schema=pq.read_schema(good))
    (folder / "empty-dir").mkdir()
    (folder / "bad.toml").write_text("threshold = [unclosed\n")
    (folder / "unknown.toml").write_text("thresold = 5\n")
    (folder / "a-file").write_text("not a folder")
    out = str(folder / "out")  # one output for all: a refused run must leave nothing that refuses the next

    def run(*inputs: str, extra: tuple[str, ...] = ()) -> list[str]:
        return ["run", *inputs, "--output", out, *RUN, *extra]

    return {
        "truncated": (run(str(folder / "truncated.parquet")), "truncated.parquet"),
        "garbage": (run(str(folder / "garbage.parquet")), "garbage.parquet"),
        "csv named parquet": (run(str(folder / "text.parquet")), "text.parquet"),
        "integer urls": (run(str(folder / "int-urls.parquet")), "'URL'"),
        "no url column": (run(str(folder / "no-url.parquet")), "no-url.parquet"),
        "two url columns": (run(str(folder / "two-urls.parquet")), "'URL' and 'url'"),
        "list width": (run(str(folder / "list-width.parquet")), "'WIDTH'"),
        "no rows": (run(str(folder / "empty.parquet")), "no rows"),
        "missing file": (run(str(folder / "nowhere.parquet")), "nowhere.parquet"),
        "empty folder": (run(str(folder / "empty-dir")), "empty-dir"),
        "bad toml": (run(str(good), extra=("--config", str(folder / "bad.toml"))), "bad.toml"),
        "unknown toml key": (run(str(good), extra=("--config", str(folder / "unknown.toml"))), "thresold"),
        "output is a file": (["run", str(good), "--output", str(folder / "a-file"), *RUN], "a-file"),
        "select on no output": (["select", str(folder / "empty-dir")], "empty-dir"),
        "shard on no output": (["shard", str(folder / "nowhere")], "nowhere"),
        "report on no output": (["report", str(folder / "empty-dir")], "empty-dir"),
    }


def test_every_bad_input_gets_one_message_and_exit_2(tmp_path: Path, server: ImageServer) -> None:
    runner = CliRunner()
    failures = {}
    for name, (command, expected) in _bad_inputs(tmp_path, server).items():
        result = runner.invoke(app, command)
        text = " ".join(result.output.split())
        if result.exit_code != 2 or not isinstance(result.exception, SystemExit) or expected not in text:
            failures[name] = (result.exit_code, repr(result.exception), text[-300:])
    assert not failures, failures
    good = tmp_path / "good.parquet"
    result = runner.invoke(app, ["run", str(good), "--output", str(tmp_path / "out"), *RUN])
    assert result.exit_code == 0, result.output  # the refused runs before it left no run.json behind


def test_hostile_rows_run_through_the_cli_without_a_traceback(tmp_path: Path, server: ImageServer) -> None:
    rows = [dict(r, hash=r.get("hash")) for r, _ in row_cases(server)]
    path = write_rows(tmp_path / "hostile.parquet", rows)
    result = subprocess.run([sys.executable, "-m", "curate", "run", str(path), "--output", str(tmp_path / "out"),
                             *RUN], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["garbage", "two url columns"])
def test_a_real_process_prints_no_traceback(tmp_path: Path, server: ImageServer, name: str) -> None:
    command, expected = _bad_inputs(tmp_path, server)[name]
    result = subprocess.run([sys.executable, "-m", "curate", *command], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert expected in " ".join(result.stderr.split())
