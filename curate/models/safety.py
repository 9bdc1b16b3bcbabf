"""LAION's CLIP-based NSFW detector (ViT-L/14, autokeras) in torch: punsafe of L2-normalized image embeddings.

The release is a Keras SavedModel; `safety_graph.read_safety_model` reads all of it without TensorFlow. Its graph:
cast float64 → float32; a multi-category encoding that turns a few columns (five in the release) into strings
with TF's AsString ("%f": six decimals, so -1e-9 is "-0.000000") and looks them up in string tables (unseen
strings give the default, 0) while the others pass with NaN → 0; Normalization ((x − mean) / max(√var, 1e-7));
Dense 64/512/256 with ReLU and Dense 1 with sigmoid, all float32. The lookups run on the device: each table key is
the set of float32 values that print as it, an interval of floats, found once at load time.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np
import torch
from torch import nn

from curate.models.safety_graph import Lookup, SafetyGraph, read_safety_model
from curate.models.weights import Source, WeightsError, WeightSpec, resolve_weights

log = logging.getLogger(__name__)

SAFETY = WeightSpec(
    name="LAION CLIP-based NSFW detector (clip_autokeras_binary_nsfw.zip)",
    option="--safety-weights",
    sources=(
        Source(
            "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/clip_autokeras_binary_nsfw.zip",
            "clip_autokeras_binary_nsfw.zip",
            sha256="905520bb0336accc73ee282c605d926aef90cf14248889d44b9cee50eef71f8a",
        ),
    ),
)
# Steps (in float32 values) from the float64 estimate of a key's edge to the edge itself; the estimate is within 1.
_EDGE_SEARCH = 64
_HALF_MICRO = 5e-7  # "%f" keeps six decimals: a key k holds the floats within 0.5e-6 of it (never exactly: no ties)
_SPECIAL = {  # sortable-int ranges of the strings "%f" prints for non-finite floats (glibc: "-nan" keeps the sign)
    "inf": (0x7F800000, 0x7F800000),
    "-inf": (-0x7F800000 - 1, -0x7F800000 - 1),
    "nan": (0x7F800001, 0x7FFFFFFF),
    "-nan": (-(1 << 31), -0x7F800000 - 2),
}


def _sortable(value: float) -> int:
    """float32 bits as an int whose order is the float order, with -0.0 just below +0.0 (NaNs beyond ±inf)."""
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    return bits ^ 0x7FFFFFFF if bits < 0 else bits


def _from_sortable(key: int) -> float:
    bits = key ^ 0x7FFFFFFF if key < 0 else key
    return struct.unpack("<f", struct.pack("<i", bits))[0]


def _printed(key: int) -> str:
    """What TF's AsString prints for the float32 `key` (C's "%f"; Python's "%f" rounds the same, exactly)."""
    return f"{_from_sortable(key):f}"


def key_interval(text: str) -> tuple[int, int] | None:
    """The sortable-int range of float32 values that AsString prints as text, or None if none prints so."""
    if text in _SPECIAL:
        return _SPECIAL[text]
    try:
        center = float(text)
    except ValueError:
        return None
    if not np.isfinite(center) or abs(center) > 3.4e38:
        return None
    if center == 0.0:  # the inner edge is -0.0 ("-0.000000") or +0.0 ("0.000000") itself
        negative = text.startswith("-")
        low_start = _sortable(-_HALF_MICRO) if negative else 0
        high_start = -1 if negative else _sortable(_HALF_MICRO)
    else:
        low_start, high_start = _sortable(center - _HALF_MICRO), _sortable(center + _HALF_MICRO)
    low, high = _edge(text, low_start, +1), _edge(text, high_start, -1)
    if low is None or high is None or low > high:
        return None
    return low, high


def _edge(text: str, start: int, inward: int) -> int | None:
    """The last float printing as text, going outward (-inward) from start; start is outside or on the edge."""
    position = start
    for _ in range(_EDGE_SEARCH):
        if _printed(position) == text:
            break
        position += inward
    else:
        return None
    while _printed(position - inward) == text:
        position -= inward
    return position


def lookup_intervals(lookup: Lookup) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted starts, ends (sortable int32) and values (float32) of a string table's keys; unprintable keys dropped."""
    rows = []
    for text, value in zip(lookup.keys, lookup.values.tolist(), strict=True):
        interval = key_interval(text)
        if interval is not None:
            rows.append((interval[0], interval[1], value))
    rows.sort()
    for before, after in zip(rows, rows[1:], strict=False):
        if after[0] <= before[1]:
            raise ValueError("two lookup keys print the same float")  # distinct strings cannot: a parser bug
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return table[:, 0].astype(np.int32), table[:, 1].astype(np.int32), table[:, 2].astype(np.float32)


