"""The GPU-style input path (batched decode_jpeg + torch resizes), run on CPU: it matches the PIL path."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
from curate.models.preprocess import model_inputs
from curate.models.tensor_inputs import model_tensors, pixel_tensors
from curate.schema import AESTHETIC_SCORE, DROP_REASON, WATERMARK_PROB
from curate.stages.score import Scorer, score_images
from curate.stages.verdict import with_verdict_columns

CPU = torch.device("cpu")
# Stated tolerance of the model inputs, in levels of 255 against PIL's full decode: torch's antialiased resize and
# libjpeg-turbo's IDCT differ from PIL's by a level here and there.
MEAN_LEVELS, MAX_MEAN_LEVELS_PER_IMAGE = 0.5, 1.5


def levels(tensor: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Normalized [N, 3, H, W] back to 0-255 levels."""
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return ((tensor.float() * std_t + mean_t) * 255).numpy()


def test_model_inputs_match_the_pil_path(photo_set: list[bytes]) -> None:
    from curate.models.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    batch = model_tensors(photo_set, CPU)
    assert batch.index == list(range(len(photo_set))) and not batch.failures
    reference = [model_inputs(data, draft=False) for data in photo_set]
    clip_pil, watermark_pil = pixel_tensors(np.stack([r[0] for r in reference]), np.stack([r[1] for r in reference]),
                                            CPU)
    for ours, theirs, stats in ((batch.clip, clip_pil, (CLIP_MEAN, CLIP_STD)),
                                (batch.watermark, watermark_pil, (IMAGENET_MEAN, IMAGENET_STD))):
        assert ours.shape == theirs.shape
        difference = np.abs(levels(ours, *stats) - levels(theirs, *stats))
        assert difference.mean() <= MEAN_LEVELS
        assert difference.mean(axis=(1, 2, 3)).max() <= MAX_MEAN_LEVELS_PER_IMAGE
    assert batch.watermark.is_contiguous(memory_format=torch.channels_last)


def test_what_decode_jpeg_refuses_falls_back_to_pil_and_is_counted(photo_set: list[bytes]) -> None:
    png = io.BytesIO()
    Image.open(io.BytesIO(photo_set[0])).save(png, "PNG")
    encoded = [photo_set[1], png.getvalue(), b"\xff\xd8\xff\xe0 not a jpeg", photo_set[2][:300], photo_set[2]]
    batch = model_tensors(encoded, CPU)
    assert batch.index == [0, 1, 4] and batch.fallbacks == 1 and batch.clip.shape[0] == 3
    assert [position for position, _ in batch.failures] == [2, 3] and all(error for _, error in batch.failures)


def test_score_stage_with_the_tensor_decoder_agrees_with_pil(calibrated_weights: dict[str, str],
                                                             photo_set: list[bytes]) -> None:
    clip = ClipEncoder.load(calibrated_weights["clip_weights"], precision="bf16")
    head = AestheticPredictor.load(calibrated_weights["aesthetic_weights"])
    watermark = WatermarkDetector.load(calibrated_weights["watermark_weights"])
    rows = [*photo_set, b"not an image", photo_set[0][:200]]
    table = with_verdict_columns(pa.table({"key": [str(i) for i in range(len(rows))], "jpg": rows}))
    outputs = {}
    for decoder in ("pil", "tensor"):
        scorer = Scorer(clip, head, watermark, batch_size=3, decoder=decoder, draft=False)
        outputs[decoder] = score_images(table, scorer)
    assert outputs["pil"][DROP_REASON].to_pylist() == outputs["tensor"][DROP_REASON].to_pylist()
    assert outputs["tensor"][DROP_REASON].to_pylist()[-2:] == ["decode_failed", "decode_failed"]
    for name, gate in ((AESTHETIC_SCORE, 0.02), (WATERMARK_PROB, 0.01)):
        pil = np.array(outputs["pil"][name].to_pylist()[: len(photo_set)], dtype=np.float32)
        tensor = np.array(outputs["tensor"][name].to_pylist()[: len(photo_set)], dtype=np.float32)
        assert pil.std() > 0.1 and np.abs(tensor - pil).mean() <= gate
