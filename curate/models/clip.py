"""CLIP ViT-L/14 image encoder (open_clip, OpenAI weights): L2-normalized 768-d image embeddings."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import open_clip
import torch
from open_clip.transformer import QuickGELU
from PIL import Image
from torch import nn

from curate.models.clip_text import ClipTextEncoder, ClipTextTower
from curate.models.device import Bf16Island, pixels_to_tensor, resolve_precision
from curate.models.preprocess import CLIP_MEAN, CLIP_STD, clip_pixels
from curate.models.weights import Source, WeightsError, WeightSpec, load_state_dict, resolve_weights, strip_prefix

log = logging.getLogger(__name__)

MODEL_NAME = "ViT-L-14"
OPEN_CLIP_CONFIG = "open_clip_config.json"
CLIP = WeightSpec(
    name="CLIP ViT-L/14 (OpenAI)",
    option="--clip-weights",
    sources=(
        Source(
            "https://huggingface.co/timm/vit_large_patch14_clip_224.openai",
            "open_clip_model.safetensors",
            hub_repo="timm/vit_large_patch14_clip_224.openai",
        ),
        Source(
            "https://openaipublic.azureedge.net/clip/models/"
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
            "ViT-L-14.pt",
            sha256="b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
        ),
    ),
)
# Keys of the OpenAI TorchScript release that are not parameters.
_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class ClipEncoder:
    """The image tower of a CLIP model; `encode` returns L2-normalized embeddings. `text` is the same model's text
    tower (captions to embeddings in the same space), when it was loaded.

    precision "fp32" (the default), "bf16", or "auto" (bf16 on CUDA and on CPUs with native bf16); the embeddings
    come back in float32 either way.
    """

    def __init__(self, visual: nn.Module, device: str | torch.device = "cpu", precision: str = "fp32",
                 text: ClipTextTower | None = None) -> None:
        self.device = torch.device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.visual = visual.eval().to(self.device)
        if self.dtype == torch.bfloat16:
            _bf16_matmuls(self.visual)
            if text is not None:  # fp32 matmuls on a GPU would cost the text tower ~16x its bf16 time
                _bf16_blocks(text.transformer)
        self.text = ClipTextEncoder(text, self.device) if text is not None else None

    @classmethod
    def load(
        cls,
        path_or_url: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        model_name: str = MODEL_NAME,
        precision: str = "fp32",
        text: bool = True,
    ) -> ClipEncoder:
        """Build open_clip ViT-L-14 with QuickGELU and load the weights strictly.

        path_or_url is a weight file (state dict, .safetensors, or the OpenAI TorchScript release), a URL, or an
        open_clip folder (`open_clip_config.json` beside the weights, as on the hub); None fetches the official
        weights into cache_dir. A weight file is loaded into the open_clip config model_name. QuickGELU is always
        forced: the OpenAI weights were trained with it, and open_clip sets it by itself only for the `openai`
        pretrained tag, not for a local file. text=False leaves the text tower (~123M parameters at L/14) unused.
        """
        path = resolve_weights(CLIP, path_or_url, cache_dir)
        model_id, weights_file = (model_name, path)
        if path.is_dir():
            model_id, weights_file = f"local-dir:{path}", _weights_in_folder(path)
        with _quiet_random_init_warning():
            model = open_clip.create_model(model_id, pretrained=None, load_weights=False, force_quick_gelu=True)
        state_dict = _open_clip_state_dict(load_state_dict(weights_file, CLIP), model)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"{CLIP.name} weights: {weights_file} does not fit {model_id}: {error}") from error
        if not any(isinstance(module, QuickGELU) for module in model.visual.modules()):
            raise WeightsError(f"{CLIP.name}: the model built from {model_id} has no QuickGELU activation")
        log.info("loaded %s from %s", CLIP.name, weights_file)
        return cls(model.visual, device, precision, ClipTextTower(model) if text else None)

    @property
    def embed_dim(self) -> int:
        return int(cast(int, self.visual.output_dim))

    def encode(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalized float32 embeddings [N, embed_dim] of PIL images."""
        if not images:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return self.encode_pixels(np.stack([clip_pixels(image) for image in images]))

    def encode_pixels(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """L2-normalized float32 embeddings of uint8 [N, 224, 224, 3] pixels (from `clip_pixels`)."""
        batch = pixels_to_tensor(torch.as_tensor(pixels).to(self.device, non_blocking=True), CLIP_MEAN, CLIP_STD)
        return self.embed(batch).cpu().numpy()

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """L2-normalized float32 embeddings, on the device, of normalized float [N, 3, 224, 224] (no host sync)."""
        features = self.visual(batch.to(self.device, torch.float32, non_blocking=True))
        return torch.nn.functional.normalize(features.float(), dim=-1)


def _bf16_matmuls(visual: nn.Module) -> None:
    """Patch embedding, attention and MLP of every block in bf16; residual stream, norms and projection in fp32.

    All-bf16 weights moved the (rescaled) aesthetic score by a mean 0.027 on the test photos, over the 0.02 gate: the
    residual stream summed in bf16 is where the error came from.
    """
    visual.conv1 = Bf16Island(cast(nn.Module, visual.conv1))
    _bf16_blocks(cast(nn.Module, visual.transformer))


def _bf16_blocks(transformer: nn.Module) -> None:
    """Attention and MLP of every residual block in bf16 (the image or the text transformer)."""
    blocks = cast(nn.ModuleList, getattr(transformer, "resblocks"))  # noqa: B009 (nn.Module typing)
    for block in blocks:
        block.attn = Bf16Island(cast(nn.Module, block.attn))
        block.mlp = Bf16Island(cast(nn.Module, block.mlp))


@contextlib.contextmanager
def _quiet_random_init_warning() -> Iterator[None]:
    """Hide open_clip's "initialized randomly" warning: the weights are loaded right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _weights_in_folder(folder: Path) -> Path:
    if not (folder / OPEN_CLIP_CONFIG).is_file():
        raise WeightsError(f"{CLIP.name} weights: {folder} is a folder without {OPEN_CLIP_CONFIG}; pass the file")
    for suffix in _WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f"*{suffix}"))
        if found:
            return found[0]
    raise WeightsError(f"{CLIP.name} weights: no {'/'.join(_WEIGHT_SUFFIXES)} file in {folder} (--clip-weights)")


def _open_clip_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Undo the differences between released checkpoints and open_clip's own keys."""
    state_dict = strip_prefix(dict(state_dict))
    for key in _NON_PARAMETER_KEYS:
        state_dict.pop(key, None)
    expected = model.state_dict()["logit_scale"]
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != expected.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(expected.shape)
    return state_dict
