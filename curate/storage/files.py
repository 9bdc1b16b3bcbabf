"""One storage layer for both engines: local folders and fsspec URLs (s3://, gs://, …) behind the same calls.

A local path stays a `pathlib.Path` and keeps the local engine's speed and crash safety: a file is written under a
temporary name beside it (`.NAME.xxxxxxxx.tmp`), fsynced, renamed into place with `os.replace`, and the folder is
fsynced. Any other URL becomes a `RemotePath`. On an object store a rename is a copy and a delete, while one PUT
(or a multipart upload, completed when the file is closed) is already all-or-nothing: a reader sees the old object
or the new one, never half. So there a file is written straight to its final key, and a write that fails is
discarded (the upload is aborted, never completed); no temporary object is left behind. A "done" marker written
last (a stage's `_SUCCESS`) still says that a folder is complete on both.

Credentials and endpoints are the filesystem's own: for S3, the AWS variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE …) or fsspec's FSSPEC_S3_* variables
(e.g. FSSPEC_S3_ENDPOINT_URL).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:
    import pyarrow.dataset as ds

TMP_SUFFIX = ".tmp"


class RemotePath:
    """A file or folder on a non-local fsspec filesystem, with the pathlib methods curate uses."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        self.fs, self.path = fs, path.rstrip("/")

    def __str__(self) -> str:  # the URL: another process (a download worker) parses it back with location()
        return self.fs.unstrip_protocol(self.path)

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: RemotePath) -> bool:
        return self.path < other.path

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(self.fs, f"{self.path}/{name}")

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0])

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def resolve(self) -> RemotePath:
        return self

    def _fresh(self) -> None:
        # Other processes (download workers, Spark tasks) write here too: never answer from a stale listing.
        self.fs.invalidate_cache()

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def glob(self, pattern: str) -> list[RemotePath]:
        self._fresh()
        return [RemotePath(self.fs, found) for found in sorted(self.fs.glob(f"{self.path}/{pattern}"))]

    def rglob(self, pattern: str) -> list[RemotePath]:
        return self.glob(f"**/{pattern}")

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self.fs.invalidate_cache()

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        self.fs.makedirs(self.path, exist_ok=True)  # object stores have no folders: nothing to create


Location = Union[Path, RemotePath]  # noqa: UP007 - a runtime alias


def location(target: str | os.PathLike[str] | RemotePath) -> Location:
    """A local Path for local paths and file:// URLs, a RemotePath for any other fsspec URL."""
    if isinstance(target, (Path, RemotePath)):
        return target
    text = os.fspath(target)
    if "://" not in text:
        return Path(text)
    fs, path = fsspec.core.url_to_fs(text)
    return Path(path) if isinstance(fs, LocalFileSystem) else RemotePath(fs, path)


def is_local(target: Location) -> bool:
    return isinstance(target, Path)


def exists(target: str | Location) -> bool:
    return location(target).exists()


def remove(target: str | Location) -> None:
    """Delete a file or a whole folder; nothing to delete is fine."""
    path = location(target)
    if isinstance(path, Path):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    elif path.exists():
        path.fs.rm(path.path, recursive=True)
        path.fs.invalidate_cache()


def makedirs(target: str | Location) -> None:
    location(target).mkdir(parents=True, exist_ok=True)


def listdir(target: str | Location) -> list[str]:
    """The names in a folder, sorted (empty when it does not exist)."""
    path = location(target)
    if isinstance(path, Path):
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    return [p.name for p in path.glob("*")]


def glob(target: str | Location, pattern: str) -> list[Location]:
    """The paths in a folder matching pattern, sorted."""
    return sorted(location(target).glob(pattern))  # type: ignore[type-var]


def scratch(output: Location, name: str) -> Path:
    """A local folder for temporary work (spill partitions, tar buckets): inside a local output, so a run's disk use
    stays in one place; in the system's temporary folder for a remote one."""
    if isinstance(output, Path):
        return output / "stages" / name
    return Path(tempfile.mkdtemp(prefix=f"curate-{name}-"))


# -- reading --------------------------------------------------------------------------------------------------------

def open_read(target: str | Location) -> IO[bytes]:
    path = location(target)
    return open(path, "rb") if isinstance(path, Path) else path.fs.open(path.path, "rb")


def read_bytes(target: str | Location) -> bytes:
    return location(target).read_bytes()


def read_json(target: str | Location) -> Any:
    return json.loads(read_bytes(target))


def _arrow_args(path: Location) -> tuple[str, dict[str, Any]]:
    return (str(path), {}) if isinstance(path, Path) else (path.path, {"filesystem": path.fs})


