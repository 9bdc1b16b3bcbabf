"""Score stage: CLIP ViT-L/14 embedding, LAION aesthetic score, watermark probability and CLIP score (image–caption
cosine) of each downloaded image."""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.config import Config
from curate.models import AestheticPredictor, ClipEncoder, SafetyDetector, WatermarkDetector, tensor_inputs
from curate.models.clip_text import paired_cosines
from curate.models.device import resolve_device
from curate.models.preprocess import model_inputs
from curate.schema import AESTHETIC_SCORE, CAPTION, CLIP_SCORE, EMBEDDING, JPG, PUNSAFE, SCORES_SOURCE, WATERMARK_PROB
from curate.stages.verdict import alive, with_reason, with_verdict_columns

log = logging.getLogger(__name__)

STAGE = "score"
DECODE_FAILED = "decode_failed"
SCORES_FROM_MODEL = "model"
# Batches decoded ahead of the one being scored: keeps the models busy without holding a whole table of pixels.
PREFETCH_BATCHES = 2
# "pil": PIL in decode threads (JPEG draft mode), the fastest on CPU; "tensor": batches through torchvision's
# decode_jpeg and torch resizes on the models' device (nvJPEG on CUDA), see curate/models/tensor_inputs.py.
DECODERS = ("pil", "tensor")


@dataclass
class Scorer:
    """The three models, built once per process, and how to feed them."""

    clip: ClipEncoder
    aesthetic: AestheticPredictor
    watermark: WatermarkDetector
    safety: SafetyDetector | None = None  # LAION's NSFW detector on the embedding; load_scorer always builds it
    batch_size: int = 64
    decode_workers: int = max(1, os.cpu_count() or 1)
    draft: bool = True
    decoder: str = "pil"
    fallbacks: int = 0  # images the tensor decoder refused and PIL decoded, since the scorer was built


_SCORERS: dict[tuple, Scorer] = {}


def load_scorer(config: Config) -> Scorer:
    """Build (or reuse, within this process) the models config names; raises before any image is scored."""
    if config.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {config.batch_size}")
    key = (
        config.device,
        config.model_cache,
        config.clip_weights,
        config.aesthetic_weights,
        config.aesthetic_head,
        config.watermark_weights,
        config.safety_weights,
        config.precision,
    )
    if key not in _SCORERS:
        _SCORERS.clear()  # one set of models per process: free the old ones before building new ones
        device = resolve_device(config.device)
        cache, precision = config.model_cache, config.precision
        _SCORERS[key] = Scorer(
            clip=ClipEncoder.load(config.clip_weights, cache_dir=cache, device=device, precision=precision),
            aesthetic=AestheticPredictor.load(
                config.aesthetic_weights, head=config.aesthetic_head, cache_dir=cache, device=device
            ),
            watermark=WatermarkDetector.load(config.watermark_weights, cache_dir=cache, device=device),
            # always, not only with --max-unsafe: ~0.2 MFLOP an image, and a re-cut may set --max-unsafe later
            safety=SafetyDetector.load(config.safety_weights, cache_dir=cache, device=device),
            decoder="tensor" if device.type == "cuda" else "pil",
        )
        log.info("scoring on %s in %s, %s decoder", device, _SCORERS[key].clip.dtype, _SCORERS[key].decoder)
    scorer = _SCORERS[key]
    scorer.batch_size = config.batch_size
    return scorer


