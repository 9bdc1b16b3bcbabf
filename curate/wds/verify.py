"""`curate verify`: re-read every shard and check it against index.json and samples.parquet."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from curate.schema import DROP_REASON, KEY
from curate.stages.shard import KEY_PATTERN
from curate.storage import files as storage
from curate.storage.files import Location

EXTENSIONS = {"jpg", "txt", "json"}


def verify_shard(path: Location, entry: dict) -> tuple[list[str], list[str]]:
    """(problems, keys) of one tar against its index entry."""
    problems: list[str] = []
    data = path.read_bytes()
    if len(data) != entry["filesize"]:
        problems.append(f"{path.name}: {len(data)} bytes, index says {entry['filesize']}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        problems.append(f"{path.name}: sha256 differs from index.json")
    members: dict[str, set[str]] = defaultdict(set)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:  # the bytes just hashed, local or remote
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                if not KEY_PATTERN.match(stem) or "/" in member.name:
                    problems.append(f"{path.name}: unexpected member {member.name!r}")
                members[stem].add(ext)
    except tarfile.TarError as error:
        return [*problems, f"{path.name}: unreadable tar ({error})"], []
    for key, extensions in members.items():
        if extensions != EXTENSIONS:
            problems.append(f"{path.name}: sample {key} has {sorted(extensions)}, expected {sorted(EXTENSIONS)}")
    if len(members) != entry["nsamples"]:
        problems.append(f"{path.name}: {len(members)} samples, index says {entry['nsamples']}")
    return problems, list(members)


def verify(output: str | Path) -> list[str]:
    """Every problem found; an empty list means the shards are whole."""
    out = storage.location(output)
    index_path = out / "shards" / "index.json"
    if not index_path.exists():
        return [f"{index_path}: missing"]
    index = json.loads(index_path.read_text())
    problems: list[str] = []
    keys: list[str] = []
    counts = {entry["nsamples"] for entry in index["shardlist"]}
    if len(counts) > 1:
        problems.append(f"shards hold unequal sample counts: {sorted(counts)}")
    unit = index.get("world_size", 1) * index.get("workers_per_rank", 1)
    if len(index["shardlist"]) % unit:
        problems.append(f"{len(index['shardlist'])} shards is not a multiple of world_size x workers_per_rank")
    for entry in index["shardlist"]:
        path = index_path.parent / entry["url"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        found, shard_keys = verify_shard(path, entry)
        problems += found
        keys += shard_keys
    if len(set(keys)) != len(keys):
        problems.append(f"{len(keys) - len(set(keys))} keys appear in more than one shard")
    samples_path = out / "samples.parquet"
    if samples_path.exists():
        expected = set(storage.read_table(samples_path, columns=["key"])["key"].to_pylist())
        if expected != set(keys):
            problems.append(f"samples.parquet lists {len(expected)} keys, the shards hold {len(set(keys))}; "
                            f"{len(expected ^ set(keys))} differ")
    stale = stale_shards(out, set(keys))
    return problems + ([stale] if stale else [])


def stale_shards(out: Location, shard_keys: set[str]) -> str | None:
    """Why the shards no longer match the latest `select` (a re-cut not followed by `curate shard`), or None.

    Compares content, not timestamps: the rows alive in the select checkpoint must be exactly the sharded keys
    plus the shard remainder the ledger lists.
    """
    select = out / "stages" / "select"
    if not select.is_dir():
        return None  # shards without the run's checkpoints (copied, or the checkpoints deleted): nothing to compare
    if not (select / "_SUCCESS").exists():
        return (f"shards are stale: {select} is unfinished (a stage was re-run after the shards were written); "
                f"run `curate select {out}`, then `curate shard {out}`")
    parts = storage.glob(select, "part-*.parquet")
    if not parts:
        return None
    table = pa.concat_tables([storage.read_table(part, columns=[KEY, DROP_REASON]) for part in parts])
    alive = set(table.filter(pc.is_null(table[DROP_REASON]))[KEY].to_pylist())
    ledger_path, remainder = out / "ledger.parquet", set()
    if ledger_path.exists():
        ledger = storage.read_table(ledger_path, columns=[KEY, "reason"])
        remainder = set(ledger.filter(pc.equal(ledger["reason"], "shard_remainder"))[KEY].to_pylist())
    if alive != shard_keys | remainder:
        changed = len(alive ^ (shard_keys | remainder))
        return (f"shards are stale: the latest `curate select` keeps {len(alive)} rows, the shards and their "
                f"remainder hold {len(shard_keys | remainder)} ({changed} differ); run `curate shard {out}`")
    return None
