"""How each stage's arguments come from Config: `bind_NAME(config, facts)` turns a Config into the function an
executor applies to each batch (the map stages, and the apply step of prefilter and dedup): the local executor runs it
over checkpoint parts, the Spark executor through mapInArrow, so neither maps options to arguments itself. The steps
themselves (order, columns, options, rerun rules) are declared in curate.pipeline.steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from curate.config import Config

if TYPE_CHECKING:
    from curate.stages.download import DownloadOptions
    from curate.stages.shard import ShardPlan
    from curate.wds.inputs import Inputs

Batch = Callable[[pa.Table], pa.Table]


@dataclass(frozen=True)
class RunFacts:
    """What a run knows before its first judging stage."""

    scores: str = "auto"  # "model" or "metadata": --scores auto resolved from the ingested input (ingest: unknown)
    stored: bool = False  # the images lie in WebDataset input tars: read, not fetched


def resolve_scores(config: Config, score_column_nulls: Callable[[], dict[str, int]]) -> str:
    """model or metadata. --scores auto takes the metadata's scores when every row carries LAION's aesthetic and
    watermark columns (score_column_nulls: the null count of each of them the input has, asked only for auto), the
    models' otherwise, and always the models' under --min-clip-score (only they give a clip_score)."""
    from curate.schema import AESTHETIC, PWATERMARK

    if config.scores != "auto":
        return config.scores
    if config.min_clip_score is not None:
        return "model"
    nulls = score_column_nulls()
    return "metadata" if all(nulls.get(c) == 0 for c in (AESTHETIC, PWATERMARK)) else "model"


def bind_ingest(config: Config, facts: RunFacts) -> Callable[[str, int, list[dict[str, Any]]], Iterator[pa.Table]]:
    """ingest as a reader: (input entry, its first row number, a list that collects damaged inputs) -> the entry's
    rows in the canonical table, batch_size_rows at a time, numbered on from the first row. An entry is a parquet
    file, or with stored images one of input_entries' (a tar, an img2dataset files folder or shard parquet). The
    local executor reads every input with it, Spark the stored ones (its own parquet reader applies
    stages.ingest.normalize the same way)."""
    from curate.stages.ingest import normalize
    from curate.storage.checkpoint import read_parquet_batches
    from curate.wds.img2dataset import read_stored_rows
    from curate.wds.reader import normalize_rows

    batch_rows, caption_field = config.batch_size_rows, config.caption_field

    def read(path: str, first_row: int, damage: list[dict[str, Any]]) -> Iterator[pa.Table]:
        row = first_row
        if facts.stored:
            stored = read_stored_rows(path, batch_rows, caption_field, damage)
            batches = (normalize_rows(batch, row) for batch in stored)
        else:
            batches = (normalize(batch, row) for batch in read_parquet_batches(path, batch_rows))
        for batch in batches:  # each batch is numbered when the one before it has been counted
            row += batch.num_rows
            yield batch
    return read


def input_entries(config: Config, inputs: list[str]) -> Inputs:
    """What the input patterns name under --input-format: its entries, whether their images are stored (read, not
    fetched: RunFacts.stored), and what is left out; raises for a mix of downloaded shards and metadata (auto)."""
    from curate.wds.inputs import list_inputs

    return list_inputs(inputs, config.input_format)


def stored_input(config: Config, inputs: list[str]) -> bool:
    """Whether the input's images are already downloaded (tars, img2dataset folders or parquet): RunFacts.stored."""
    return input_entries(config, inputs).stored


def prefilter_arguments(config: Config, facts: RunFacts) -> dict[str, Any]:
    """The prefilter's thresholds: metadata scores are judged before download only when they are the scores."""
    on_metadata = facts.scores == "metadata"
    return {"min_size": config.min_size, "max_watermark": config.max_watermark if on_metadata else None,
            "max_unsafe": config.max_unsafe, "aesthetic_threshold": config.threshold if on_metadata else None,
            "min_caption_words": config.min_caption_words, "max_caption_tokens": config.max_caption_tokens,
            "junk_captions": config.junk_captions, "languages": list(config.languages or [])}


def bind_prefilter(config: Config, facts: RunFacts) -> Callable[[pa.Table, pa.Table | None], pa.Table]:
    """prefilter's apply step: a batch and its url+caption verdicts (from the executor's grouping) -> judged batch."""
    from curate.stages import prefilter

    judged_by = prefilter_arguments(config, facts)

    def apply(table: pa.Table, url_flags: pa.Table | None) -> pa.Table:
        return prefilter.prefilter(table, url_flags, **judged_by, check_urls=not facts.stored)
    return apply


DOWNLOAD_OPTIONS = frozenset({  # the Config fields download_options reads
    "image_size", "resize_mode", "buckets", "threads", "processes", "timeout", "max_image_bytes", "allow_loopback",
    "allow_private_network", "allow_link_local", "disallowed_header_directives", "user_agent_token", "max_per_host",
    "ca_bundle", "respect_robots", "robots_agents", "respect_tdm", "blur_faces", "bbox_column"})