def score_images(table: pa.Table, scorer: Scorer) -> pa.Table:
    """Add aesthetic_score, watermark_prob, scores_source, embedding and clip_score; flag images that fail to decode.

    Only rows no stage has flagged and that hold a jpg are scored; every other row gets nulls, and so does the
    clip_score of a row without a caption (null or blank).
    """
    table = with_verdict_columns(table)
    rows = table.num_rows
    todo = np.flatnonzero(np.asarray(pc.and_(alive(table), pc.is_valid(table[JPG])).to_numpy(zero_copy_only=False)))
    aesthetic = np.zeros(rows, dtype=np.float32)
    watermark = np.zeros(rows, dtype=np.float32)
    embedding = np.zeros((rows, scorer.clip.embed_dim), dtype=np.float16)
    scored = np.zeros(rows, dtype=bool)
    errors: list[str | None] = [None] * rows
    parts: dict[str, list] = {"rows": [], "features": [], "aesthetic": [], "watermark": [], "clip": [], "safety": []}
    unsafe = np.zeros(rows, dtype=np.float32)
    captioned, text_tokens = _caption_tokens(table, todo, scorer)
    clip_score = np.zeros(rows, dtype=np.float32)
    batches = _tensor_batches if scorer.decoder == "tensor" else _decoded_batches
    for batch in batches(table[JPG], todo, scorer):
        for row, error in batch.failures:
            errors[row] = error
        if not len(batch.rows):
            continue
        # results stay on the device until the table is done: no host sync per batch
        features = scorer.clip.embed(batch.clip)
        parts["rows"].append(batch.rows)
        parts["features"].append(features.half())
        parts["aesthetic"].append(scorer.aesthetic.score(features))
        parts["watermark"].append(scorer.watermark.probabilities(batch.watermark))
        if scorer.safety is not None:
            parts["safety"].append(scorer.safety.probabilities(features))
        parts["clip"].append(features)
    if parts["rows"]:
        done = np.concatenate(parts["rows"])
        aesthetic[done] = tensor_inputs.gather(parts["aesthetic"])
        watermark[done] = tensor_inputs.gather(parts["watermark"])
        embedding[done] = tensor_inputs.gather(parts["features"], np.float16)
        if parts["safety"]:
            unsafe[done] = tensor_inputs.gather(parts["safety"])
        scored[done] = True
        both, cosines = _clip_scores(scorer, parts["clip"], text_tokens, done, captioned)
        clip_score[both] = cosines
    log.info("scored %d of %d rows, %d failed to decode", scored.sum(), rows, sum(e is not None for e in errors))
    invalid = ~scored
    new_columns = {
        AESTHETIC_SCORE: pa.array(aesthetic, pa.float32(), mask=invalid),
        WATERMARK_PROB: pa.array(watermark, pa.float32(), mask=invalid),
        SCORES_SOURCE: pa.array([SCORES_FROM_MODEL if done else None for done in scored], pa.string()),
        EMBEDDING: _embedding_array(embedding, invalid),
        CLIP_SCORE: pa.array(clip_score, pa.float32(), mask=invalid | ~captioned),
    }
    if scorer.safety is not None:  # replaces the metadata's punsafe on the rows scored here
        new_columns[PUNSAFE] = pa.array(unsafe, pa.float32(), mask=invalid)
    for name, values in new_columns.items():
        table = _merge_column(table, name, values, scored)
    failed = np.array([error is not None for error in errors], dtype=bool)
    if failed.any():
        table = with_reason(table, failed, STAGE, DECODE_FAILED, detail=errors)
    return table


def _caption_tokens(table: pa.Table, todo: np.ndarray, scorer: Scorer) -> tuple[np.ndarray, Future | None]:
    """Rows to score that have a caption (not null, not blank), and their token ids in row order, tokenized in a
    thread while the images are scored (open_clip's tokenizer is Python: ~0.1 ms a caption)."""
    captioned = np.zeros(table.num_rows, dtype=bool)
    if CAPTION not in table.column_names or scorer.clip.text is None or not len(todo):
        return captioned, None
    captions = table[CAPTION].take(pa.array(todo)).to_pylist()
    present = [index for index, caption in enumerate(captions) if caption is not None and caption.strip()]
    if not present:
        return captioned, None
    captioned[todo[present]] = True
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
    tokens = pool.submit(scorer.clip.text.tokenize, [captions[index] for index in present])
    pool.shutdown(wait=False)  # its one thread ends with the task
    return captioned, tokens


def _clip_scores(scorer: Scorer, features: list, tokens: Future | None, done: np.ndarray,
                 captioned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, clip scores) of the scored rows with a caption; features are the image embeddings in `done`'s order."""
    has_caption = captioned[done]
    if tokens is None or scorer.clip.text is None or not has_caption.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    both = done[has_caption]
    texts = scorer.clip.text.embed_rows(tokens.result(), np.searchsorted(np.flatnonzero(captioned), both))
    return both, paired_cosines(features, np.flatnonzero(has_caption), texts)


