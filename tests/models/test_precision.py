"""--precision: auto picks bf16 where the hardware runs it natively; bf16 scores stay within the accuracy gate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
from curate.models import device as device_module
from curate.models.device import cpu_has_bf16, resolve_precision
from curate.models.preprocess import model_inputs

# issue 18's gate: how far bf16 may move a score from fp32
AESTHETIC_GATE, WATERMARK_GATE = 0.02, 0.01


@pytest.mark.parametrize(("flags", "expected"), [("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                                 ("fpu avx2 avx512f", False)])
def test_cpu_bf16_is_read_from_the_cpuinfo_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert cpu_has_bf16(str(cpuinfo)) is expected
    assert cpu_has_bf16(str(tmp_path / "absent")) is False


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_on_cuda_and_on_native_cpus_only(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: native)
    assert resolve_precision("auto", torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) == torch.float32
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="--precision"):
        resolve_precision("fp16", torch.device("cpu"))


def test_library_classes_are_fp32_unless_asked(tiny_weights: dict[str, str]) -> None:
    assert ClipEncoder.load(tiny_weights["clip_weights"]).dtype == torch.float32
    encoder = ClipEncoder.load(tiny_weights["clip_weights"], precision="bf16")
    block = encoder.visual.transformer.resblocks[0]
    assert block.mlp.c_fc.weight.dtype == torch.bfloat16 and block.ln_1.weight.dtype == torch.float32
    assert encoder.visual.proj.dtype == torch.float32  # residual stream, norms and projection stay fp32


def test_bf16_scores_are_within_the_gate(calibrated_weights: dict[str, str], photo_set: list[bytes]) -> None:
    inputs = [model_inputs(data) for data in photo_set]
    clip_pixels, watermark_pixels = np.stack([p[0] for p in inputs]), np.stack([p[1] for p in inputs])
    head = AestheticPredictor.load(calibrated_weights["aesthetic_weights"])
    scores = {}
    for precision in ("fp32", "bf16"):
        clip = ClipEncoder.load(calibrated_weights["clip_weights"], precision=precision)
        watermark = WatermarkDetector.load(calibrated_weights["watermark_weights"])  # fp32 at every precision
        embeddings = clip.encode_pixels(clip_pixels)
        scores[precision] = (head.predict(embeddings), watermark.predict_pixels(watermark_pixels), embeddings)
    (aesthetic32, watermark32, embedding32), (aesthetic16, watermark16, embedding16) = scores["fp32"], scores["bf16"]
    assert aesthetic32.std() > 0.5 and watermark32.std() > 0.1  # the rescaled heads spread the photos out
    aesthetic_delta, watermark_delta = np.abs(aesthetic16 - aesthetic32), np.abs(watermark16 - watermark32)
    assert aesthetic_delta.mean() <= AESTHETIC_GATE and watermark_delta.max() <= WATERMARK_GATE
    assert aesthetic_delta.max() > 0  # bf16 did run: the scores moved
    assert (embedding16 * embedding32).sum(axis=1).min() > 0.999
