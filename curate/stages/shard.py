"""Shard: plan equal shards for world_size x workers_per_rank readers, shuffle by seed, build tar members."""

from __future__ import annotations

import json
import math
import re
import tarfile
from dataclasses import dataclass
from typing import Any

import mmh3
import numpy as np
import pyarrow as pa

from curate.schema import POSITION, SHARD

KEY_PATTERN = re.compile(r"^[0-9a-f]{16}$")
TAR_RECORD = tarfile.RECORDSIZE
# Per-sample tar overhead: three 512-byte headers plus, on average, half a block of padding per member.
MEMBER_OVERHEAD = 3 * 512 + 3 * 256


class ShardPlanError(ValueError):
    pass


@dataclass(frozen=True)
class ShardPlan:
    num_shards: int
    samples_per_shard: int
    remainder: int
    world_size: int
    workers_per_rank: int
    global_batch_size: int

    @property
    def kept(self) -> int:
        return self.num_shards * self.samples_per_shard

    @property
    def samples_per_rank(self) -> int:
        return self.kept // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.kept // self.global_batch_size


def fitting_plan(rows: int, world_size: int, workers_per_rank: int) -> str:
    """Options under which `rows` samples give every data-loader worker a shard, as a hint for messages."""
    if rows >= world_size:
        return f"--world-size {world_size} --workers-per-rank {min(workers_per_rank, rows // world_size)}"
    return f"--world-size {1 << (max(rows, 1).bit_length() - 1)} --workers-per-rank 1"


def plan_shards(num_samples: int, total_bytes: int, world_size: int, workers_per_rank: int, target_bytes: int,
                global_batch_size: int = 2048) -> ShardPlan:
    """Shard count: a multiple of world_size x workers_per_rank nearest the byte target; equal samples per shard."""
    unit = world_size * workers_per_rank
    if num_samples < unit:
        raise ShardPlanError(
            f"{num_samples} samples survived, fewer than one per data-loader worker "
            f"({world_size} ranks x {workers_per_rank} workers = {unit} shards at least); "
            f"lower --world-size or --workers-per-rank (e.g. {fitting_plan(num_samples, world_size, workers_per_rank)}"
            "), or loosen the thresholds; `curate shard OUT` with those options re-cuts without downloading again"
        )
    multiples = max(1, round(total_bytes / target_bytes / unit))
    multiples = min(multiples, num_samples // unit)
    num_shards = unit * multiples
    per_shard = num_samples // num_shards
    return ShardPlan(num_shards, per_shard, num_samples - per_shard * num_shards, world_size, workers_per_rank,
                     global_batch_size)


def shuffle_draws(keys: list[str], seed: int) -> np.ndarray:
    """Each key's seeded draw (mmh3 64-bit): the shuffle orders by (draw, key)."""
    return np.array([mmh3.hash64(f"{seed}:{key}", signed=False)[0] for key in keys], dtype=np.uint64)


def shuffle_order(keys: list[str] | np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Indices of keys in the shuffled order: by draw, ties by key, then by their order here."""
    return np.lexsort((np.asarray(keys, dtype=object).astype(str), draws))


def shuffle_positions(keys: list[str], seed: int) -> np.ndarray:
    """Position of each key in a seeded order that depends only on (seed, key): same on any engine or partitioning."""
    order = shuffle_order(keys, shuffle_draws(keys, seed))
    positions = np.empty(len(keys), dtype=np.int64)
    positions[order] = np.arange(len(keys))
    return positions


def draw_ranges(draws: np.ndarray, partitions: int) -> np.ndarray:
    """Partition of each draw by its range, in draw order: partition p holds draws below those of partition p + 1,
    so positions are the counts of the lower partitions plus the ranks inside one."""
    return ((np.asarray(draws, dtype=np.uint64) >> np.uint64(32)) * np.uint64(partitions) >> np.uint64(32)).astype(
        np.int64)


def assign_shards(table: pa.Table, plan: ShardPlan, positions: np.ndarray) -> pa.Table:
    """Add position and shard (-1 for the remainder that does not fill every shard equally)."""
    shard = np.where(positions < plan.kept, positions // max(plan.samples_per_shard, 1), -1)
    return table.append_column(POSITION, pa.array(positions)).append_column(SHARD, pa.array(shard))


def check_key(key: str) -> str:
    """A tar member stem must be 16 hex digits: never a path, never '..', never NUL."""
    if not isinstance(key, str) or not KEY_PATTERN.match(key):
        raise ValueError(f"refusing tar member stem {key!r}: keys are 16 lower-case hex digits")
    return key


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


# tarfile's header for these members with an empty name and size 0; _header fills in name, size and checksum.
_BLANK = _tarfile_header("", 0)
_BLANK_SUM = 256 + sum(_BLANK[:124]) + sum(_BLANK[136:148]) + sum(_BLANK[156:])  # all but name, size, checksum


def _header(name: str, size: int) -> bytes:
    """tarfile's USTAR header for a short ASCII name, built directly (TarInfo.tobuf was a fifth of the shard stage)."""
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8**11:
        return _tarfile_header(name, size)
    header = bytearray(_BLANK)
    header[:len(encoded)] = encoded
    header[124:136] = b"%011o\0" % size
    checksum = _BLANK_SUM + sum(encoded) + sum(header[124:136])
    header[148:156] = b"%06o\0 " % checksum
    return bytes(header)


def _member(name: str, data: bytes) -> bytes:
    padding = (-len(data)) % tarfile.BLOCKSIZE
    return _header(name, len(data)) + data + b"\0" * padding


def sample_bytes(key: str, jpg: bytes, caption: str, meta: dict[str, Any]) -> bytes:
    """KEY.jpg, KEY.txt, KEY.json as ready-made tar members; a shard is these concatenated, then tar_end()."""
    return b"".join(sample_pieces(key, jpg, caption, meta))


def sample_pieces(key: str, jpg: bytes | memoryview, caption: str, meta: dict[str, Any]) -> list[bytes | memoryview]:
    """sample_bytes as pieces to write one after another: the image is passed on as it is, never copied."""
    header, tail = sample_frame(key, len(jpg), caption, meta)
    return [header, jpg, tail]


def sample_frame(key: str, jpg_length: int, caption: str, meta: dict[str, Any]) -> tuple[bytes, bytes]:
    """The bytes of a sample before its image (the KEY.jpg header) and after it (padding, KEY.txt, KEY.json): all of
    sample_bytes but the image, which needs only its length here."""
    check_key(key)
    text = (caption or "").encode("utf-8", "surrogatepass")
    document = json.dumps(meta, ensure_ascii=True, sort_keys=True, allow_nan=False).encode()
    padding = (-jpg_length) % tarfile.BLOCKSIZE
    return (_header(f"{key}.jpg", jpg_length), b"\0" * padding + _member(f"{key}.txt", text)
            + _member(f"{key}.json", document))


def tar_end(size_so_far: int) -> bytes:
    """Two zero blocks, then zeros up to a whole tar record, as tarfile writes them."""
    size = size_so_far + 2 * tarfile.BLOCKSIZE
    return b"\0" * (2 * tarfile.BLOCKSIZE + (-size) % TAR_RECORD)


def estimated_sample_bytes(jpg_bytes: int, caption_bytes: int) -> int:
    return jpg_bytes + caption_bytes + 600 + MEMBER_OVERHEAD


def json_value(value: Any) -> Any:
    """A JSON-safe value: NaN/inf become null, floats rounded so the text is stable."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 6)
    if isinstance(value, bytes):
        return None
    return value


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"