@dataclass
class _DecodedBatch:
    rows: np.ndarray
    clip: Any  # normalized model inputs on the models' device (torch tensors; torch is imported in models/ only)
    watermark: Any
    failures: list[tuple[int, str]]


def _decode(data: bytes, draft: bool) -> tuple[np.ndarray, np.ndarray] | str:
    """Both model inputs, or the error text: a bad image is a value, never an exception."""
    try:
        return model_inputs(data, draft=draft)
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        return f"{type(error).__name__}: {error}"


def _decoded_batches(jpgs: pa.ChunkedArray, todo: np.ndarray, scorer: Scorer) -> Iterator[_DecodedBatch]:
    """Batches of decoded rows, in order; decoding runs in threads (PIL releases the GIL) ahead of scoring."""
    starts = range(0, len(todo), scorer.batch_size)
    with ThreadPoolExecutor(max_workers=scorer.decode_workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[np.ndarray, list[Future]]] = deque()
        for start in starts:
            rows = todo[start : start + scorer.batch_size]
            data = jpgs.take(pa.array(rows)).to_pylist()
            pending.append((rows, [pool.submit(_decode, item, scorer.draft) for item in data]))
            if len(pending) > PREFETCH_BATCHES:
                yield _collect(*pending.popleft(), scorer)
        while pending:
            yield _collect(*pending.popleft(), scorer)


def _tensor_batches(jpgs: pa.ChunkedArray, todo: np.ndarray, scorer: Scorer) -> Iterator[_DecodedBatch]:
    """Batches decoded by `tensor_inputs.prepared` in a producer thread, ahead of scoring, in order."""
    device = scorer.clip.device
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") as pool:
        pending: deque[tuple[np.ndarray, Future]] = deque()

        def ready() -> _DecodedBatch:
            rows, future = pending.popleft()
            batch = tensor_inputs.handed_over(future.result())
            scorer.fallbacks += batch.fallbacks
            failures = [(int(rows[position]), error) for position, error in batch.failures]
            return _DecodedBatch(rows[batch.index], batch.clip, batch.watermark, failures)

        for start in range(0, len(todo), scorer.batch_size):
            rows = todo[start : start + scorer.batch_size]
            pending.append((rows, pool.submit(tensor_inputs.prepared, jpgs.take(pa.array(rows)).to_pylist(), device)))
            if len(pending) > PREFETCH_BATCHES:
                yield ready()
        while pending:
            yield ready()


def _collect(rows: np.ndarray, futures: list[Future], scorer: Scorer) -> _DecodedBatch:
    decoded, failures = [], []
    for row, future in zip(rows, futures, strict=True):
        result = future.result()
        if isinstance(result, str):
            failures.append((int(row), result))
        else:
            decoded.append((int(row), result))
    if not decoded:
        nothing = np.zeros(0, dtype=np.int64)
        return _DecodedBatch(nothing, nothing, nothing, failures)
    clip, watermark = tensor_inputs.pixel_tensors(
        np.stack([pixels[0] for _, pixels in decoded]), np.stack([pixels[1] for _, pixels in decoded]),
        scorer.clip.device,
    )
    return _DecodedBatch(np.array([row for row, _ in decoded], dtype=np.int64), clip, watermark, failures)


def _embedding_array(embedding: np.ndarray, invalid: np.ndarray) -> pa.FixedSizeListArray:
    """fixed_size_list<float16, D>, null where the row was not scored."""
    values = pa.array(embedding.reshape(-1), pa.float16())
    return pa.FixedSizeListArray.from_arrays(values, embedding.shape[1], mask=pa.array(invalid))


def _merge_column(table: pa.Table, name: str, values: pa.Array, scored: np.ndarray) -> pa.Table:
    """Set a column: new values on scored rows; a column already there keeps its values on the others."""
    if name in table.column_names:
        old = table[name]
        if old.type == values.type or (pa.types.is_floating(old.type) and pa.types.is_floating(values.type)):
            values = pc.if_else(pa.array(scored), values, pc.cast(old, values.type).combine_chunks())
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)
