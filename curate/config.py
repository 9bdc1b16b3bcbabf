"""The run configuration: one dataclass, filled from defaults, then curate.toml, then the command line."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curate.pipeline.recipes import DEFAULT_RECIPE, RECIPES, recipe_values

# The AI crawlers' robots.txt tokens honoured by default besides --user-agent-token: a site that shuts these out says
# it wants its content kept out of training sets (Common Crawl's, OpenAI's, Google's training token, Anthropic's).
AI_CRAWLER_TOKENS = ("CCBot", "GPTBot", "Google-Extended", "ClaudeBot", "anthropic-ai")

DEDUP_KINDS = ("url", "exact", "phash", "semantic")
SCORE_SOURCES = ("model", "metadata", "auto")
RESIZE_MODES = ("keep_ratio", "center_crop", "border", "keep_ratio_largest", "no", "bucket")  # img2dataset's + bucket
WHOLE_PICTURE_MODES = ("keep_ratio", "keep_ratio_largest", "no")  # where a normalized box of the original still fits
INPUT_FORMATS = ("auto", "parquet", "webdataset")
PRECISIONS = ("auto", "fp32", "bf16")
AESTHETIC_HEADS = ("v2", "v1")


@dataclass
class Config:
    """Every option of `curate run`; field names are the long option names with '_' for '-'."""

    recipe: str = DEFAULT_RECIPE  # a preset of the options below (curate.pipeline.recipes); given options win over it
    # prefilter and select
    min_size: int = 512
    threshold: float = 5.0
    max_watermark: float = 0.8
    max_unsafe: float | None = None
    min_clip_score: float | None = None  # None: off; clip_score is computed with --scores model either way
    scores: str = "model"
    dedup: list[str] = field(default_factory=lambda: list(DEDUP_KINDS))
    phash_distance: int = 4
    semdedup_threshold: float = 0.95
    semdedup_clusters: int | None = None
    # caption checks (prefilter; curate.stages.captions)
    min_caption_words: int = 0  # 0: off; DataComp keeps more than 2 words (the sdxl recipe: 3)
    max_caption_tokens: int | None = None  # None: off; CLIP's context is 77 tokens, SD/SDXL training truncates past it
    junk_captions: bool = False
    languages: list[str] | None = None  # None (or empty): off
    # hash lists and an evaluation set the run must not contain (curate.steps.blocklist, curate.steps.decontaminate)
    blocklist: list[str] | None = None  # parquet or text files of hex sha256 of URLs and/or image bytes
    decontaminate: str | None = None  # reference images: a folder/tars of images, or a parquet with phash/embedding
    decontaminate_distance: int = 4  # pHash bits
    decontaminate_cosine: float = 0.95  # CLIP cosine
    # input
    input_format: str = "auto"
    caption_field: str | None = None
    # download
    image_size: int = 1024
    resize_mode: str = "keep_ratio"
    buckets: int = 1024
    threads: int | None = None  # None: sized from the processes (download_workers)
    processes: int | None = None  # None: the usable cores (download_workers)
    timeout: float = 10.0
    max_image_bytes: int = 32 * 1024 * 1024
    max_per_host: int = 4
    ca_bundle: str | None = None
    allow_loopback: bool = False
    allow_private_network: bool = False
    allow_link_local: bool = False
    disallowed_header_directives: list[str] = field(
        default_factory=lambda: ["noai", "noimageai", "noindex", "noimageindex", "noml"]
    )
    user_agent_token: str = "img2dataset"
    respect_robots: bool = True
    robots_agents: list[str] = field(default_factory=lambda: list(AI_CRAWLER_TOKENS))
    respect_tdm: bool = True
    blur_faces: bool = False
    bbox_column: str | None = None
    batch_size_rows: int = 10_000
    # models
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    model_cache: str = "~/.cache/curate"
    clip_weights: str | None = None
    aesthetic_weights: str | None = None
    aesthetic_head: str = "v2"
    watermark_weights: str | None = None
    safety_weights: str | None = None
    # shard
    world_size: int = 256
    workers_per_rank: int = 8
    target_shard_size: int = 1 << 30
    global_batch_size: int = 2048
    seed: int = 0
    shard_name: str = "shard"

    def validate(self) -> Config:
        """Raise ValueError naming the option, and what it accepts, when a value cannot work."""
        for spec in dataclasses.fields(self):
            _check_type(spec.name, str(spec.type), getattr(self, spec.name))
        _check_choices("dedup", self.dedup, DEDUP_KINDS)
        _check_choices("scores", [self.scores], SCORE_SOURCES)
        _check_choices("resize_mode", [self.resize_mode], RESIZE_MODES)
        _check_choices("aesthetic_head", [self.aesthetic_head], AESTHETIC_HEADS)
        _check_choices("input_format", [self.input_format], INPUT_FORMATS)
        _check_choices("precision", [self.precision], PRECISIONS)
        _check_choices("recipe", [self.recipe], tuple(RECIPES))
        _check_languages(self.languages)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device: {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        for name in ("world_size", "workers_per_rank", "image_size", "threads", "processes", "target_shard_size",
                     "max_image_bytes", "batch_size_rows", "batch_size", "global_batch_size", "max_per_host",
                     "buckets"):
            if getattr(self, name) is not None and getattr(self, name) < 1:  # None: auto (threads, processes)
                raise ValueError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        _check_buckets(self.buckets)
        if self.min_size < 0:
            raise ValueError(f"--min-size must be 0 or more, got {self.min_size}")
        _check_range("threshold", self.threshold, -math.inf, math.inf)  # the predictor's output is not bounded
        _check_range("max_watermark", self.max_watermark, 0.0, 1.0)
        _check_range("max_unsafe", self.max_unsafe, 0.0, 1.0)
        _check_range("min_clip_score", self.min_clip_score, -1.0, 1.0)
        if self.min_clip_score is not None and self.scores == "metadata":
            raise ValueError("--min-clip-score needs --scores model (or auto): clip_score is the ViT-L/14 cosine of "
                             "the image and its caption, computed from the pixels; LAION's `similarity` column is "
                             "ViT-B/32's")
        _check_range("semdedup_threshold", self.semdedup_threshold, -1.0, 1.0)
        _check_range("timeout", self.timeout, 0.0, math.inf, low_open=True)
        _check_range("decontaminate_cosine", self.decontaminate_cosine, -1.0, 1.0)
        if not 0 <= self.decontaminate_distance <= 16:
            raise ValueError(f"--decontaminate-distance must be between 0 and 16, got {self.decontaminate_distance}")
        if not 0 <= self.phash_distance <= 16:
            raise ValueError(f"--phash-distance must be between 0 and 16, got {self.phash_distance}")
        if self.min_caption_words < 0:
            raise ValueError(f"--min-caption-words must be 0 (off) or more, got {self.min_caption_words}")
        if self.max_caption_tokens is not None and self.max_caption_tokens < 3:
            raise ValueError(f"--max-caption-tokens counts CLIP's start and end tokens too: at least 3, got "
                             f"{self.max_caption_tokens} (77 is CLIP's context)")
        if self.semdedup_clusters is not None and self.semdedup_clusters < 1:
            raise ValueError(f"--semdedup-clusters must be at least 1, got {self.semdedup_clusters}")
        if self.bbox_column is not None and (not self.blur_faces or self.resize_mode not in WHOLE_PICTURE_MODES):
            raise ValueError(f"--bbox-column needs --blur-faces and a resize mode that keeps the whole picture "
                             f"({', '.join(WHOLE_PICTURE_MODES)}): its boxes are fractions of the original image, "
                             f"which --resize-mode {self.resize_mode} crops or pads")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", self.shard_name):
            raise ValueError(f"--shard-name {self.shard_name!r}: use letters, digits, '.', '_' and '-' only")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_BUCKET_BASE = 4096


def _check_buckets(base: int) -> None:
    """The bucket base must be a multiple of 64 (every side of SDXL's list is) in 64..4096, or the list collapses."""
    if base % 64 or not 64 <= base <= MAX_BUCKET_BASE:
        low, high = max(64, base // 64 * 64), min(MAX_BUCKET_BASE, (base // 64 + 1) * 64)
        raise ValueError(f"--buckets must be a multiple of 64 between 64 and {MAX_BUCKET_BASE} (the sides of the "
                         f"SDXL bucket list are multiples of 64: 1024 for SDXL, 512 for SD), got {base}; e.g. "
                         f"{low if abs(base - low) <= abs(high - base) else high}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list[str]": "a comma list of strings"}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """The value has the field's type (TOML and Python callers can pass anything); ints count as floats."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = kinds[0]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "str": isinstance(value, str), "bool": isinstance(value, bool),
          "list[str]": isinstance(value, list) and all(isinstance(item, str) for item in value)}.get(kind, True)
    if not ok:
        raise ValueError(f"{_flag(name)} (`{name.replace('_', '-')}` in a config file) must be "
                         f"{_TYPE_NAMES.get(kind, kind)}, got {value!r}")


def _check_choices(name: str, values: list[str], allowed: tuple[str, ...]) -> None:
    unknown = [value for value in values if value not in allowed]
    if unknown:
        raise ValueError(f"{_flag(name)}: {', '.join(map(repr, unknown))} is not allowed; choose from "
                         f"{', '.join(allowed)}")


def _check_range(name: str, value: float | None, low: float, high: float, low_open: bool = False) -> None:
    """A finite number within [low, high] ((low, high] when low_open); None passes (the option is off)."""
    if value is None:
        return
    inside = (low < value if low_open else low <= value) and value <= high
    if not math.isfinite(value) or not inside:
        bounds = (f"{'(' if low_open else '['}{low:g}, {high:g}]" if math.isfinite(high) else
                  f"more than {low:g}" if math.isfinite(low) else "(any finite value)")
        raise ValueError(f"{_flag(name)} must be a finite number in {bounds}, got {value!r}")


def _check_languages(languages: list[str] | None) -> None:
    if not languages:
        return
    from curate.stages.captions import known_languages

    unknown = [language for language in languages if language not in known_languages()]
    if unknown:
        raise ValueError(f"--languages: {', '.join(map(repr, unknown))} is not a language py3langid detects; use "
                         f"ISO 639-1 codes such as en, de, fr ({len(known_languages())} known)")


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> Config:
    """Defaults, then the recipe's preset (--recipe, from the command line or the file), then the TOML file (keys
    are long option names), then command-line values that were given."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"--config: no file at {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"{path}: not valid TOML ({error}); keys are the long option names") from None
        known = {f.name for f in dataclasses.fields(Config)}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"{path}: unknown key {key!r}; keys are the long option names of `curate run`")
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = values.get("recipe", DEFAULT_RECIPE)
    if isinstance(recipe, str):  # anything else fails validate's type check, naming --recipe
        values = {**recipe_values(recipe), **values}
    # list options arrive as comma lists
    for name in ("dedup", "disallowed_header_directives", "languages", "robots_agents", "blocklist"):
        if isinstance(values.get(name), str):
            values[name] = [item.strip() for item in values[name].split(",") if item.strip()]
    return Config(**values).validate()