def read_table(target: str | Location, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
    name, options = _arrow_args(location(target))
    return pq.read_table(name, columns=columns, filters=filters, **options)


def read_schema(target: str | Location) -> pa.Schema:
    path = location(target)
    if isinstance(path, Path):
        return pq.read_schema(path)
    with path.fs.open(path.path, "rb") as handle:
        return pq.read_schema(handle)


def parquet_file(target: str | Location) -> pq.ParquetFile:
    """A parquet file's reader (footer, row groups); a remote one keeps its fsspec handle open."""
    path = location(target)
    return pq.ParquetFile(path) if isinstance(path, Path) else pq.ParquetFile(path.fs.open(path.path, "rb"))


def parquet_dataset(target: str | Location) -> ds.Dataset:
    """A parquet file or a folder of parts (the Spark engine's ledger) as one dataset."""
    import pyarrow.dataset as ds  # imports pandas (~0.3 s): only when a folder-shaped table is read
    name, options = _arrow_args(location(target))
    return ds.dataset(name, format="parquet", **options)


# -- writing: temporary name then rename (local), one final PUT (object stores) --------------------------------------

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


@contextmanager
def _local_temporary(path: Path) -> Iterator[Path]:
    """A temporary path beside path, renamed onto it when the block ends without error (deleted otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_replace(tmp, path)


@contextmanager
def open_write(target: str | Location) -> Iterator[IO[bytes]]:
    """A binary file for writing that appears at target, whole, only when the block ends without error."""
    path = location(target)
    if isinstance(path, Path):
        with _local_temporary(path) as tmp, open(tmp, "wb") as handle:
            yield handle
        return
    handle = path.fs.open(path.path, "wb")
    try:
        yield handle
    except BaseException:
        _discard(handle)
        raise
    handle.close()  # completes the upload: the object appears now, whole
    path.fs.invalidate_cache()


def _discard(handle: Any) -> None:
    """Abort a remote write: the upload is never completed, so the object never appears."""
    discard = getattr(handle, "discard", None)
    if discard is not None:
        discard()
    try:
        handle.closed = True  # fsspec files complete their upload when garbage-collected open
    except AttributeError:
        pass


def write_bytes(data: bytes, target: str | Location) -> None:
    path = location(target)
    if isinstance(path, Path):
        with _local_temporary(path) as tmp:
            tmp.write_bytes(data)
        return
    with open_write(path) as handle:
        handle.write(data)


def write_json(value: Any, target: str | Location) -> None:
    write_bytes((json.dumps(value, indent=1, sort_keys=False, default=str) + "\n").encode(), target)


IMAGE_COLUMN = "jpg"  # curate.schema.JPG
IMAGE_ROW_GROUP_BYTES = 16 << 20


def parquet_options(table: pa.Table) -> dict[str, Any]:
    """pq.write_table's options for a table: image bytes do not compress, so the image column is stored plain (no
    snappy, dictionary or statistics: each costs CPU on every write and read for nothing), in row groups of ~16 MiB
    so that a reader after a few rows (the report's thumbnails) reads a few row groups, not a whole part."""
    if IMAGE_COLUMN not in table.column_names:
        return {}
    others = [name for name in table.column_names if name != IMAGE_COLUMN]
    rows = max(1, IMAGE_ROW_GROUP_BYTES * table.num_rows // max(table.nbytes, 1))
    return {"compression": {**{name: "snappy" for name in others}, IMAGE_COLUMN: "none"},
            "use_dictionary": others, "write_statistics": others, "row_group_size": rows}


def write_table(table: pa.Table, target: str | Location) -> None:
    """One parquet file, atomically: readers never see half a file."""
    path = location(target)
    if isinstance(path, Path):  # arrow's own file writer, as fast as before the storage layer
        with _local_temporary(path) as tmp:
            pq.write_table(table, tmp, **parquet_options(table))
        return
    with open_write(path) as handle:
        pq.write_table(table, handle, **parquet_options(table))


def write_tables(tables: Iterator[pa.Table], schema: pa.Schema, target: str | Location) -> None:
    """Stream tables into one parquet file, atomically (memory: one table at a time)."""
    with table_writer(target, schema) as write:
        for table in tables:
            write(table)


@contextmanager
def table_writer(target: str | Location, schema: pa.Schema,
                 sample: pa.Table | None = None) -> Iterator[Callable[[pa.Table], None]]:
    """write(table) appends to one parquet file that appears at target, whole, when the block ends without error;
    with a sample table, the file gets write_table's options for it (an image column stored plain)."""
    path = location(target)
    options = parquet_options(sample) if sample is not None else {}
    rows = options.pop("row_group_size", None)
    with (_local_temporary(path) if isinstance(path, Path) else open_write(path)) as sink:
        with pq.ParquetWriter(sink, schema, **options) as writer:
            yield lambda table: writer.write_table(table.cast(schema), row_group_size=rows)


def remove_temporaries(root: str | Location) -> list[Location]:
    """Delete the temporary files a killed run left under a local root (ours start with a dot and end in .tmp).
    An object store holds none: its writes go to their final key, and a killed upload is never completed."""
    path = location(root)
    if not isinstance(path, Path) or not path.exists():
        return []
    found: list[Location] = [p for p in path.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return found
