"""Device choice, mixed precision and pixel tensors, shared by the models."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """The torch device for --device: "auto" is CUDA when present, else CPU; "cuda" without a GPU raises."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context on CPU, which computes in fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def pixels_to_tensor(pixels: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, 3] to normalized float32 [N, 3, H, W], as ToTensor + Normalize compute it."""
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)
