"""img2dataset's other output shapes as input rows: `--output_format files` folders, `--output_format parquet` shards,
and a shard whose tar is gone (its parquet's rows all to the ledger). Rows point at their image bytes (a file's path
and size; a parquet's path, row and length), so no image byte is copied before the decode stage reads it.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.schema import CAPTION, DROP_DETAIL, DROP_REASON, DROP_STAGE, IMAGE_FORMAT, TAR_OFFSET, TAR_PATH, TAR_SIZE
from curate.wds.inputs import image_column
from curate.wds.reader import (
    IMG2DATASET_RENAMES,
    STAGE,
    _Sample,
    _split_name,
    caption_of,
    in_batches,
    read_tar_rows,
    sample_row,
    sidecar_rows,
    without_captions,
)

READ_ROWS = 256  # rows of a parquet-format shard read at a time (their images are in the batch)


def read_stored_rows(path: str, batch_rows: int, caption_field: str | None,
                     damage: list[dict[str, Any]]) -> Iterator[pa.Table]:
    """One entry of a stored input (inputs.list_inputs): a tar, a files-format folder, or a shard parquet."""
    if path.endswith(".tar"):
        return read_tar_rows(path, batch_rows, caption_field, damage)
    if path.endswith(".parquet"):
        return in_batches(_parquet_rows(path, caption_field, damage), batch_rows, path)
    return in_batches(_folder_rows(path, caption_field, damage), batch_rows, path)


class _Folder:
    """A files-format shard folder read as a tar is: each member is a file of its own (offset 0)."""

    @staticmethod
    def extractfile(member: tarfile.TarInfo) -> io.BytesIO:
        with fsspec.open(member.name, "rb") as handle:
            return io.BytesIO(handle.read())


def _folder_rows(folder: str, caption_field: str | None, damage: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """KEY.jpg, KEY.txt and KEY.json files of one NNNNN/ folder as samples, then the shard parquet's rows not in it."""
    fs, local = fsspec.core.url_to_fs(folder)
    prefix = folder[: len(folder) - len(local)]  # the protocol the folder was given with, if any
    samples: dict[str, _Sample] = {}
    for name, info in sorted(fs.find(local, detail=True).items()):
        key, extension = _split_name(posixpath.relpath(name, local))
        member = tarfile.TarInfo(prefix + name)
        member.size = int(info["size"])
        sample = samples.setdefault(key, _Sample(key))
        sample.members[extension] = member
    for sample in samples.values():
        yield sample_row(_Folder, folder, sample, caption_field, own_files=True)
    yield from sidecar_rows(folder, folder.rstrip("/") + ".parquet", set(samples), damage)


def _parquet_rows(path: str, caption_field: str | None, damage: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A shard parquet's rows: with an image column, each downloaded row located at (path, row, length); without
    one (its tar or folder is gone), every row to the ledger, and the shard recorded as damaged."""
    with fsspec.open(path, "rb") as handle:
        shard = pq.ParquetFile(handle)
        column = image_column(shard.schema_arrow.names)
        if column is None:
            tar = path[: -len(".parquet")] + ".tar"
            damage.append({"file": tar, "offset": 0, "error": f"missing: img2dataset wrote {path} but no tar"})
            yield from sidecar_rows(tar, path, set(), damage)
            return
        row = 0
        for batch in shard.iter_batches(batch_size=READ_ROWS):
            lengths = pc.binary_length(batch[column]).to_pylist()
            records = batch.drop_columns([column]).to_pylist()
            for record, length in zip(records, lengths, strict=True):
                yield _parquet_row(record, length, path, row, column, caption_field)
                row += 1


def _parquet_row(record: dict[str, Any], length: int | None, path: str, row: int, column: str,
                 caption_field: str | None) -> dict[str, Any]:
    record = {IMG2DATASET_RENAMES.get(k, k): v for k, v in record.items()}
    status, message = record.pop("status"), str(record.pop("error_message", None) or "")[:1000]
    caption = record.pop("txt", None)
    found = {**without_captions(record, caption_field), CAPTION: caption if caption is not None
             else caption_of(record, caption_field), "source_sample": record.get("key")}
    if status != "success":
        return {**found, DROP_STAGE: STAGE, DROP_REASON: f"img2dataset_{status or 'failed'}", DROP_DETAIL: message}
    if length is None:
        return {**found, DROP_STAGE: STAGE, DROP_REASON: "no_image", DROP_DETAIL: f"{path}: row {row} has no {column}"}
    return {**found, TAR_PATH: path, TAR_OFFSET: row, TAR_SIZE: length, IMAGE_FORMAT: column}
