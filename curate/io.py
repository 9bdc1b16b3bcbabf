"""Files: input discovery over fsspec, atomic writes, stage checkpoints as parquet parts with a done marker."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def expand_inputs(patterns: list[str], suffix: str = ".parquet", kind: str = "parquet") -> list[str]:
    """Every file the patterns name (paths, globs, directories, fsspec URLs; in a directory, the files ending in
    suffix), in a stable order; raises naming a pattern that names none."""
    files: list[str] = []
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)
        found = []
        for path in paths:
            if fs.isdir(path):
                found += [p for p in fs.find(path) if p.endswith(suffix)]
            elif fs.exists(path):
                found.append(path)
        if not found:
            raise ValueError(f"input {pattern!r} matches no {kind} file; give a {kind} path, a glob or a directory")
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        files += [p if protocol == "file" else f"{protocol}://{p}" for p in sorted(found)]
    return files


def read_parquet_batches(path: str, batch_rows: int) -> Iterator[pa.Table]:
    """Stream one parquet file in bounded batches; a corrupt file raises naming the file."""
    with fsspec.open(path, "rb") as handle:
        try:
            reader = pq.ParquetFile(handle)
        except Exception as error:
            raise ValueError(f"{path}: not a readable parquet file ({error})") from error
        batches = reader.iter_batches(batch_size=batch_rows)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as error:  # a corrupt page deep in a file: name the file, not a C++ frame
                raise ValueError(f"{path}: cannot read its rows, the file is corrupt ({error})") from error
            yield pa.Table.from_batches([batch])


def parquet_footer(path: str) -> tuple[pa.Schema, int]:
    """A parquet file's schema and row count from its footer; raises naming the file when it is no parquet."""
    with fsspec.open(path, "rb") as handle:
        try:
            footer = pq.ParquetFile(handle)
            return footer.schema_arrow, footer.metadata.num_rows
        except Exception as error:
            raise ValueError(f"{path}: not a readable parquet file ({error})") from error


def parquet_schema(path: str) -> pa.Schema:
    return parquet_footer(path)[0]


TMP_SUFFIX = ".tmp"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def _fsync_replace(tmp: Path, path: Path) -> None:
    """Flush the file to disk, rename it into place, then flush the folder: a crash leaves old or new, never half."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary files a killed run left under root (ours all end in .tmp and start with a dot)."""
    found = [p for p in Path(root).rglob(f".*{TMP_SUFFIX}") if p.is_file()] if Path(root).exists() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write parquet under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    pq.write_table(table, tmp)
    _fsync_replace(tmp, path)


def write_bytes(data: bytes, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_bytes(data)
    _fsync_replace(tmp, path)


def write_tables(tables: Iterator[pa.Table], schema: pa.Schema, path: str | Path) -> None:
    """Stream tables into one parquet file under a temporary name, then rename (memory: one table at a time)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with pq.ParquetWriter(tmp, schema) as writer:
        for table in tables:
            writer.write_table(table.cast(schema))
    _fsync_replace(tmp, path)


def write_json(value: Any, path: str | Path) -> None:
    write_bytes((json.dumps(value, indent=1, sort_keys=False, default=str) + "\n").encode(), path)


class Checkpoint:
    """A stage's output folder: numbered parquet parts, then a _SUCCESS marker written last."""

    def __init__(self, root: str | Path, stage: str) -> None:
        self.path = Path(root) / "stages" / stage

    @property
    def done(self) -> bool:
        return (self.path / "_SUCCESS").exists()

    def part_path(self, index: int) -> Path:
        return self.path / f"part-{index:06d}.parquet"

    def has_part(self, index: int) -> bool:
        return self.part_path(index).exists()

    def write_part(self, index: int, table: pa.Table) -> None:
        write_table(table, self.part_path(index))

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    def dropped_path(self, index: int) -> Path:
        return self.path / f"dropped-{index:06d}.parquet"

    def dropped_parts(self) -> list[Path]:
        """The rows this stage dropped, one file per part (every column, for the books and re-fetches)."""
        return sorted(self.path.glob("dropped-*.parquet"))

    def write_split(self, index: int, table: pa.Table, alive: pa.ChunkedArray) -> None:
        """Rows still alive to part-i, rows this step dropped to dropped-i (written first: part-i marks it done)."""
        write_table(table.filter(pc.invert(alive)), self.dropped_path(index))
        write_table(table.filter(alive), self.part_path(index))

    def finish(self, meta: dict[str, Any] | None = None) -> None:
        write_json(meta or {}, self.path / "_SUCCESS")

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "_SUCCESS").read_text())

    def reset(self) -> None:
        for part in self.path.glob("*"):
            part.unlink()

    def read(self, columns: list[str] | None = None) -> pa.Table:
        parts = self.parts()
        if not parts:
            raise FileNotFoundError(f"{self.path}: no checkpoint; run the earlier stages first")
        tables = [pq.read_table(p, columns=None if columns is None else
                                [c for c in columns if c in pq.read_schema(p).names]) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")

    def iter_parts(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for part in self.parts():
            yield pq.read_table(part, columns=columns)
