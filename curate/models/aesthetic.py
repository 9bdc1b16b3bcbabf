"""LAION aesthetic predictors: an MLP (v2) or a linear layer (v1) on the L2-normalized CLIP image embedding."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import nn

from curate.models.weights import Source, WeightsError, WeightSpec, load_state_dict, resolve_weights, strip_prefix

log = logging.getLogger(__name__)

EMBED_DIM = 768
HEADS = ("v2", "v1")

AESTHETIC_V2 = WeightSpec(
    name="aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE)",
    option="--aesthetic-weights",
    sources=(
        Source(
            "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
            "sac+logos+ava1-l14-linearMSE.pth",
            sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
        ),
    ),
)
AESTHETIC_V1 = WeightSpec(
    name="aesthetic predictor v1 (sa_0_4_vit_l_14_linear)",
    option="--aesthetic-weights",
    sources=(
        Source(
            "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
            "sa_0_4_vit_l_14_linear.pth",
        ),
    ),
)


class AestheticMLP(nn.Module):
    """The v2 "linearMSE" head: five Linear layers with dropout between them and no activations."""

    def __init__(self, input_size: int = EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def build_head(head: str, input_size: int = EMBED_DIM) -> nn.Module:
    """An untrained head of the published architecture: "v2" (MLP, keys layers.*) or "v1" (Linear, weight/bias)."""
    if head == "v2":
        return AestheticMLP(input_size)
    if head == "v1":
        return nn.Linear(input_size, 1)
    raise ValueError(f"--aesthetic-head must be one of {HEADS}, got {head!r}")


def normalize_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float32; a zero row stays zero."""
    values = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return np.divide(values, norms, out=np.zeros_like(values), where=norms > 0)


class AestheticPredictor:
    """Aesthetic score (roughly 1-10) of CLIP ViT-L/14 image embeddings.

    Always fp32, also when the encoder runs bf16: it costs ~1 MFLOP per image, and bf16's step at 5.0 is 0.031,
    over the 0.02 a score may move.
    """

    def __init__(self, module: nn.Module, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)

    @classmethod
    def load(
        cls,
        path_or_url: str | os.PathLike | None = None,
        head: str = "v2",
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> AestheticPredictor:
        """Build the head and load its weights strictly; None fetches the official file into cache_dir."""
        if head not in HEADS:
            raise ValueError(f"--aesthetic-head must be one of {HEADS}, got {head!r}")
        spec = AESTHETIC_V2 if head == "v2" else AESTHETIC_V1
        path = resolve_weights(spec, path_or_url, cache_dir)
        state_dict = strip_prefix(load_state_dict(path, spec))
        input_size = _input_size(state_dict, head, spec, path)
        module = build_head(head, input_size)
        try:
            module.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"{spec.name} weights: {path} does not fit the {head} head: {error}") from error
        log.info("loaded %s from %s", spec.name, path)
        return cls(module, device)

    @property
    def input_size(self) -> int:
        return int(next(self.module.parameters()).shape[1])  # layers.0.weight (v2) or weight (v1): [out, in]

    @torch.inference_mode()
    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """Scores of N embeddings [N, D] as float32 [N]; normalizes them first."""
        values = normalize_embeddings(embeddings)
        if values.ndim != 2 or values.shape[1] != self.input_size:
            raise ValueError(f"embeddings must have shape [N, {self.input_size}], got {values.shape}")
        return self.score(torch.from_numpy(values)).cpu().numpy()

    @torch.inference_mode()
    def score(self, embeddings: torch.Tensor) -> torch.Tensor:
        """float32 scores [N], on the device, of embeddings [N, D] (normalized first; a zero row stays zero)."""
        values = embeddings.to(self.device, torch.float32, non_blocking=True)
        values = torch.nn.functional.normalize(values, dim=-1, eps=1e-30)
        return self.module(values).reshape(-1)


def _input_size(state_dict: dict[str, torch.Tensor], head: str, spec: WeightSpec, path: object) -> int:
    key = "layers.0.weight" if head == "v2" else "weight"
    if key not in state_dict:
        raise WeightsError(f"{spec.name} weights: {path} has no {key!r}; is it the {head} head? (--aesthetic-head)")
    return int(state_dict[key].shape[1])
