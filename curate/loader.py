"""Read curated shards back for training: one aspect bucket per batch, and the same number of batches on every rank.

    from curate.loader import make_loader
    loader = make_loader("out/shards/index.json", batch_size=32, num_workers=8, tokenizers={"input_ids": "ViT-L-14"})
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:  # len(loader) batches, identical on every rank
            ...

Each epoch the shard list is shuffled with (seed, epoch), rank r takes shards[r::world_size] and its worker w takes
[w::num_workers] of those (webdataset's split_by_node and split_by_worker). A worker shuffles its samples in a
bounded buffer and puts each in the buffer of its aspect bucket; a bucket's buffer that reaches batch_size is one
batch. Every rank then stops after the same number of batches: the smallest number of full bucket batches any rank
can form this epoch, computed before the epoch from the samples per bucket of every shard (index.json records them;
for a plain shard list they are counted once by reading the shards). The samples left over (a part-filled bucket at
the end of a worker, and the full batches of a richer rank beyond the common count) are the epoch's remainder: not
read this epoch, other samples the next, as the shards are reshuffled. Nothing is carried across ranks, so no rank
waits for another.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import mmh3
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curate.stages.buckets import SDXL_BASE, bucket_name, cover_geometry, nearest_bucket

log = logging.getLogger(__name__)
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class Shard:
    url: str
    nsamples: int
    buckets: dict[str, int] = field(default_factory=dict)  # "WIDTHxHEIGHT" -> samples


def _join(folder: str, name: str) -> str:
    return name if "://" in name or name.startswith("/") else f"{folder.rstrip('/')}/{name}"


def _read_json(url: str) -> Any:
    with fsspec.open(url, "rt") as handle:
        return json.load(handle)


def read_shardlist(source: str | Sequence[str], base: int = SDXL_BASE) -> list[Shard]:
    """Shards with sample and bucket counts from index.json, sizes.json, a shard folder or a list of tar URLs."""
    if isinstance(source, str) and not source.endswith(".tar") and not source.endswith(".json"):
        source = _join(source, "index.json")  # a shard folder
    if isinstance(source, str) and source.endswith(".json"):
        folder, document = source.rsplit("/", 1)[0] if "/" in source else ".", _read_json(source)
        if "shardlist" in document:
            return [Shard(_join(folder, e["url"]), int(e["nsamples"]), dict(e.get("buckets") or {}) or
                          count_buckets(_join(folder, e["url"]), base)) for e in document["shardlist"]]
        urls = [_join(folder, name) for name in document]  # sizes.json: name -> samples
    else:
        from braceexpand import braceexpand

        urls = [url for pattern in ([source] if isinstance(source, str) else source) for url in braceexpand(pattern)]
    known = _sibling_index(urls)
    shards = []
    for url in urls:
        entry = known.get(url.rsplit("/", 1)[-1])
        counts = dict(entry.get("buckets") or {}) if entry else {}
        counts = counts or count_buckets(url, base)
        shards.append(Shard(url, sum(counts.values()), counts))
    return shards


def _sibling_index(urls: list[str]) -> dict[str, dict[str, Any]]:
    """The entries of an index.json beside the shards, by file name ({} when there is none)."""
    if not urls:
        return {}
    index = _join(urls[0].rsplit("/", 1)[0] if "/" in urls[0] else ".", "index.json")
    fs, path = fsspec.core.url_to_fs(index)
    if not fs.exists(path):
        return {}
    return {entry["url"].rsplit("/", 1)[-1]: entry for entry in _read_json(index).get("shardlist", [])}


def iter_samples(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar, streamed: {"__key__", "jpg", "txt", "json"} (members grouped by their stem)."""
    current: dict[str, Any] = {}
    with fsspec.open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
        for member in tar:
            if not member.isfile() or "." not in member.name:
                continue
            stem, extension = member.name.split(".", 1)
            if current and current["__key__"] != stem:
                yield current
                current = {}
            current["__key__"] = stem
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            current[extension] = json.loads(data) if extension == "json" else data
    if current:
        yield current


