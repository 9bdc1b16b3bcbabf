"""Tar writing shared by both engines: each sample's json document, and TarSink, a tar written in position order
(the Spark engine's writer; the local engine lays its tars out at offsets instead, curate.wds.placed)."""

from __future__ import annotations

import hashlib
from typing import Any

from curate.schema import CAPTION, KEY, LOCATION_COLUMNS, POSITION, ROW, SHARD
from curate.stages.buckets import BUCKET_COLUMNS, BUCKET_HEIGHT, BUCKET_WIDTH, CROP_LEFT, CROP_TOP, SMALLER_THAN_BUCKET
from curate.stages.shard import shard_name, tar_end
from curate.storage import files as storage
from curate.storage.files import Location

# Columns not carried into a sample's json (they are its other members, or working and verdict columns).
CARRIED_SKIP = {"key", "row", "url", "caption", "jpg", "status", "error", "embedding", "drop_stage", "drop_reason",
                "drop_detail", "original_width", "original_height", "stored_width", "stored_height", "sha256",
                "aesthetic_score", "watermark_prob", "scores_source", "jpg_bytes", "position", "shard",
                *LOCATION_COLUMNS, CROP_TOP, CROP_LEFT, *BUCKET_COLUMNS, "consent_robots", "consent_tdm",
                "consent_headers", "faces_blurred"}


# The downloaded columns sample_document reads besides the metadata ones (the local writer reads only these).
DOCUMENT_COLUMNS = (KEY, "url", CAPTION, "original_width", "original_height", "stored_width", "stored_height", "sha256",
                    CROP_TOP, CROP_LEFT, "consent_robots", "consent_tdm", "consent_headers", "faces_blurred")

# What the tar writer takes of each placed sample besides its downloaded row (both engines' scatter/join).
PLACEMENT_COLUMNS = (ROW, SHARD, POSITION, "aesthetic_score", "watermark_prob", "scores_source", *BUCKET_COLUMNS)


def sample_document(row: dict[str, Any], metadata_columns: list[str]) -> dict[str, Any]:
    """The KEY.json document of one sample, with SDXL's conditioning: original size, crop, aspect bucket."""
    from curate.stages.shard import json_value

    document = {
        "key": row[KEY], "url": row["url"], "caption": row.get(CAPTION),
        "original_width": row["original_width"], "original_height": row["original_height"],
        "width": row["stored_width"], "height": row["stored_height"],
        "aesthetic_score": json_value(row.get("aesthetic_score")),
        "watermark_prob": json_value(row.get("watermark_prob")),
        "scores_source": row.get("scores_source"), "sha256": row["sha256"],
        "crop_top": row.get(CROP_TOP), "crop_left": row.get(CROP_LEFT),
        "bucket_width": row[BUCKET_WIDTH], "bucket_height": row[BUCKET_HEIGHT],
        "smaller_than_bucket": row[SMALLER_THAN_BUCKET],
        # the opt-out checks this sample passed (curate.stages.consent), for a dataset card
        "consent": {signal: row.get(f"consent_{signal}") for signal in ("robots", "tdm", "headers")},
        "faces_blurred": row.get("faces_blurred"),
    }
    document["metadata"] = {name: json_value(row.get(name)) for name in metadata_columns}
    return document


class TarSink:
    """One tar being written through the storage layer (a temporary name locally, the final key on an object store):
    samples' member bytes in, then close() adds the end-of-archive blocks and makes it appear whole, returning its
    wids index entry; abandon() leaves nothing. Both engines write their shards with it."""

    def __init__(self, destination: str | Location) -> None:
        self.final = destination
        self._writing = storage.open_write(destination)
        self.handle = self._writing.__enter__()
        self.digest, self.size, self.samples = hashlib.sha256(), 0, 0

    def add(self, data: bytes | memoryview) -> None:
        """One sample's members (curate.stages.shard.sample_bytes)."""
        self.handle.write(data)
        self.digest.update(data)
        self.size += len(data)
        self.samples += 1

    def close(self) -> dict[str, Any]:
        end = tar_end(self.size)
        self.handle.write(end)
        self.digest.update(end)
        self._writing.__exit__(None, None, None)
        return {"nsamples": self.samples, "filesize": self.size + len(end), "sha256": self.digest.hexdigest()}

    def abandon(self) -> None:
        error = RuntimeError(f"{self.final}: abandoned")
        self._writing.__exit__(RuntimeError, error, None)  # deletes the temporary file, or aborts the upload


def shard_path(shard_dir: Location, prefix: str, index: int) -> Location:
    return shard_dir / shard_name(prefix, index)