OPTION_HELP: dict[str, str] = {
    "recipe": f"A published recipe as a preset of the options ({', '.join(RECIPES)}); options given on the command "
              f"line or in the config file override it.",
    "min_size": "Drop images whose original shorter side is below this many pixels (metadata before download, "
                "measured after).",
    "threshold": "Keep aesthetic score >= this (5.0 is LAION-Aesthetics v2 5+).",
    "max_watermark": "Drop watermark probability above this.",
    "max_unsafe": "Drop punsafe (NSFW probability) above this: LAION's CLIP-based detector's with --scores model, "
                  "the metadata column's otherwise (off unless set).",
    "min_clip_score": "Drop images whose CLIP ViT-L/14 image-caption cosine (clip_score, --scores model) is below "
                      "this, and images without a caption (off unless set; L/14 cosines are on another scale than "
                      "the ViT-B/32 ones of LAION's 0.28 rule).",
    "scores": "Where scores come from: model (computed on the pixels), metadata (LAION's columns, also applied "
              "before download), auto (metadata when every row has it and --min-clip-score is off).",
    "dedup": "Comma list of duplicate kinds to remove: url,exact,phash,semantic (semantic needs the CLIP embeddings "
             "of --scores model: with metadata scores it is skipped, and the summary says so).",
    "phash_distance": "pHash duplicates: Hamming distance at most this many bits.",
    "semdedup_threshold": "Semantic duplicates: CLIP cosine similarity at least this.",
    "semdedup_clusters": "Semantic dedup k-means clusters (default from the row count).",
    "min_caption_words": "Drop captions with fewer words than this, before download (0: off; DataComp keeps more "
                         "than 2, the sdxl recipe uses 3). Words are runs between spaces; in scripts written without "
                         "spaces each Han ideograph or kana is a word and Thai, Lao, Khmer or Myanmar text a word "
                         "per 4 characters.",
    "max_caption_tokens": "Drop captions longer than this many CLIP tokens, start and end included (off unless set; "
                          "SD/SDXL training truncates past 77).",
    "junk_captions": "Drop junk alt-text before download: file names (IMG_1234.JPG, DSC0001), bare URLs, keyword "
                     "stuffing (one word 3 times or more and at least half the words: 'dog dog dog v17').",
    "languages": "Comma list of caption languages to keep (ISO 639-1, e.g. en), detected by py3langid; off when "
                 "empty.",
    "blocklist": "Comma list of parquet (a sha256 column) or text files (a digest a line) of hex sha256 digests of "
                 "URLs and/or downloaded image bytes; matching rows are dropped (blocklisted_url before the "
                 "download, blocklisted_image after it).",
    "decontaminate": "Reference images the output must not contain (an evaluation set): a folder or tars of images, "
                     "or a parquet (a previous run's samples.parquet) with phash and/or embedding columns; images "
                     "within --decontaminate-distance pHash bits or --decontaminate-cosine CLIP cosine are dropped.",
    "decontaminate_distance": "Decontamination: pHash Hamming distance to a reference image at most this many bits.",
    "decontaminate_cosine": "Decontamination: CLIP image cosine to a reference image at least this (--scores model).",
    "input_format": "Input kind: parquet (metadata to download), webdataset (images already downloaded: tars, "
                    "img2dataset's webdataset, files or parquet output), or auto (downloaded images when the input "
                    "holds any; refused when it also holds metadata parquet).",
    "caption_field": "WebDataset input: the json field holding the caption when a sample has no .txt member (the "
                     "caption, not also a column).",
    "image_size": "Resize so the shorter side is this many pixels (never upscales).",
    "buckets": "Base size of the SDXL-style aspect buckets (~base^2 pixels, sides multiples of 64): a multiple of "
               "64 in 64..4096; 1024 for SDXL (40 buckets), 512 for the SD recipe.",
    "resize_mode": "img2dataset resize mode: keep_ratio, center_crop, border, keep_ratio_largest, no; or bucket "
                   "(scale to cover the aspect bucket, centre crop, never upscale). Each sample records its crop "
                   "(crop_top/crop_left, SDXL's crop conditioning, in the scaled image's pixels; 0 when uncropped).",
    "threads": "Download threads per process (default: 32, fewer on machines with more than 8 cores, at least 8: "
               "about 256 fetches in flight in all).",
    "processes": "Download processes (default: the usable cores).",
    "timeout": "Seconds allowed for one URL, redirects and body included.",
    "max_image_bytes": "Largest body fetched, in bytes.",
    "max_per_host": "At most this many concurrent requests to one host from each download process (so up to "
                    "--processes times this many in all).",
    "ca_bundle": "PEM file of extra certificate authorities to trust for HTTPS (e.g. a test or corporate CA).",
    "allow_loopback": "Allow URLs on loopback addresses only (127.0.0.0/8, ::1): what tests and the demo need.",
    "allow_private_network": "Allow URLs on loopback and private addresses (RFC 1918, ULA fc00::/7); not link-local.",
    "allow_link_local": "Also allow link-local addresses (169.254.0.0/16, fe80::/10) and the cloud metadata service "
                        "(169.254.169.254, fd00:ec2::254, metadata.google.internal). Only on a trusted network.",
    "disallowed_header_directives": "Comma list of X-Robots-Tag directives that opt an image out (empty: none).",
    "user_agent_token": "The agent name X-Robots-Tag directives and robots.txt groups are matched against.",
    "respect_robots": "Fetch each origin's robots.txt once (RFC 9309) and never fetch a URL it disallows for "
                      "--user-agent-token or any --robots-agents token (a 4xx robots.txt allows all; 5xx, 429 or "
                      "unreachable disallows all).",
    "robots_agents": "Comma list of further robots.txt user-agent tokens (AI crawlers) whose exclusion also "
                     "excludes this run (empty: only --user-agent-token).",
    "respect_tdm": "Honour W3C TDMRep reservations: the tdm-reservation: 1 response header and each origin's "
                   "/.well-known/tdmrep.json.",
    "blur_faces": "Gaussian-blur faces in the stored images before they are sharded (OpenCV's bundled Haar "
                  "cascade, or the boxes of --bbox-column); the count goes in faces_blurred.",
    "bbox_column": "Metadata column of face boxes detected elsewhere (img2dataset's bbox_col: a list of "
                   "normalized (x0, y0, x1, y1) boxes); with --blur-faces these are blurred instead of detecting.",
    "batch_size_rows": "Rows per batch (and per checkpoint part).",
    "device": "Model device: auto, cpu or cuda.",
    "precision": "Model precision: auto (bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, else fp32), fp32, bf16.",
    "batch_size": "Images per model batch.",
    "model_cache": "Where official weights are downloaded to.",
    "clip_weights": "Local file (or URL) of the CLIP ViT-L/14 OpenAI weights.",
    "aesthetic_weights": "Local file (or URL) of the aesthetic predictor head.",
    "aesthetic_head": "Aesthetic head: v2 (MLP) or v1 (linear).",
    "watermark_weights": "Local file (or URL) of the LAION watermark detector.",
    "safety_weights": "Local copy (or URL) of LAION's clip_autokeras_binary_nsfw.zip (the NSFW detector; its "
                      "unzipped folder works too).",
    "world_size": "Training ranks (GPUs) that will read the shards.",
    "workers_per_rank": "Data-loader workers per rank; shard count is a multiple of world size x this.",
    "target_shard_size": "Aim for shards of about this many bytes.",
    "global_batch_size": "Global batch, for the steps-per-epoch figure in index.json.",
    "seed": "Seed of the shuffle across shards.",
    "shard_name": "Shard file name prefix.",
}


def option_fields() -> list[dataclasses.Field]:
    """The Config fields exposed as command-line options, in declaration order."""
    return [f for f in dataclasses.fields(Config) if f.name in OPTION_HELP]


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


def download_workers(config: Config) -> tuple[int, int]:
    """(processes, threads per process): the usable cores, and about 256 fetches in flight in all (8 to 32 each)."""
    processes = config.processes or len(os.sched_getaffinity(0))
    threads = config.threads or max(8, min(32, 256 // processes))
    return processes, threads