def sample_bucket(document: dict[str, Any], base: int = SDXL_BASE) -> tuple[int, int]:
    """The sample's (bucket width, bucket height): from its json, or nearest its stored size for other shards."""
    if document.get("bucket_width") and document.get("bucket_height"):
        return int(document["bucket_width"]), int(document["bucket_height"])
    return nearest_bucket(int(document["width"]), int(document["height"]), base)


def count_buckets(url: str, base: int = SDXL_BASE) -> dict[str, int]:
    """Samples per bucket of one shard, read from its json members (for shards without index.json counts)."""
    counts: dict[str, int] = {}
    for sample in iter_samples(url):
        name = bucket_name(*sample_bucket(sample.get("json") or {}, base))
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each rank's workers read this epoch, and the batches every rank yields."""
    workers: list[list[list[Shard]]]  # [rank][worker] -> shards
    batches_per_worker: list[list[int]]  # full bucket batches each worker can form
    steps: int  # batches every rank yields: the smallest rank's total

    def remainder(self, rank: int, batch_size: int) -> int:
        """Samples of this rank not read this epoch."""
        return sum(s.nsamples for shards in self.workers[rank] for s in shards) - self.steps * batch_size


def plan_epoch(shards: list[Shard], world_size: int, num_workers: int, batch_size: int, seed: int,
               epoch: int) -> EpochPlan:
    """Shard order from (seed, epoch), split by rank then worker; the common batch count from the bucket counts."""
    order = np.random.default_rng([seed, epoch]).permutation(len(shards)).tolist()
    workers = [[[shards[i] for i in order[rank::world_size][worker::num_workers]] for worker in range(num_workers)]
               for rank in range(world_size)]
    per_worker = [[_full_batches(mine, batch_size) for mine in rank] for rank in workers]
    return EpochPlan(workers, per_worker, min(sum(rank) for rank in per_worker))


