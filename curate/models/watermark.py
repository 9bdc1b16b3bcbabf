"""LAION-5B watermark detector: timm EfficientNet-B3 with LAION's 3-layer head; pwatermark = softmax(logits)[:, 0]."""

from __future__ import annotations

import logging
import os

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn

from curate.models.device import pixels_to_tensor
from curate.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, watermark_pixels
from curate.models.weights import Source, WeightsError, WeightSpec, load_state_dict, resolve_weights, strip_prefix

log = logging.getLogger(__name__)

WATERMARK = WeightSpec(
    name="LAION-5B watermark detector (watermark_model_v1.pt)",
    option="--watermark-weights",
    sources=(
        Source(
            "https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt",
            "watermark_model_v1.pt",
        ),
    ),
)
# timm >= 0.9 dropped efficientnet_b3a, which differed from efficientnet_b3 only in its pretrained test size.
ARCHITECTURE = "efficientnet_b3"


def build_watermark_network() -> nn.Module:
    """An untrained network of the released architecture (keys conv_stem.*, blocks.*, classifier.{0,3,5}.*)."""
    network = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=2)
    network.classifier = nn.Sequential(
        nn.Linear(in_features=1536, out_features=625),
        nn.ReLU(),
        nn.Dropout(p=0.3),
        nn.Linear(in_features=625, out_features=256),
        nn.ReLU(),
        nn.Linear(in_features=256, out_features=2),
    )
    return network


class WatermarkDetector:
    """Probability that an image carries a watermark.

    fp32 at every --precision: with bf16 weights the EfficientNet moved pwatermark by a mean 0.52 (heads rescaled
    as bench_score does, 8 bench photos, ViT-L/14-size run), far over the 0.01 gate; it is ~1 % of the FLOPs.
    """

    def __init__(self, network: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        # channels_last on CPU too: 1.08x (1.05-1.12) on a batch of 32 here, same outputs; the pixels are NHWC already
        self.network = network.eval().to(self.device).to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def load(
        cls,
        path_or_url: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> WatermarkDetector:
        """Build the network and load weights strictly (a bare state dict or {"weights": state_dict})."""
        path = resolve_weights(WATERMARK, path_or_url, cache_dir)
        state_dict = load_state_dict(path, WATERMARK)
        if "weights" in state_dict and isinstance(state_dict["weights"], dict):
            state_dict = state_dict["weights"]
        network = build_watermark_network()
        try:
            network.load_state_dict(strip_prefix(state_dict), strict=True)
        except RuntimeError as error:
            message = f"{WATERMARK.name} weights: {path} does not fit {ARCHITECTURE} + LAION head: {error}"
            raise WeightsError(message) from error
        log.info("loaded %s from %s", WATERMARK.name, path)
        return cls(network, device)

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """pwatermark of each image as float32 [N]."""
        if not images:
            return np.zeros(0, dtype=np.float32)
        return self.predict_pixels(np.stack([watermark_pixels(image) for image in images]))

    def predict_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """pwatermark of uint8 [N, 256, 256, 3] pixels (from `watermark_pixels`) as float32 [N]."""
        pixels = torch.as_tensor(pixels).to(self.device, non_blocking=True)
        batch = pixels_to_tensor(pixels, IMAGENET_MEAN, IMAGENET_STD)
        return self.probabilities(batch).cpu().numpy()

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """pwatermark as float32 [N], on the device, of normalized float [N, 3, 256, 256] (no host sync)."""
        batch = batch.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.network(batch).float(), dim=1)[:, 0]

