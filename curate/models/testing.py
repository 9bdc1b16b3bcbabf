"""Tiny weight files of the real architectures, for tests and demos that must not download anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import open_clip
import torch

from curate.models.aesthetic import build_head
from curate.models.clip import OPEN_CLIP_CONFIG
from curate.models.watermark import build_watermark_network

# open_clip CLIP with a 2-layer, 64-wide ViT (patch 32 on 224 px) and a 1-layer text tower; embed_dim as ViT-L/14,
# and CLIP's whole vocabulary, so the real tokenizer's ids fit the text tower.
TINY_CLIP_CONFIG = {
    "embed_dim": 768,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """An open_clip folder (open_clip_config.json + open_clip_pytorch_model.bin) of a tiny random CLIP."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": {}}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=1))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def write_tiny_aesthetic(path: str | Path, head: str = "v2", center: float = 5.0, seed: int = 0) -> Path:
    """A random aesthetic head of the published shapes whose scores scatter around center."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build_head(head).eval()
        unit = torch.nn.functional.normalize(torch.randn(256, int(next(module.parameters()).shape[1])), dim=-1)
        last = cast(torch.nn.Linear, list(module.modules())[-1])  # layers.7 (v2) or the Linear itself (v1)
        with torch.no_grad():
            scores = module(unit)
            # random layers give nearly constant scores: stretch them to std 1 around center
            last.weight.div_(scores.std())
            last.bias.sub_(scores.mean()).div_(scores.std()).add_(center)
    torch.save(module.state_dict(), path)
    return Path(path)


def write_tiny_watermark(path: str | Path, wrapped: bool = True, seed: int = 0) -> Path:
    """Random weights of the real watermark network, as {"weights": state_dict} or a bare state dict."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        state_dict = build_watermark_network().state_dict()
    torch.save({"weights": state_dict} if wrapped else state_dict, path)
    return Path(path)


def write_tiny_weights(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """All three weights under folder; returns Config overrides (clip_weights, aesthetic_weights, watermark_weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "clip_weights": str(write_tiny_clip(folder / "clip", seed)),
        "aesthetic_weights": str(write_tiny_aesthetic(folder / "aesthetic-v2.pth", seed=seed)),
        "watermark_weights": str(write_tiny_watermark(folder / "watermark.pt", seed=seed)),
    }