def _full_batches(shards: list[Shard], batch_size: int) -> int:
    totals: dict[str, int] = {}
    for shard in shards:
        for name, count in shard.buckets.items():
            totals[name] = totals.get(name, 0) + count
    return sum(count // batch_size for count in totals.values())


def dropped_caption(key: str, seed: int, epoch: int, probability: float) -> bool:
    """Whether this sample's caption is dropped this epoch: a draw from (seed, epoch, key), the same on any layout."""
    return mmh3.hash64(f"{seed}:{epoch}:{key}", signed=False)[0] / 2.0**64 < probability


class UnknownCrop(ValueError):
    """A sample's json records no crop (crop_top/crop_left null or absent): its SDXL crop conditioning is unknown."""


def recorded_crop(document: dict[str, Any], assume_uncropped: bool = False) -> tuple[int, int]:
    """(crop_top, crop_left) as the sample's json records them; raises UnknownCrop when it records none, unless the
    caller states the images were never cropped (assume_uncropped): a crop is never made up."""
    top, left = document.get("crop_top"), document.get("crop_left")
    if top is not None and left is not None:
        return int(top), int(left)
    if assume_uncropped:
        return 0, 0
    raise UnknownCrop("the sample's json records no crop_top/crop_left (a tool that cropped without saying where, "
                      "e.g. img2dataset's center_crop): its SDXL crop conditioning is unknown. Curate those shards "
                      "again (`curate run` records the crop of every resize mode), or pass assume_uncropped=True to "
                      "make_loader if their images were never cropped")


def to_bucket(image: Image.Image, document: dict[str, Any], bucket: tuple[int, int],
              assume_uncropped: bool = False) -> tuple[np.ndarray, int, int]:
    """HWC uint8 pixels at the bucket's size and the SDXL crop (top, left) of the whole path from the original, in
    the coordinates of the scaled image the crop was cut from (diffusers' crop_coords_top_left); UnknownCrop when
    the json records no crop."""
    image = image.convert("RGB")
    stored_top, stored_left = recorded_crop(document, assume_uncropped)
    if image.size == bucket:
        return np.asarray(image), stored_top, stored_left
    # Shards written in another resize mode: scale to cover the bucket here (upscaling if need be), crop the centre.
    scale = max(bucket[0] / image.width, bucket[1] / image.height)
    size = (max(bucket[0], round(image.width * scale)), max(bucket[1], round(image.height * scale)))
    shape = cover_geometry(size[0], size[1], bucket)
    image = image.resize(size, Image.Resampling.BICUBIC)
    pixels = np.asarray(image)[shape.crop_top:shape.crop_top + bucket[1], shape.crop_left:shape.crop_left + bucket[0]]
    return pixels, round(stored_top * scale) + shape.crop_top, round(stored_left * scale) + shape.crop_left


@dataclass
class LoaderOptions:
    batch_size: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 2
    caption_dropout: float = 0.1
    tokenizers: Mapping[str, str | Tokenizer] = field(default_factory=dict)
    seed: int = 0
    shuffle_buffer: int = 1000
    base: int = SDXL_BASE
    decode: bool = True
    assume_uncropped: bool = False  # a sample without a recorded crop is (0, 0) instead of an UnknownCrop error


class _EpochDataset(IterableDataset):
    """One rank's samples for one epoch, as bucket batches; each DataLoader worker reads its own shards."""

    def __init__(self, plan: EpochPlan, options: LoaderOptions, epoch: int) -> None:
        self.plan, self.options, self.epoch = plan, options, epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        o = self.options
        shards = self.plan.workers[o.rank][worker]  # without DataLoader workers the plan has one worker per rank
        rng = np.random.default_rng([o.seed, self.epoch, o.rank, worker])
        tokenizers = {name: _tokenizer(t) for name, t in o.tokenizers.items()}
        waiting: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for sample in _shuffled((s for shard in shards for s in iter_samples(shard.url)), o.shuffle_buffer, rng):
            bucket = sample_bucket(sample.get("json") or {}, o.base)
            waiting.setdefault(bucket, []).append(sample)
            if len(waiting[bucket]) == o.batch_size:
                yield self._batch(waiting.pop(bucket), bucket, tokenizers)

    def _batch(self, samples: list[dict[str, Any]], bucket: tuple[int, int],
               tokenizers: dict[str, Tokenizer]) -> dict[str, Any]:
        o = self.options
        captions = ["" if dropped_caption(s["__key__"], o.seed, self.epoch, o.caption_dropout)
                    else (s.get("txt") or b"").decode("utf-8", "replace") for s in samples]
        documents = [s.get("json") or {} for s in samples]
        original = [[d.get("original_height", 0), d.get("original_width", 0)] for d in documents]
        # SDXL's size conditioning, (height, width) as diffusers' SDXL scripts pass it
        batch: dict[str, Any] = {"key": [s["__key__"] for s in samples], "caption": captions, "bucket": bucket,
                                 "json": documents, "original_size": torch.tensor(original, dtype=torch.long),
                                 "target_size": torch.tensor([[bucket[1], bucket[0]]] * len(samples), dtype=torch.long)}
        if o.decode:
            pixels, crops = [], []
            for sample, document in zip(samples, documents, strict=True):
                with Image.open(io.BytesIO(sample["jpg"])) as image:
                    try:
                        array, top, left = to_bucket(image, document, bucket, o.assume_uncropped)
                    except UnknownCrop as error:
                        raise UnknownCrop(f"sample {sample['__key__']}: {error}") from None
                pixels.append(torch.from_numpy(np.array(array)).permute(2, 0, 1))  # a writable copy
                crops.append([top, left])
            batch["image"] = torch.stack(pixels)  # uint8, B x 3 x bucket height x bucket width
            batch["crop_top_left"] = torch.tensor(crops, dtype=torch.long)
        else:
            batch["jpg"] = [s["jpg"] for s in samples]
        for name, tokenize in tokenizers.items():
            batch[name] = tokenize(captions)
        return batch


def _shuffled(samples: Iterator[dict[str, Any]], size: int, rng: np.random.Generator) -> Iterator[dict[str, Any]]:
    """A bounded shuffle buffer (webdataset's shuffle): memory is `size` samples whatever the shard size."""
    buffer: list[dict[str, Any]] = []
    for sample in samples:
        buffer.append(sample)
        if len(buffer) >= max(size, 1):
            index = int(rng.integers(len(buffer)))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            yield buffer.pop()
    order = rng.permutation(len(buffer)).tolist()
    yield from (buffer[i] for i in order)


def _tokenizer(spec: str | Tokenizer) -> Tokenizer:
    """open_clip's tokenizer of a model name (e.g. ViT-L-14 for CLIP, ViT-bigG-14 for OpenCLIP), or a callable."""
    if callable(spec):
        return spec
    import open_clip

    return open_clip.get_tokenizer(spec)


class BucketLoader:
    """An iterable of bucket batches for one rank; len() is the same on every rank for a given epoch."""

    def __init__(self, shards: list[Shard], options: LoaderOptions, **dataloader: Any) -> None:
        if not shards:
            raise ValueError("curate.loader: no shards to read")
        self.shards, self.options, self.dataloader, self.epoch = shards, options, dataloader, 0
        workers = max(1, options.num_workers)
        if len(shards) < options.world_size * workers:
            log.warning("%d shards for %d ranks x %d workers: some workers read nothing", len(shards),
                        options.world_size, workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> EpochPlan:
        o = self.options
        return plan_epoch(self.shards, o.world_size, max(1, o.num_workers), o.batch_size, o.seed, self.epoch)

    def __len__(self) -> int:
        return self.plan().steps

    def __iter__(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        dataset = _EpochDataset(plan, self.options, self.epoch)
        if self.options.num_workers == 0:
            batches: Any = iter(dataset)
        else:
            batches = iter(DataLoader(dataset, batch_size=None, num_workers=self.options.num_workers,
                                      **self.dataloader))
        for _ in range(plan.steps):
            yield next(batches)
        del batches  # stops the workers: the rest of this rank's samples are the epoch's remainder


def make_loader(source: str | Sequence[str], batch_size: int, *, rank: int | None = None,
                world_size: int | None = None, num_workers: int = 2, caption_dropout: float = 0.1,
                tokenizers: Mapping[str, str | Tokenizer] | None = None, seed: int = 0, shuffle_buffer: int = 1000,
                base: int | None = None, decode: bool = True, assume_uncropped: bool = False,
                **dataloader: Any) -> BucketLoader:
    """A training-ready loader over index.json, sizes.json, a shard folder or a list of tar URLs (local or fsspec).

    rank and world_size default to torch.distributed's (or RANK/WORLD_SIZE, or 0 and 1); tokenizers maps an output
    field to an open_clip model name or a callable; extra keyword arguments go to torch's DataLoader. A sample whose
    json records no crop raises UnknownCrop when decoded (its crop_top_left would be made up), unless
    assume_uncropped=True states that the shards' images were never cropped."""
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed
                                              else int(os.environ.get("RANK", 0)))
        world_size = world_size if world_size is not None else (torch.distributed.get_world_size() if distributed
                                                                else int(os.environ.get("WORLD_SIZE", 1)))
    if not 0 <= rank < world_size:
        raise ValueError(f"curate.loader: rank {rank} is not in 0..{world_size - 1}")
    if batch_size < 1 or not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"curate.loader: batch_size must be >= 1 (got {batch_size}) and caption_dropout in [0, 1] "
                         f"(got {caption_dropout})")
    if base is None and isinstance(source, str) and source.endswith("index.json"):
        base = _read_json(source).get("buckets")
    base = base or SDXL_BASE
    options = LoaderOptions(batch_size, rank, world_size, num_workers, caption_dropout, dict(tokenizers or {}), seed,
                            shuffle_buffer, base, decode, assume_uncropped)
    return BucketLoader(read_shardlist(source, base), options, **dataloader)
