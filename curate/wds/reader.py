"""WebDataset input: tars already downloaded (img2dataset's output or any other) read as rows that point at their bytes.

A row is one sample: its caption (KEY.txt, else a json field), the scalar fields of KEY.json, and where its image lies
(tar, offset, size, extension), so no image byte is copied before the decode stage reads it. img2dataset's per-shard
parquet names the rows it failed to download: they count as input and go to the ledger with its error message.
"""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import mmh3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.schema import (
    CAPTION,
    CAPTION_REPAIR,
    DROP_DETAIL,
    DROP_REASON,
    DROP_STAGE,
    IMAGE_FORMAT,
    LOCATION_COLUMNS,
    TAR_OFFSET,
    TAR_PATH,
    TAR_SIZE,
    URL,
    VERDICT_COLUMNS,
    table_schema,
)
from curate.stages.ingest import COLUMN_ALIASES, decode_text, normalize
from curate.wds.inputs import IMAGE_COLUMNS, image_column

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # webdataset's image extensions, in order of preference
STAGE = "ingest"
# img2dataset's own json fields: width/height there are the stored (resized) size, not LAION's claimed one.
IMG2DATASET_RENAMES = {"width": "source_width", "height": "source_height"}
CAPTION_NAMES = ("caption", "text")  # a sample's caption fields (LAION's spellings, compared lower-cased)
MISSING = "img2dataset_shard_missing"  # a row img2dataset downloaded whose image is not in the shard it wrote


def check_tar(path: str) -> None:
    """Refuse a file that is no tar before any work starts (reads its first header only). An empty tar (the end
    blocks only: img2dataset's shard whose downloads all failed) and a 0-byte one (a crash) are input, not errors."""
    with fsspec.open(path, "rb") as handle:
        header = handle.read(tarfile.BLOCKSIZE)
    if not header or header == tarfile.NUL * tarfile.BLOCKSIZE:
        return
    try:
        tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as error:
        raise ValueError(f"{path}: not a tar file ({error}); --input-format webdataset reads tars") from None


@dataclass
class _Sample:
    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)
    repeated: list[str] = field(default_factory=list)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name; the rest, the extension."""
    folder, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(folder, stem), extension.lower()


def _samples(tar: tarfile.TarFile, path: str, size: int, damage: list[dict[str, Any]]) -> Iterator[_Sample]:
    """Consecutive members of one key as a sample; stops at the first damage, which it records."""
    current: _Sample | None = None
    while True:
        offset = tar.offset
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as error:
            damage.append({"file": path, "offset": offset, "error": f"{type(error).__name__}: {error}"})
            break
        if member is None:
            break
        if member.offset_data + member.size > size:  # its bytes run past the end of the file: truncated
            damage.append({"file": path, "offset": member.offset, "error": f"member {member.name!r} is truncated"})
            break
        if not member.isfile():
            continue
        key, extension = _split_name(member.name)
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = _Sample(key)
        if extension in current.members:
            current.repeated.append(member.name)
        else:
            current.members[extension] = member
    if current is not None:
        yield current


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return _decoded(tar, member)[0]


def _decoded(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[str, str | None]:
    """A member's text by ingest's decode_text (UTF-8, else Windows-1252) and how it was decoded (CAPTION_REPAIR)."""
    handle = tar.extractfile(member)
    return decode_text(handle.read()) if handle is not None else ("", None)


def _json_fields(tar: tarfile.TarFile, member: tarfile.TarInfo | None) -> tuple[dict[str, Any], str | None]:
    """A sample json's fields (scalars as they are, anything else as JSON text), or why it is unreadable."""
    if member is None:
        return {}, None
    try:
        document = json.loads(_text(tar, member))
    except json.JSONDecodeError as error:
        return {}, f"{member.name}: not JSON ({error})"
    if not isinstance(document, dict):
        return {}, f"{member.name}: not a JSON object"
    fields: dict[str, Any] = {}
    for raw_name, value in document.items():
        name = IMG2DATASET_RENAMES.get(str(raw_name), str(raw_name))
        fields[name] = value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)
    return fields, None


def caption_of(fields: dict[str, Any], caption_field: str | None) -> Any:
    """The caption a sample's fields hold: --caption-field's, else LAION's spellings (caption, text)."""
    names = [caption_field] if caption_field else []
    names += [name for name in fields if name.lower() in CAPTION_NAMES]
    return next((fields[name] for name in names if fields.get(name) is not None), None)


def without_captions(fields: dict[str, Any], caption_field: str | None) -> dict[str, Any]:
    """The fields but the caption's (--caption-field's and every spelling of caption): the caption is one column."""
    return {k: v for k, v in fields.items() if k != caption_field and k.lower() not in CAPTION_NAMES}


