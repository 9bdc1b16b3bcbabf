"""Files: input discovery over fsspec, atomic writes, stage checkpoints as parquet parts with a done marker."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.storage import files as storage


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


# The atomic writers live in the storage layer (local: temporary name, fsync, rename; object stores: one final PUT).
TMP_SUFFIX = storage.TMP_SUFFIX
remove_temporaries = storage.remove_temporaries
write_table = storage.write_table
write_bytes = storage.write_bytes
write_tables = storage.write_tables
write_json = storage.write_json


class Checkpoint:
    """A stage's output folder (local or fsspec URL): numbered parquet parts, then a _SUCCESS marker written last."""

    def __init__(self, root: str | Path | storage.RemotePath, stage: str) -> None:
        self.path = storage.location(root) / "stages" / stage

    @property
    def done(self) -> bool:
        return (self.path / "_SUCCESS").exists()

    def part_path(self, index: int) -> storage.Location:
        return self.path / f"part-{index:06d}.parquet"

    def has_part(self, index: int) -> bool:
        return self.part_path(index).exists()

    def write_part(self, index: int, table: pa.Table) -> None:
        write_table(table, self.part_path(index))

    def parts(self) -> list[storage.Location]:
        return storage.glob(self.path, "part-*.parquet")

    def dropped_path(self, index: int) -> storage.Location:
        return self.path / f"dropped-{index:06d}.parquet"

    def dropped_parts(self) -> list[storage.Location]:
        """The rows this stage dropped, one file per part (every column, for the books and re-fetches)."""
        return storage.glob(self.path, "dropped-*.parquet")

    def write_split(self, index: int, table: pa.Table, alive: pa.ChunkedArray) -> None:
        """Rows still alive to part-i, rows this step dropped to dropped-i (written first: part-i marks it done)."""
        dead = pc.invert(alive)
        if not pc.any(dead).as_py():  # nothing dropped: the part as it is (no filtered copy), and no dropped-i
            storage.remove(self.dropped_path(index))  # one a killed earlier attempt may have left
            write_table(table, self.part_path(index))
            return
        write_table(table.filter(dead), self.dropped_path(index))
        write_table(table.filter(alive), self.part_path(index))

    def write_split_pieces(self, index: int, pieces: Iterable[pa.Table],
                           alive: Callable[[pa.Table], pa.ChunkedArray]) -> None:
        """write_split for a part that comes in pieces (the download's slices): memory is one piece, not the part."""
        pieces = iter(pieces)
        first = next(pieces, None)
        if first is None:
            raise ValueError(f"{self.part_path(index)}: no rows to write")
        storage.remove(self.dropped_path(index))  # one a killed earlier attempt may have left
        # dropped-i, opened at the first dropped row (a part that drops none has none), ends first: it is whole
        # before part-i (which marks the part done) appears
        with storage.table_writer(self.part_path(index), first.schema, first) as live, ExitStack() as opened:
            dropped: Callable[[pa.Table], None] | None = None
            for piece in itertools.chain([first], pieces):
                mask = alive(piece)
                if pc.all(mask).as_py():  # nothing dropped: no filtered copy of the piece's images
                    live(piece)
                    continue
                if dropped is None:
                    dropped = opened.enter_context(storage.table_writer(self.dropped_path(index), first.schema,
                                                                        first))
                dropped(piece.filter(pc.invert(mask)))
                live(piece.filter(mask))

    def finish(self, meta: dict[str, Any] | None = None) -> None:
        write_json(meta or {}, self.path / "_SUCCESS")

    def meta(self) -> dict[str, Any]:
        return dict(storage.read_json(self.path / "_SUCCESS"))

    def reset(self) -> None:
        for part in storage.glob(self.path, "*"):
            part.unlink()

    def required_parts(self) -> list[storage.Location]:
        """parts(), or FileNotFoundError (an input problem, said in one line) when there are none."""
        parts = self.parts()
        if not parts:
            raise FileNotFoundError(f"{self.path}: no checkpoint; run the earlier stages first")
        return parts

    def read(self, columns: list[str] | None = None) -> pa.Table:
        parts = self.required_parts()
        tables = [storage.read_table(p, columns=None if columns is None else
                                     [c for c in columns if c in storage.read_schema(p).names]) for p in parts]
        return pa.concat_tables(tables, promote_options="permissive")

    def iter_parts(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for part in self.parts():
            yield storage.read_table(part, columns=columns)
