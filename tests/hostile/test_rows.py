"""Hostile metadata rows and files: rows end kept or in the ledger; bad files stop the run naming file and column."""

from __future__ import annotations

import math
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curate.cli import app
from curate.pipeline.run import run_local
from curate.stages.shard import check_key, sample_bytes
from curate.testing.server import ImageServer, Response
from tests.hostile.conftest import hostile_config, jpeg, outcomes, row, run_rows, serve, write_rows

LONG_CAPTION = "word " * 20_000  # 100 KB
ODD_CAPTIONS = ["tab\tbell\x07nul\x00escape\x1b[31m del\x7f", "line one\nline two\r\nline three", LONG_CAPTION]


def row_cases(server: ImageServer) -> list[tuple[dict[str, Any], str]]:
    """(row, expected outcome); each row gets its own image, so only the metadata decides."""
    def url(i: int) -> str:
        return serve(server, f"/{i}.jpg", Response(jpeg(100 + i)))

    return [
        (row(url(0), None), "empty_caption"), (row(url(1), ""), "empty_caption"),
        (row(url(2), " \t\n "), "empty_caption"),
        *[(row(url(3 + i), caption), "kept") for i, caption in enumerate(ODD_CAPTIONS)],
        (row(url(6), "nan width", WIDTH=math.nan), "kept"), (row(url(7), "negative", WIDTH=-5.0), "kept"),
        (row(url(8), "huge", WIDTH=1e30, HEIGHT=1e30), "kept"), (row(url(9), "zero", HEIGHT=0.0), "kept"),
        (row(url(10), "small", WIDTH=10.0), "metadata_low_resolution"),
        (row(url(11), "pw high", pwatermark=1.5), "invalid_metadata_score"),
        (row(url(12), "pw low", pwatermark=-0.2), "invalid_metadata_score"),
        (row(url(13), "pw nan", pwatermark=math.nan), "invalid_metadata_score"),
        (row(url(14), "aesthetic nan", AESTHETIC_SCORE=math.nan), "invalid_metadata_score"),
        (row(url(15), "watermarked", pwatermark=0.9), "metadata_watermark"),
        (row(url(16), "first of a hash", hash=42), "kept"),
        (row(url(17), "same hash, other url", hash=42), "key_collision"),
        (row(url(18), "repeated"), "kept"), (row(url(18), "repeated"), "duplicate_url"),
    ]


def test_every_row_case_ends_with_its_reason(tmp_path: Path, server: ImageServer) -> None:
    cases = row_cases(server)
    rows = [dict(r, hash=r.get("hash")) for r, _ in cases]
    result = run_rows(tmp_path, rows, min_size=32)
    got = outcomes(result, rows)
    wrong = {i: (rows[i]["TEXT"] and rows[i]["TEXT"][:30], expected, got[i])
             for i, (_, expected) in enumerate(cases) if got[i] != expected}
    assert not wrong, f"{len(cases) - len(wrong)} of {len(cases)} right; wrong: {wrong}"
    texts = tar_texts(result["out"])
    for caption in ODD_CAPTIONS:  # control characters and newlines stay inside KEY.txt, byte for byte
        assert caption in texts


