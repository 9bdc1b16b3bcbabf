"""Device and precision choice, mixed precision and pixel tensors, shared by the models."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of CPUs with native bf16 matmuls (AVX512-BF16 dot products, AMX tiles): oneDNN runs bf16
# there at ~3x its fp32 rate; elsewhere bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def resolve_device(name: str) -> torch.device:
    """The torch device for --device: "auto" is CUDA when present, else CPU; "cuda" without a GPU raises."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ValueError(f"--device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return torch.device(name)


@functools.cache
def cpu_has_bf16(cpuinfo: str = CPUINFO) -> bool:
    """Whether the CPU reports AVX512-BF16 or AMX-BF16 (false where cpuinfo cannot be read)."""
    try:
        with open(cpuinfo) as handle:
            text = handle.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return any(flag in flags for flag in BF16_CPU_FLAGS)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for --precision: "auto" is bf16 on CUDA and on CPUs with native bf16, else fp32."""
    if name not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
        return torch.bfloat16 if native else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def to_precision(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The module in eval mode on device with its weights in dtype.

    bf16 weights, not autocast: on this project's CPU (AMX) autocast ran ViT-L/14 9x slower than fp32 (it re-casts
    every weight on each call and leaves attention on a slow path), bf16 weights 2.1x faster, same cosine 0.99991.
    """
    return module.eval().to(device=device, dtype=dtype)


def pixels_to_tensor(pixels: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, 3] to normalized float32 [N, 3, H, W], as ToTensor + Normalize compute it."""
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)