def sample_row(tar: Any, path: str, sample: _Sample, caption_field: str | None,
               own_files: bool = False) -> dict[str, Any]:
    """One sample to its input row (verdict columns set when the sample cannot be a training pair). `tar` is a
    TarFile, or anything with its extractfile; own_files: each member is a file of its own (its name, its path)."""
    fields, json_problem = _json_fields(tar, sample.members.get("json"))
    row: dict[str, Any] = {**without_captions(fields, caption_field), URL: fields.get(URL),
                           "source_sample": sample.key}
    if "txt" in sample.members:
        row[CAPTION], row[CAPTION_REPAIR] = _decoded(tar, sample.members["txt"])
    else:
        row[CAPTION] = caption_of(fields, caption_field)
    image = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.members), None)
    if image is not None:
        member = sample.members[image]
        row.update({TAR_PATH: member.name if own_files else path, TAR_OFFSET: member.offset_data,
                    TAR_SIZE: member.size, IMAGE_FORMAT: image})
    problem = (("duplicate_member", f"{path}: members {sample.repeated} repeat the key {sample.key!r}")
               if sample.repeated else ("no_image", f"{path}: sample {sample.key!r} has {sorted(sample.members)}")
               if image is None else ("invalid_json", json_problem) if json_problem else None)
    if problem is not None:
        row.update({DROP_STAGE: STAGE, DROP_REASON: problem[0], DROP_DETAIL: problem[1]})
    return row


