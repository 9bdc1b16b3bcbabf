"""What the input names: images already downloaded (WebDataset tars, img2dataset's `files` and `parquet` output), or
LAION-style metadata parquet to download.

img2dataset writes, per shard NNNNN, a NNNNN.parquet of every row it tried (status, error_message) and NNNNN_stats.json
beside the shard itself: NNNNN.tar (webdataset), an NNNNN/ folder of KEY.jpg/.txt/.json (files), or the images in the
NNNNN.parquet's own `jpg` column (parquet). A stored input is listed as one entry per shard: the tar, the folder, or
the parquet (with images, or with its tar gone: a damaged shard whose rows all go to the ledger). A run reads one kind:
a mix of downloaded shards and metadata parquet is refused before any work, naming what one kind would leave out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import fsspec
import pyarrow.parquet as pq

log = logging.getLogger(__name__)
IMAGE_COLUMNS = ("jpg", "png", "webp")  # img2dataset's --encode_format: the image column of its parquet output
SHARD_COLUMNS = frozenset({"key", "status", "error_message"})  # every img2dataset shard parquet has them
SUFFIX = ".parquet"


@dataclass
class Inputs:
    """The input's entries in a stable order, whether their images are stored (read, not fetched), and what the
    chosen --input-format leaves out (said in a warning and in the ingest checkpoint's meta)."""

    stored: bool
    files: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


@dataclass
class _Found:
    stored: list[str] = field(default_factory=list)  # tars, files-format folders, parquet-format shards
    tarless: list[str] = field(default_factory=list)  # img2dataset shard parquets with no tar, folder or images
    metadata: list[str] = field(default_factory=list)  # parquet (or a named file of another kind) to download
    sidecars: list[str] = field(default_factory=list)  # img2dataset's NNNNN.parquet read with its tar or folder


def image_column(names: list[str]) -> str | None:
    """The image column of an img2dataset parquet-format shard (key, status, error_message and jpg/png/webp)."""
    if not SHARD_COLUMNS <= set(names):
        return None
    return next((name for name in IMAGE_COLUMNS if name in names), None)


def _classify(pattern: str) -> _Found:
    """Every entry one pattern names (a path, glob, folder or fsspec URL), by kind, each kind sorted."""
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    found = _Found()
    for path in paths:
        if fs.isdir(path):
            listing = fs.find(path, withdirs=True, detail=True)
            files = sorted(p for p, info in listing.items() if info["type"] != "directory")
            folders = {p.rstrip("/") for p, info in listing.items() if info["type"] == "directory"}
            known = set(files) | folders
            exists = known.__contains__
            named = False
        elif fs.exists(path):
            files, folders, exists, named = [path], set(), fs.exists, True
        else:
            continue
        for file in files:
            if file.endswith(".tar"):
                found.stored.append(file)
            elif file.endswith(SUFFIX):
                _classify_parquet(fs, file, exists, folders if not named else None, found)
            elif named:  # a file named on its own is read as what --input-format says (and refused if it is not)
                found.metadata.append(file)
    if protocol != "file":
        for kind in (found.stored, found.tarless, found.metadata, found.sidecars):
            kind[:] = [f"{protocol}://{p}" for p in kind]
    for kind in (found.stored, found.tarless, found.metadata):
        kind.sort()
    return found


def _classify_parquet(fs: fsspec.AbstractFileSystem, path: str, exists: Callable[[str], bool], folders: set[str] | None,
                      found: _Found) -> None:
    stem = path[: -len(SUFFIX)]
    if exists(stem + ".tar"):
        found.sidecars.append(path)
        return
    is_folder = stem in folders if folders is not None else fs.isdir(stem)
    names = _names(fs, path)
    if is_folder and SHARD_COLUMNS <= set(names):
        found.stored.append(stem)  # img2dataset --output_format files: NNNNN/ beside NNNNN.parquet
        found.sidecars.append(path)
    elif image_column(names) is not None:
        found.stored.append(path)
    elif SHARD_COLUMNS <= set(names):  # img2dataset's shard parquet whose tar is gone (a crash, or deleted)
        found.tarless.append(path)
    else:
        found.metadata.append(path)


def _names(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A parquet file's column names; [] when it is unreadable (read as metadata, then refused naming the file)."""
    try:
        with fs.open(path, "rb") as handle:
            return list(pq.ParquetFile(handle).schema_arrow.names)
    except Exception:  # noqa: BLE001 - any unreadable file is refused by the parquet reader with its name
        return []


def list_inputs(patterns: list[str], input_format: str) -> Inputs:
    """The entries a run reads under --input-format (auto: stored shards when there are any, else parquet), pattern by
    pattern; raises naming a pattern that names nothing, and, for auto, an input that mixes downloaded shards and
    metadata."""
    founds = []
    for pattern in patterns:
        found = _classify(pattern)
        if not (found.stored or found.tarless or found.metadata or found.sidecars):
            raise ValueError(f"input {pattern!r} matches no parquet or tar file; give a path, a glob or a directory")
        founds.append(found)
    stored = [p for found in founds for p in found.stored]
    metadata = [p for found in founds for p in found.metadata]
    if input_format == "webdataset" or (input_format == "auto" and stored):
        if input_format == "auto" and metadata:
            raise ValueError(_mixed(stored, metadata))
        if metadata:
            log.warning("--input-format webdataset: these parquet files are not read (metadata to download; curate "
                        "them in a run of their own): %s", metadata)
        return Inputs(True, _each([sorted(f.stored + f.tarless) for f in founds]), ignored=metadata)
    downloaded = [p for p in stored if not p.endswith(SUFFIX)]
    if downloaded:
        log.warning("--input-format parquet: these downloaded shards are not read: %s", downloaded)
    every = [sorted(f.metadata + f.tarless + f.sidecars + [p for p in f.stored if p.endswith(SUFFIX)]) for f in founds]
    for pattern, files in zip(patterns, every, strict=True):
        if not files:
            raise ValueError(f"input {pattern!r} matches no parquet file, only downloaded shards (tars or img2dataset "
                             "folders): give --input-format webdataset (or auto) to curate them")
    return Inputs(False, _each(every), ignored=downloaded)


def _each(per_pattern: list[list[str]]) -> list[str]:
    """Pattern by pattern as given, once each: the order rows are numbered in."""
    return list(dict.fromkeys(p for paths in per_pattern for p in paths))


def _mixed(stored: list[str], metadata: list[str]) -> str:
    return (f"the input holds images already downloaded ({len(stored)} shards, e.g. {stored[0]}) and metadata parquet "
            f"to download ({', '.join(metadata[:5])}{' …' if len(metadata) > 5 else ''}); a run reads one kind, and "
            "would leave the other out. Curate each in a run of its own (name its files), or give --input-format "
            "webdataset to read only the downloaded shards (the parquet is not read) or --input-format parquet to "
            "read only the parquet files")