def download_options(config: Config) -> DownloadOptions:
    from curate.config import download_workers
    from curate.net.fetch import FetchPolicy
    from curate.stages.download import DownloadOptions

    c = config
    policy = FetchPolicy(timeout=c.timeout, max_bytes=c.max_image_bytes,
                         allow_private_network=c.allow_private_network, allow_loopback=c.allow_loopback,
                         allow_link_local=c.allow_link_local,
                         disallowed_directives=tuple(d.lower() for d in c.disallowed_header_directives),
                         user_agent_token=c.user_agent_token, ca_bundle=c.ca_bundle,
                         honour_tdm_header=c.respect_tdm)
    return DownloadOptions(image_size=c.image_size, resize_mode=c.resize_mode, buckets=c.buckets,
                           threads=download_workers(c)[1], max_per_host=c.max_per_host, policy=policy,
                           respect_robots=c.respect_robots, robots_agents=tuple(c.robots_agents),
                           respect_tdm=c.respect_tdm, blur_faces=c.blur_faces, bbox_column=c.bbox_column)


def bind_download(config: Config, facts: RunFacts) -> Batch:
    """A batch with the download columns (fetched, or read from the input tars). The local executor streams its
    parts through download_stream with the same options instead, so no part waits for its slowest URL."""
    import uuid

    from curate.stages.consent import run_cache
    from curate.stages.download import download
    from curate.stages.stored import decode_stored

    options = download_options(config)
    run = uuid.uuid4().hex  # names this run's opt-out files in each worker process's cache (Spark: across tasks)
    if facts.stored:
        return lambda table: decode_stored(table, options)
    return lambda table: download(table, options, run_cache(run))


def bind_score(config: Config, facts: RunFacts, scorer: Callable[[], Any] | None = None) -> Batch:
    """A downloaded batch -> its scores (the models', or the metadata's), without its image bytes. `scorer` gives
    this process's models (Spark: on the GPU its task holds); by default load_scorer's, cached per process."""
    from curate.schema import JPG
    from curate.stages import select
    from curate.stages.download import image_bytes_last

    def models() -> Any:
        from curate.stages.score import load_scorer

        return scorer() if scorer is not None else load_scorer(config)

    def apply(table: pa.Table) -> pa.Table:
        table = image_bytes_last(table)
        if facts.scores == "model":
            from curate.stages.score import score_images

            table = score_images(table, models())
        else:
            table = select.scores_from_metadata(table)
        return table.drop_columns([c for c in [JPG] if c in table.column_names])
    return apply


def metadata_thresholds(config: Config) -> dict[str, Any]:
    """The thresholds on LAION's metadata (a rerun may change them; prefilter.recoverable counts what they'd keep)."""
    return {name: getattr(config, name) for name in ("min_size", "threshold", "max_watermark", "max_unsafe")}


def select_arguments(config: Config) -> dict[str, Any]:
    return {"threshold": config.threshold, "min_size": config.min_size, "max_watermark": config.max_watermark,
            "max_unsafe": config.max_unsafe, "min_clip_score": config.min_clip_score}


def bind_survivor_rule(config: Config, facts: RunFacts) -> Batch:
    """dedup's per-row input to the survivor rule: whether select would keep the row on its own."""
    from curate.stages import select

    arguments = select_arguments(config)
    return lambda table: select.with_threshold_pass(table, **arguments)


def bind_select(config: Config, facts: RunFacts) -> Batch:
    from curate.stages import select
    from curate.stages.verdict import with_verdict_columns

    arguments = select_arguments(config)
    return lambda table: select.select(with_verdict_columns(table), **arguments)


def shard_plan(config: Config, survivors: int, total_bytes: int) -> ShardPlan:
    """The shard plan from the survivors' count and bytes (ShardPlanError when fewer survive than there are loader
    workers). None surviving is a result, not an error: no shard, and books that say why."""
    from curate.stages import shard

    c = config
    if survivors == 0:
        return shard.ShardPlan(0, 0, 0, c.world_size, c.workers_per_rank, c.global_batch_size)
    return shard.plan_shards(survivors, total_bytes, c.world_size, c.workers_per_rank, c.target_shard_size,
                             c.global_batch_size)


def bind_shard(config: Config, facts: RunFacts, plan: ShardPlan) -> Batch:
    """shard's apply step: a batch with each row's shuffle position (from the executor's global order; -1 for a row
    dropped before) -> its shard (-1 and a shard_remainder verdict for the samples that do not fill every shard
    equally) and its aspect bucket."""
    import pyarrow.compute as pc

    from curate.schema import POSITION, SHARD
    from curate.stages import shard
    from curate.stages.buckets import add_buckets
    from curate.stages.verdict import alive, with_reason

    base = config.buckets
    detail = f"{plan.remainder} samples do not fill {plan.num_shards} equal shards"

    def apply(table: pa.Table) -> pa.Table:
        positions = table[POSITION].to_numpy()
        table = shard.assign_shards(table.drop_columns([c for c in (POSITION, SHARD) if c in table.column_names]),
                                    plan, positions)
        table = add_buckets(table, base)
        return with_reason(table, pc.and_(alive(table), pc.equal(table[SHARD], -1)), "shard", "shard_remainder",
                           detail)
    return apply
