"""Column names and Arrow schemas, loaded from the JSON files in curate/schemas/ (the one source of truth)."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

import pyarrow as pa

SCHEMA_DIR = files("curate") / "schemas"  # package data, so a built wheel carries them

KEY = "key"
ROW = "row"
URL = "url"
CAPTION = "caption"
CAPTION_REPAIR = "caption_repair"  # null: valid UTF-8 as given; "cp1252": decoded by the fallback (ingest)
WIDTH = "width"
HEIGHT = "height"
PWATERMARK = "pwatermark"
PUNSAFE = "punsafe"
AESTHETIC = "aesthetic"

DROP_STAGE = "drop_stage"
DROP_REASON = "drop_reason"
DROP_DETAIL = "drop_detail"
VERDICT_COLUMNS = (DROP_STAGE, DROP_REASON, DROP_DETAIL)

STATUS = "status"
JPG = "jpg"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
STORED_WIDTH = "stored_width"
STORED_HEIGHT = "stored_height"
SHA256 = "sha256"
PHASH = "phash"
DOWNLOAD_BYTES = "download_bytes"

AESTHETIC_SCORE = "aesthetic_score"
WATERMARK_PROB = "watermark_prob"
SCORES_SOURCE = "scores_source"
CLIP_SCORE = "clip_score"  # cosine of the CLIP ViT-L/14 image and caption embeddings
EMBEDDING = "embedding"

PASSES_THRESHOLDS = "passes_thresholds"  # dedup's survivor rule only; never written to the books
# WebDataset input: where a row's image lies in an input tar (read by the decode stage, never copied before)
TAR_PATH, TAR_OFFSET, TAR_SIZE, IMAGE_FORMAT = "tar_path", "tar_offset", "tar_size", "image_format"
LOCATION_COLUMNS = (TAR_PATH, TAR_OFFSET, TAR_SIZE, IMAGE_FORMAT)
SHARD = "shard"
POSITION = "position"
# Columns no schema file lists: the embedding (a fixed-size list, which the JSON types do not describe), the survivor
# rule's passes_thresholds, and where a WebDataset input row's image lies (read once by the decode).
UNLISTED_COLUMNS = frozenset({EMBEDDING, PASSES_THRESHOLDS, *LOCATION_COLUMNS})

_TYPES = {
    "string": pa.string(),
    "int64": pa.int64(),
    "int32": pa.int32(),
    "float64": pa.float64(),
    "float32": pa.float32(),
    "binary": pa.binary(),
    "bool": pa.bool_(),
}


@cache
def table_schema(name: str) -> pa.Schema:
    """The Arrow schema described by schemas/NAME.arrow.json."""
    spec = json.loads((SCHEMA_DIR / f"{name}.arrow.json").read_text())
    return pa.schema(
        [pa.field(f["name"], _TYPES[f["type"]], nullable=f["nullable"]) for f in spec["fields"]],
        metadata={"doc": spec["doc"]},
    )


@cache
def json_schema(name: str) -> dict:
    """The JSON schema in schemas/NAME.schema.json."""
    return json.loads((SCHEMA_DIR / f"{name}.schema.json").read_text())


def stage_columns(*names: str) -> list[pa.Field]:
    """The fields of several table schemas, in order."""
    return [field for name in names for field in table_schema(name)]


def listed_columns() -> frozenset[str]:
    """Every column some schema file in curate/schemas/ names."""
    names: set[str] = set()
    for entry in SCHEMA_DIR.iterdir():
        if entry.name.endswith(".arrow.json"):
            names.update(field["name"] for field in json.loads(entry.read_text())["fields"])
    return frozenset(names)


def _check_constants() -> None:
    """Columns once: every column constant here is a column of a schema file (or declared unlisted), so a renamed
    schema field fails at import, not as a missing column deep in a run."""
    constants = {value for name, value in globals().items() if name.isupper() and isinstance(value, str)}
    stray = sorted(constants - listed_columns() - UNLISTED_COLUMNS)
    if stray:
        raise ImportError(f"curate.schema: {stray} are columns of no schema file under curate/schemas/")


_check_constants()