def tar_texts(out: Path) -> set[str]:
    texts, names = set(), []
    for shard in (out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                names.append(member.name)
                if member.name.endswith(".txt"):
                    texts.add(tar.extractfile(member).read().decode())  # type: ignore[union-attr]
    assert all(check_key(n.rsplit(".", 1)[0]) and "/" not in n for n in names)
    return texts


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string array holding bytes that are not UTF-8 (a lone surrogate, Latin-1), as some writers produce."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                            pa.py_buffer(b"".join(values))])


def test_invalid_utf8_in_captions_and_urls_is_repaired_not_fatal(tmp_path: Path, server: ImageServer) -> None:
    urls = [serve(server, f"/u{i}.jpg", Response(jpeg(200 + i))) for i in range(3)]
    captions = [b"lone surrogate \xed\xa0\x80 here", b"latin-1 caf\xe9", b"fine"]
    table = pa.table({"URL": urls, "TEXT": invalid_utf8_strings(captions), "WIDTH": [96.0] * 3,
                      "HEIGHT": [64.0] * 3, "AESTHETIC_SCORE": [6.0] * 3, "pwatermark": [0.1] * 3,
                      "extra": invalid_utf8_strings([b"\xff", b"ok", b"\xc3"])})
    pq.write_table(table, tmp_path / "bad-utf8.parquet")
    stats = run_local([str(tmp_path / "bad-utf8.parquet")], tmp_path / "out", hostile_config())
    assert stats["kept"] == 3
    texts = tar_texts(tmp_path / "out")
    assert "lone surrogate \ufffd\ufffd\ufffd here" in texts and "latin-1 caf\u00e9" in texts  # cp1252, not U+FFFD
    repairs = pq.read_table(tmp_path / "out" / "samples.parquet").to_pydict()
    assert dict(zip(repairs["caption"], repairs["caption_repair"], strict=True)) == {
        "lone surrogate \ufffd\ufffd\ufffd here": "replaced", "latin-1 caf\u00e9": "cp1252", "fine": None}


@pytest.mark.parametrize("key", ["../../etc/passwd", "a/b", "abc\0def", "", "0123456789ABCDEF", "0" * 17, None])
def test_a_key_never_becomes_a_path(key: Any) -> None:
    with pytest.raises(ValueError):
        sample_bytes(key, b"jpg", "caption", {})


def _schema_error(tmp_path: Path, table: pa.Table) -> str:
    bad = tmp_path / "odd-schema.parquet"
    pq.write_table(table, bad)
    with pytest.raises(ValueError) as error:
        run_local([str(bad)], tmp_path / "out", hostile_config())
    assert not list((tmp_path / "out" / "stages" / "ingest").glob("part-*")), "no work before the error"
    return str(error.value)


def test_unexpected_schema_is_refused_naming_file_and_column(tmp_path: Path) -> None:
    message = _schema_error(tmp_path, pa.table({"URL": [1, 2], "TEXT": ["a", "b"]}))
    assert "odd-schema.parquet" in message and "'URL'" in message
    message = _schema_error(tmp_path, pa.table({"URL": ["http://x/a"], "WIDTH": pa.array([[1, 2]])}))
    assert "odd-schema.parquet" in message and "'WIDTH'" in message
    message = _schema_error(tmp_path, pa.table({"link": ["http://x/a"], "TEXT": ["a"]}))
    assert "odd-schema.parquet" in message and "URL" in message


def test_empty_file_among_others_adds_nothing(tmp_path: Path, server: ImageServer) -> None:
    good = write_rows(tmp_path / "a.parquet", [row(serve(server, "/e.jpg", Response(jpeg(300))), "one")])
    empty = write_rows(tmp_path / "b.parquet", [], schema=pq.read_schema(good))
    stats = run_local([str(good), str(empty)], tmp_path / "out", hostile_config())
    assert stats["input_rows"] == stats["kept"] == 1
    with pytest.raises(ValueError, match="no rows"):
        run_local([str(empty)], tmp_path / "out-empty", hostile_config())


def test_corrupt_parquet_is_refused_before_any_work(tmp_path: Path, server: ImageServer) -> None:
    good = write_rows(tmp_path / "good.parquet", [row(serve(server, "/c.jpg", Response(jpeg(301))), "one")])
    data = good.read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    for name in ("truncated.parquet", "garbage.parquet"):
        with pytest.raises(ValueError, match=name):
            run_local([str(good), str(tmp_path / name)], tmp_path / f"out-{name}", hostile_config())
        assert not (tmp_path / f"out-{name}" / "stages" / "ingest").exists()
    result = CliRunner().invoke(app, ["run", str(tmp_path / "garbage.parquet"), "--output", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "garbage.parquet" in result.output