class SafetyNetwork(nn.Module):
    """The SavedModel's inference graph on raw (un-normalized) float inputs [N, D] → punsafe [N], float32."""

    columns: torch.Tensor
    nan_to_zero: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor

    def __init__(self, graph: SafetyGraph) -> None:
        super().__init__()
        self.input_dim = graph.input_dim
        self.register_buffer("columns", torch.as_tensor(graph.columns, dtype=torch.long))
        numeric = np.ones(len(graph.columns), dtype=bool)
        numeric[[lookup.position for lookup in graph.lookups]] = False
        self.register_buffer("nan_to_zero", torch.as_tensor(numeric & graph.nan_to_zero))
        self.positions = [lookup.position for lookup in graph.lookups]
        self.defaults = [float(np.float32(lookup.default)) for lookup in graph.lookups]
        for index, lookup in enumerate(graph.lookups):
            starts, ends, values = lookup_intervals(lookup)
            self.register_buffer(f"lookup{index}_starts", torch.from_numpy(starts))
            self.register_buffer(f"lookup{index}_ends", torch.from_numpy(ends))
            self.register_buffer(f"lookup{index}_values", torch.from_numpy(values))
        mean, variance = (torch.from_numpy(np.asarray(a, np.float32)).reshape(-1) for a in (graph.mean, graph.variance))
        self.register_buffer("mean", mean)
        self.register_buffer("scale", torch.clamp_min(torch.sqrt(variance), float(np.float32(graph.epsilon))))
        self.dense = nn.ModuleList()
        self.activations = []
        for kernel, bias, activation in graph.layers:
            layer = nn.Linear(kernel.shape[0], kernel.shape[1])
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T, np.float32)))
                layer.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
            self.dense.append(layer)
            self.activations.append(activation)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """The multi-category encoding: columns in concat order, NaN → 0, categorical columns → table values."""
        values = inputs.to(torch.float32)[:, self.columns]
        encoded = torch.where(torch.isnan(values) & self.nan_to_zero, torch.zeros_like(values), values)
        for index, position in enumerate(self.positions):
            encoded[:, position] = self._look_up(values[:, position].contiguous(), index)
        return encoded

    def _look_up(self, column: torch.Tensor, index: int) -> torch.Tensor:
        starts, ends = getattr(self, f"lookup{index}_starts"), getattr(self, f"lookup{index}_ends")
        table_values = getattr(self, f"lookup{index}_values")
        bits = column.view(torch.int32)
        keys = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        slot = torch.searchsorted(starts, keys, right=True) - 1
        clamped = slot.clamp_min(0)
        found = (slot >= 0) & (keys <= ends[clamped]) if len(starts) else torch.zeros_like(keys, dtype=torch.bool)
        looked_up = table_values[clamped] if len(starts) else torch.zeros_like(column)
        return torch.where(found, looked_up, torch.full_like(column, self.defaults[index]))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = (self.encode(inputs) - self.mean) / self.scale
        for layer, activation in zip(self.dense, self.activations, strict=True):
            hidden = layer(hidden)
            if activation == "Relu":
                hidden = torch.relu(hidden)
            elif activation == "Sigmoid":
                hidden = torch.sigmoid(hidden)
        return hidden.reshape(-1)


class SafetyDetector:
    """punsafe (probability of NSFW) of CLIP ViT-L/14 image embeddings, as LAION computed it. float32 always."""

    def __init__(self, network: SafetyNetwork, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.network = network.eval().to(self.device)

    @classmethod
    def load(
        cls,
        path_or_url: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
    ) -> SafetyDetector:
        """Read the release zip (or its unzipped folder); None fetches the official file into cache_dir."""
        path = resolve_weights(SAFETY, path_or_url, cache_dir)
        graph = read_safety_model(path, SAFETY)
        try:
            network = SafetyNetwork(graph)
        except ValueError as error:  # two table keys printing the same float: not a table TF would build
            raise WeightsError(
                f"{SAFETY.name}: {path} holds an unusable model ({error}); pass the release zip with {SAFETY.option}"
            ) from error
        log.info("loaded %s from %s (%d categorical columns)", SAFETY.name, path, len(graph.lookups))
        return cls(network, device)

    @property
    def input_dim(self) -> int:
        return self.network.input_dim

    @torch.inference_mode()
    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """punsafe of N embeddings [N, D] as float32 [N]; normalizes them first."""
        values = np.asarray(embeddings)
        if values.ndim != 2 or values.shape[1] != self.input_dim:
            raise ValueError(f"embeddings must have shape [N, {self.input_dim}], got {values.shape}")
        return self.probabilities(torch.from_numpy(np.asarray(values, np.float32))).cpu().numpy()

    @torch.inference_mode()
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """float32 punsafe [N], on the device, of embeddings [N, D] (L2-normalized first, as clip-retrieval feeds)."""
        values = embeddings.to(self.device, torch.float32, non_blocking=True)
        return self.network(torch.nn.functional.normalize(values, dim=-1, eps=1e-30))
