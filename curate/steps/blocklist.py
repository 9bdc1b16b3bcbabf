"""--blocklist FILE...: drop rows whose URL or image is on a hash list (re-LAION's practice with the lists of
child-safety organizations, and opt-out lists).

Two global steps, each a partitioned join of the run's digests with the lists' (never a set in memory): signature =
(row, digest) with the digest's first 16 hex digits as the group, the lists' entries as rows -1 of the same groups;
group = the rows whose digest is among their group's entries. blocklisted_url runs before the download (the URL's
sha256), blocklisted_image after it (the sha256 of the downloaded bytes). Memory: one partition of digests.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.config import Config
from curate.pipeline.plan import RunFacts
from curate.pipeline.protocol import GROUP, REFERENCE_ROW, Global, Step
from curate.schema import DROP_DETAIL, DROP_REASON, DROP_STAGE, ROW, SHA256, URL
from curate.steps import hashes

DIGEST = "_digest"
HEX = re.compile(r"[0-9a-f]{64}")
SIGNATURE = pa.schema([(ROW, pa.int64()), (GROUP, pa.int64()), (DIGEST, pa.string())])


def list_files(config: Config) -> list[str]:
    return hashes.expand(list(config.blocklist or []))


def _digest_column(schema: pa.Schema, path: str) -> str:
    if "sha256" in schema.names:
        return "sha256"
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if not strings:
        raise ValueError(f"{path}: a --blocklist parquet file needs a sha256 column of hex digests (it has "
                         f"{schema.names})")
    return strings[0]


def _checked(digests: pa.Array, path: str, lines: list[int] | None) -> pa.Array:
    """Lowercase hex digests; a malformed entry raises naming the file (and its line, in a text file)."""
    lower = pc.utf8_lower(pc.utf8_trim_whitespace(digests))
    bad = pc.invert(pc.fill_null(pc.match_substring_regex(lower, r"^[0-9a-f]{64}$"), False))
    if pc.any(bad).as_py():
        at = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        where = f"line {lines[at]}" if lines is not None else f"row {at}"
        raise ValueError(f"{path}: {where} is not a hex sha256 digest ({digests[at].as_py()!r}); a --blocklist "
                         "file holds 64 hex digits an entry")
    return lower


def _entries(digests: pa.Array) -> pa.Table:
    return pa.table({ROW: pa.array(np.full(len(digests), REFERENCE_ROW, np.int64)),
                     GROUP: pa.array(hashes.hex_groups(digests)), DIGEST: digests}, schema=SIGNATURE)


def read_list(config: Config, path: str) -> Iterator[pa.Table]:
    """A list's entries as signature rows, a batch at a time (a 10^8-entry list is never in memory)."""
    if path.endswith(".parquet"):
        with fsspec.open(path, "rb") as handle:
            reader = pq.ParquetFile(handle)
            column = _digest_column(reader.schema_arrow, path)
            for batch in reader.iter_batches(hashes.BATCH_ENTRIES, columns=[column]):
                digests = batch.column(0).cast(pa.string())
                yield _entries(_checked(digests.filter(pc.is_valid(digests)), path, None))
        return
    for numbers, lines in hashes.text_lines(path):
        yield _entries(_checked(pa.array(lines, pa.string()), path, numbers))


def check(config: Config) -> None:
    """Refused at the start: a list that is missing, or whose first entries are no digests."""
    for path in list_files(config):
        next(read_list(Config(blocklist=[path]), path), None)


def _signature(digest_of: Callable[[pa.Table], pa.Array]) -> Callable[[Config, RunFacts], Callable]:
    def bind(config: Config, facts: RunFacts) -> Callable[[pa.Table], pa.Table]:
        def signature(table: pa.Table) -> pa.Table:
            digests = digest_of(table)
            keep = pc.is_valid(digests)
            digests, rows = digests.filter(keep), table[ROW].filter(keep)
            return pa.table({ROW: pc.cast(rows, pa.int64()), GROUP: pa.array(hashes.hex_groups(digests)),
                             DIGEST: digests}, schema=SIGNATURE)
        return signature
    return bind


def url_digests(table: pa.Table) -> pa.Array:
    """sha256 of each URL's UTF-8 bytes, as the lists give it (null URL: null)."""
    return pa.array([None if url is None else hashlib.sha256(url.encode()).hexdigest()
                     for url in table[URL].to_pylist()], pa.string())


def image_digests(table: pa.Table) -> pa.Array:
    return pc.utf8_lower(table[SHA256].combine_chunks().cast(pa.string()))


def _group(stage: str, reason: str, what: str) -> Callable[[Config, RunFacts], Callable]:
    def bind(config: Config, facts: RunFacts) -> Callable[[pa.Table], pa.Table]:
        def group(table: pa.Table) -> pa.Table:
            listed = pc.equal(table[ROW], REFERENCE_ROW)
            entries = table.filter(listed)[DIGEST]
            rows = table.filter(pc.invert(listed))
            hit = rows.filter(pc.is_in(rows[DIGEST], value_set=entries.combine_chunks().unique()))
            count = hit.num_rows
            return pa.table({ROW: hit[ROW], DROP_STAGE: pa.array([stage] * count, pa.string()),
                             DROP_REASON: pa.array([reason] * count, pa.string()),
                             DROP_DETAIL: pc.binary_join_element_wise(f"sha256 of the {what} ", hit[DIGEST],
                                                                      " is on a --blocklist", "")})
        return group
    return bind


def _enabled(config: Config) -> bool:
    return bool(config.blocklist)


def _step(name: str, reason: str, what: str, columns: tuple[str, ...],
          digest_of: Callable[[pa.Table], pa.Array]) -> Step:
    found = Global(_signature(digest_of), _group(name, reason, what), columns, references=list_files,
                   read_reference=read_list, reference_rows=lambda config, path: hashes.file_rows(path))
    return Step(name, ("verdict",), frozenset({"blocklist"}), enabled=_enabled, check=check, reasons=(reason,),
                global_step=found)


URL_STEP = _step("blocklist_url", "blocklisted_url", "URL", (URL,), url_digests)
IMAGE_STEP = _step("blocklist_image", "blocklisted_image", "image", (SHA256,), image_digests)
