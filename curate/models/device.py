"""Device and precision choice, mixed precision and pixel tensors, shared by the models."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

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


class Bf16Island(torch.nn.Module):
    """Runs the wrapped module with bf16 weights on bf16 inputs and hands float32 back.

    Wrapping the matmul-heavy parts of a residual network (attention, MLP) keeps the residual stream and the
    layer norms in fp32, as autocast would, at the speed of bf16 weights. Not autocast itself: on this project's
    CPU (AMX) it ran ViT-L/14 9x slower than fp32, where bf16 weights ran it 2.1x faster.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inner = module.to(torch.bfloat16)

    def forward(self, *args: object, **kwargs: object) -> object:
        args = tuple(_cast(value, torch.bfloat16) for value in args)
        kwargs = {name: _cast(value, torch.bfloat16) for name, value in kwargs.items()}
        return _cast(self.inner(*args, **kwargs), torch.float32)

    def __getattr__(self, name: str) -> Any:  # the wrapped module's attributes, for code that reads them
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def _cast(value: object, dtype: torch.dtype) -> object:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(item, dtype) for item in value)
    return value


def pixels_to_tensor(pixels: torch.Tensor | np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [N, H, W, 3] to normalized float32 [N, 3, H, W], as ToTensor + Normalize compute it."""
    batch = torch.as_tensor(pixels).permute(0, 3, 1, 2).float().div_(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)