def sidecar_rows(shard: str, sidecar: str, found: set[str], damage: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """img2dataset's rows of one shard (its NNNNN.parquet) whose image is not among the `found` sample keys, as
    dropped input rows: the ones it failed to download with its error, the ones it downloaded (a shard cut short or
    gone) as MISSING. An unreadable sidecar is recorded in `damage`."""
    fs, local = fsspec.core.url_to_fs(sidecar)
    if not fs.exists(local):
        return []
    try:
        with fs.open(local, "rb") as handle:
            table = pq.read_table(handle, columns=[n for n in pq.read_schema(handle).names if n not in IMAGE_COLUMNS])
    except Exception as error:  # noqa: BLE001 - a crash can leave a parquet without its footer
        damage.append({"file": sidecar, "offset": 0, "error": f"unreadable parquet ({type(error).__name__}: {error})"})
        return []
    if "status" not in table.column_names:
        return []
    rows = []
    for record in table.to_pylist():
        record = {IMG2DATASET_RENAMES.get(k, k): v for k, v in record.items()}
        status, message = record.pop("status"), str(record.pop("error_message", None) or "")[:1000]
        if status == "success":
            if str(record.get("key")) in found:
                continue
            reason, message = MISSING, f"{shard}: img2dataset downloaded this row, but its image is not in the shard"
        else:
            reason = f"img2dataset_{status or 'failed'}"
        rows.append({**record, DROP_STAGE: STAGE, DROP_REASON: reason, DROP_DETAIL: message})
    return rows


def in_batches(rows: Iterable[dict[str, Any]], batch_rows: int, origin: str) -> Iterator[pa.Table]:
    """Rows as raw tables (_table) of at most batch_rows rows; none for no rows."""
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= batch_rows:
            yield _table(batch, origin)
            batch = []
    if batch:
        yield _table(batch, origin)


def row_hash(row: dict[str, Any], tar_path: str) -> int:
    """LAION's hash (mmh3 of url + caption) when there is a url, else of the tar and sample key: keys stay distinct."""
    origin = row.get(URL) or f"{tar_path}#{row.get('source_sample') or row.get('key')}"
    return mmh3.hash64(str(origin) + str(row.get(CAPTION) or ""))[0]


def read_tar_rows(path: str, batch_rows: int, caption_field: str | None,
                  damage: list[dict[str, Any]]) -> Iterator[pa.Table]:
    """One tar's samples, then img2dataset's rows for it that are not in it, as tables of at most batch_rows rows."""
    yield from in_batches(_tar_rows(path, caption_field, damage), batch_rows, path)
    if damage and damage[-1]["file"] == path:
        log.warning("%s is damaged at byte %d (%s): the samples before it are read", path, damage[-1]["offset"],
                    damage[-1]["error"])


def _tar_rows(path: str, caption_field: str | None, damage: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    fs, local = fsspec.core.url_to_fs(path)
    size, found = fs.size(local), set()
    if size == 0:  # a crash before the first block: its rows are all in the sidecar
        damage.append({"file": path, "offset": 0, "error": "empty file (0 bytes): the shard was never written"})
    else:
        with fs.open(local, "rb") as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for sample in _samples(tar, path, size, damage):
                found.add(posixpath.basename(sample.key))
                yield sample_row(tar, path, sample, caption_field)
    yield from sidecar_rows(path, path[: -len(".tar")] + ".parquet", found, damage)


def _table(rows: list[dict[str, Any]], tar_path: str) -> pa.Table:
    """Rows to a table of the input's own columns (normalized later, as parquet input) plus curate's own."""
    own = (*LOCATION_COLUMNS, *VERDICT_COLUMNS, CAPTION_REPAIR)
    for row in rows:
        if row.get("hash") is None:
            row["hash"] = row_hash(row, tar_path)
        row.setdefault(URL, None)
    names = list(dict.fromkeys(name for row in rows for name in row if name not in own))
    columns = {}
    types = {TAR_PATH: pa.string(), TAR_OFFSET: pa.int64(), TAR_SIZE: pa.int64(), IMAGE_FORMAT: pa.string()}
    ours = {name: pa.array([row.get(name) for row in rows], types.get(name, pa.string())) for name in own}
    for name in names:
        values = [row.get(name) for row in rows]
        if all(v is None for v in values) and not _canonical(name):  # its type is unknown here (a shard's failed
            continue  # rows only): left out, so parts that have it set its type, not a guess
        try:
            columns[name] = pa.array(values)
            if pa.types.is_null(columns[name].type):  # all missing here: text, so batches and joins agree
                columns[name] = columns[name].cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed kinds across samples: keep them as text
            columns[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    return pa.table({**columns, **{f"{OWN_PREFIX}{name}": values for name, values in ours.items()}})


def _canonical(name: str) -> bool:
    """A column ingest casts to its schema type (url, caption, LAION's scores...): an all-null one keeps a type."""
    return COLUMN_ALIASES.get(name.lower(), name.lower()) in table_schema("metadata").names


OWN_PREFIX = "\x00curate:"  # marks curate's own columns in a raw table; no input column can be named so


def normalize_rows(table: pa.Table, first_row: int) -> pa.Table:
    """ingest.normalize on the input's columns; curate's own (location, verdicts) are put back as they are."""
    own = [name for name in table.column_names if name.startswith(OWN_PREFIX)]
    normalized = normalize(table.drop_columns(own), first_row)
    for name in own:
        column = name[len(OWN_PREFIX):]
        if column in normalized.column_names:  # caption_repair: the .txt member's decode, else ingest's
            normalized = normalized.set_column(normalized.column_names.index(column), column,
                                               pc.coalesce(table[name], normalized[column]))
        else:
            normalized = normalized.append_column(column, table[name])
    return normalized


def read_stored(paths: list[str], offsets: list[int], sizes: list[int]) -> list[bytes | None]:
    """The image bytes of rows located in tars (grouped per tar, read in offset order); None past a file's end."""
    found: list[bytes | None] = [None] * len(paths)
    order = sorted(range(len(paths)), key=lambda i: (paths[i], offsets[i]))
    for path in dict.fromkeys(paths[i] for i in order):
        if path.endswith(".parquet"):  # img2dataset's parquet output: offset is the row, size the image's length
            rows = [i for i in order if paths[i] == path]
            for i, data in zip(rows, parquet_images(path, [offsets[i] for i in rows]), strict=True):
                found[i] = data if data is not None and len(data) == sizes[i] else None
            continue
        with fsspec.open(path, "rb") as handle:
            for i in (i for i in order if paths[i] == path):
                handle.seek(offsets[i])
                data = handle.read(sizes[i])
                found[i] = data if len(data) == sizes[i] else None
    return found


def parquet_images(path: str, rows: list[int]) -> list[bytes | None]:
    """The image column's values at these rows (ascending) of a parquet-format shard, one row group read at a time."""
    with fsspec.open(path, "rb") as handle:
        shard = pq.ParquetFile(handle)
        column = image_column(shard.schema_arrow.names)
        starts = np.cumsum([0] + [shard.metadata.row_group(g).num_rows for g in range(shard.num_row_groups)])
        found: list[bytes | None] = []
        group, values = -1, pa.array([], pa.binary())
        for row in rows:
            wanted = int(np.searchsorted(starts, row, side="right")) - 1
            if not 0 <= row < starts[-1] or column is None:
                found.append(None)
                continue
            if wanted != group:
                group, values = wanted, shard.read_row_group(wanted, columns=[column])[column].combine_chunks()
            found.append(values[row - int(starts[group])].as_py())
    return found
