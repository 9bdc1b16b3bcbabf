"""Tiny weight files of the real architectures, for tests and demos that must not download anything."""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
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


def two_tone_jpeg(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    """A JPEG of one colour with a second-colour square in it: images the score tests tell apart."""
    import io

    from PIL import Image

    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1] // 2, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def write_tiny_weights(folder: str | Path, seed: int = 0) -> dict[str, str]:
    """All four weights under folder; returns Config overrides (clip_, aesthetic_, watermark_, safety_weights)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    safety = tiny_safety(input_dim=TINY_CLIP_CONFIG["embed_dim"], categorical=(3, 9), seed=seed)  # type: ignore[arg-type]
    return {
        "clip_weights": str(write_tiny_clip(folder / "clip", seed)),
        "aesthetic_weights": str(write_tiny_aesthetic(folder / "aesthetic-v2.pth", seed=seed)),
        "watermark_weights": str(write_tiny_watermark(folder / "watermark.pt", seed=seed)),
        "safety_weights": str(write_tiny_safety(folder / "clip_autokeras_binary_nsfw.zip", safety)),
    }


# --- a SavedModel of LAION's NSFW detector's graph, in tiny sizes, written without TensorFlow ---

_DT = {np.dtype(np.float32): 1, np.dtype(np.float64): 2, np.dtype(np.int32): 3, np.dtype(np.int64): 9}


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative ints as ten-byte two's complement, as protobuf writes them
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _msg(*parts: tuple[int, int | bytes | str]) -> bytes:
    return b"".join(_field(number, value) for number, value in parts)


def _shape(dims: tuple[int, ...]) -> bytes:
    return _msg(*[(2, _msg((1, size))) for size in dims])


def _tensor(array: np.ndarray) -> bytes:
    """A TensorProto: strings as string_val, numbers as tensor_content."""
    if array.dtype == object:
        return _msg((1, 7), (2, _shape(array.shape)), *[(8, item) for item in array.reshape(-1)])
    content = array.astype(array.dtype.newbyteorder("<")).tobytes()
    return _msg((1, _DT[array.dtype]), (2, _shape(array.shape)), (4, content))


def _node(name: str, op: str, inputs: list[str] = (), **attrs: bytes) -> bytes:  # type: ignore[assignment]
    entries = [(5, _msg((1, key), (2, value))) for key, value in attrs.items()]
    return _msg((1, name), (2, op), *[(3, item) for item in inputs], *entries)


def _const(name: str, array: np.ndarray) -> bytes:
    return _node(name, "Const", value=_msg((8, _tensor(array))))


def _call(name: str, function: str, inputs: list[str]) -> bytes:
    return _node(name, "StatefulPartitionedCall", inputs, f=_msg((10, _msg((1, function)))))


def _function(name: str, args: list[str], outputs: dict[str, str], body: list[bytes]) -> bytes:
    signature = _msg((1, name), *[(2, _msg((1, arg))) for arg in args], *[(3, _msg((1, out))) for out in outputs])
    ret = [(4, _msg((1, key), (2, value))) for key, value in outputs.items()]
    return _msg((1, signature), *[(3, node) for node in body], *ret)


@dataclass
class TinySafety:
    """What a tiny safety SavedModel holds, for an independent computation of its graph in a test."""

    mean: np.ndarray  # [D] float32
    variance: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray, str]]  # kernel [in, out], bias, "Relu" | "Sigmoid"
    tables: dict[int, tuple[list[str], np.ndarray, int]]  # column → keys, int64 values, default
    epsilon: float = 1e-7


def tiny_safety(input_dim: int = 16, categorical: tuple[int, ...] = (3, 9), seed: int = 0) -> TinySafety:
    """Random weights of the detector's shape (Dense 8 ReLU, 4 ReLU, 1 sigmoid) and tables on some columns.

    Each table's keys are "%f" of values a unit embedding can hold, plus "-0.000000" and keys no float prints
    ("0.5", "abc"); values are 1..K, the default 0, as StringLookup builds them.
    """
    rng = np.random.default_rng(seed)
    sizes = [input_dim, 8, 4, 1]
    layers = [
        (rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32), rng.normal(0, 0.1, b).astype(np.float32),
         "Sigmoid" if b == 1 else "Relu")
        for a, b in zip(sizes, sizes[1:], strict=False)
    ]
    tables = {}
    for column in categorical:
        keys = [f"{float(v):f}" for v in rng.normal(0, 0.25, 40).astype(np.float32)] + ["-0.000000", "0.5", "abc"]
        keys = list(dict.fromkeys(keys))
        tables[column] = (keys, np.arange(1, len(keys) + 1, dtype=np.int64), 0)
    mean = rng.normal(0, 0.05, input_dim).astype(np.float32)
    variance = rng.uniform(0.03, 0.09, input_dim).astype(np.float32)
    for column, (keys, _, _) in tables.items():  # the table index is what gets normalized, as in the release
        mean[column], variance[column] = len(keys) / 2, len(keys) ** 2 / 12
    variance[0] = 1e-16  # a (nearly) constant column: divided by max(sqrt(variance), epsilon) = epsilon
    layers[0][0][0] *= 1e-7
    return TinySafety(mean, variance, layers, tables)


def write_tiny_safety(path: str | Path, model: TinySafety | None = None) -> Path:
    """A zip in the release's layout (clip_autokeras_binary_nsfw/saved_model.pb + variables/) of the model."""
    model = model or tiny_safety()
    graph, functions, serving_inputs, model_args = _safety_graph(model)
    serving = _call("StatefulPartitionedCall_15", "signature_wrapper", ["serving_default_input_1", *serving_inputs])
    wrapper_args = ["input_1", *[f"unknown_{i}" for i in range(len(serving_inputs))]]
    functions.append(_function("signature_wrapper", wrapper_args, {"output_0": "Identity:output:0"}, [
        _call("StatefulPartitionedCall", "wrapped_model", wrapper_args),
        _node("Identity", "Identity", ["StatefulPartitionedCall:output:0", "^StatefulPartitionedCall"]),
    ]))
    tensor_info = _msg((1, "serving_default_input_1:0"), (2, 2))
    signature = _msg((1, _msg((1, "input_1"), (2, tensor_info))),
                     (2, _msg((1, "classification_head_1"), (2, _msg((1, "StatefulPartitionedCall_15:0"))))))
    graph_def = _msg(*[(1, node) for node in graph + [serving]], (2, _msg(*[(1, f) for f in functions])))
    meta_graph = _msg((2, graph_def), (5, _msg((1, "serving_default"), (2, signature))))
    index, data = _bundle({f"layer_with_weights-{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}/.ATTRIBUTES/"
                           "VARIABLE_VALUE": (name, array) for i, (name, array) in enumerate(_variables(model))})
    path = Path(path)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("clip_autokeras_binary_nsfw/saved_model.pb", _msg((1, 1), (2, meta_graph)))
        archive.writestr("clip_autokeras_binary_nsfw/keras_metadata.pb", b"")
        archive.writestr("clip_autokeras_binary_nsfw/variables/variables.index", index)
        archive.writestr("clip_autokeras_binary_nsfw/variables/variables.data-00000-of-00001", data)
    return path


def _variables(model: TinySafety) -> list[tuple[str, np.ndarray]]:
    names = ["dense"] + [f"dense_{i}" for i in range(1, len(model.layers))]
    return [item for name, (kernel, bias, _) in zip(names, model.layers, strict=True)
            for item in ((f"{name}/kernel", kernel), (f"{name}/bias", bias))]


def _safety_graph(model: TinySafety) -> tuple[list[bytes], list[bytes], list[str], list[str]]:
    """Graph-level nodes, functions, the serving call's inputs after the placeholder, and the model's args."""
    dim = len(model.mean)
    graph = [_node("serving_default_input_1", "Placeholder", dtype=_msg((6, 2)))]
    functions, serving_inputs, args, body = [], [], ["input_1"], []
    for name, _ in _variables(model):
        graph.append(_node(name, "VarHandleOp", shared_name=_msg((2, name)), dtype=_msg((6, 1))))
    body += [
        _node("Cast", "Cast", ["input_1"], SrcT=_msg((6, 2)), DstT=_msg((6, 1))),
        _node("Const", "Const", value=_msg((8, _tensor(np.ones(dim, np.int32))))),
        _node("split_dim", "Const", value=_msg((8, _tensor(np.array(1, np.int32))))),
        _node("split", "SplitV", ["Cast:y:0", "Const:output:0", "split_dim:output:0"], T=_msg((6, 1))),
    ]
    columns = []
    for column in range(dim):
        if column not in model.tables:
            body += [
                _node(f"IsNan_{column}", "IsNan", [f"split:output:{column}"]),
                _node(f"zeros_like_{column}", "ZerosLike", [f"split:output:{column}"]),
                _node(f"SelectV2_{column}", "SelectV2", [f"IsNan_{column}:y:0", f"zeros_like_{column}:y:0",
                                                         f"split:output:{column}"]),
            ]
            columns.append(f"SelectV2_{column}:output:0")
            continue
        keys, values, default = model.tables[column]
        creator, table, init = f"creator_{column}", f"table_{column}", f"init_{column}"
        functions.append(_function(creator, [], {"table": "hash_table:table_handle:0"},
                                   [_node("hash_table", "HashTableV2", key_dtype=_msg((6, 7)))]))
        functions.append(_function(init, ["handle", "keys", "values"], {}, [
            _node("import", "LookupTableImportV2", ["handle", "keys", "values"])]))
        graph += [
            _call(table, creator, []),
            _const(f"keys_{column}", np.array([k.encode() for k in keys], dtype=object)),
            _const(f"values_{column}", values.astype(np.int64)),
            _const(f"default_{column}", np.array(default, np.int64)),
            _call(f"initialize_{column}", init, [table, f"keys_{column}", f"values_{column}"]),
        ]
        serving_inputs += [table, f"default_{column}"]
        args += [f"table_handle_{column}", f"default_value_{column}"]
        body += [
            _node(f"AsString_{column}", "AsString", [f"split:output:{column}"], T=_msg((6, 1))),
            _node(f"Find_{column}", "LookupTableFindV2",
                  [f"table_handle_{column}", f"AsString_{column}:output:0", f"default_value_{column}"]),
            _node(f"Identity_{column}", "Identity", [f"Find_{column}:values:0"]),
            _node(f"Cast_{column}", "Cast", [f"Identity_{column}:output:0"], SrcT=_msg((6, 9)), DstT=_msg((6, 1))),
        ]
        columns.append(f"Cast_{column}:y:0")
    graph += [_const("mean", model.mean.reshape(1, -1)), _const("variance", model.variance.reshape(1, -1))]
    serving_inputs += ["mean", "variance"]
    args += ["sub_y", "sqrt_x"]
    body += [
        _node("axis", "Const", value=_msg((8, _tensor(np.array(1, np.int32))))),
        _node("concat", "ConcatV2", [*columns, "axis:output:0"]),
        _node("sub", "Sub", ["concat:output:0", "sub_y"]),
        _node("Sqrt", "Sqrt", ["sqrt_x"]),
        _node("Maximum/y", "Const", value=_msg((8, _tensor(np.array(model.epsilon, np.float32))))),
        _node("Maximum", "Maximum", ["Sqrt:y:0", "Maximum/y:output:0"]),
        _node("truediv", "RealDiv", ["sub:z:0", "Maximum:z:0"]),
    ]
    hidden = "truediv:z:0"
    for index, (_, _, activation) in enumerate(model.layers):
        kernel, bias = f"kernel_{index}", f"bias_{index}"
        args += [kernel, bias]
        body += [
            _node(f"MatMul_{index}/read", "ReadVariableOp", [kernel]),
            _node(f"MatMul_{index}", "MatMul", [hidden, f"MatMul_{index}/read:value:0"]),
            _node(f"BiasAdd_{index}/read", "ReadVariableOp", [bias]),
            _node(f"BiasAdd_{index}", "BiasAdd", [f"MatMul_{index}:product:0", f"BiasAdd_{index}/read:value:0"]),
            _node(f"{activation}_{index}", activation, [f"BiasAdd_{index}:output:0"]),
        ]
        hidden = f"{activation}_{index}:{'activations' if activation == 'Relu' else 'y'}:0"
    serving_inputs += [name for name, _ in _variables(model)]
    body.append(_node("Identity", "Identity", [hidden]))
    functions.append(_function("wrapped_model", args, {"output_0": "Identity:output:0"}, body))
    return graph, functions, serving_inputs, args


def _bundle(variables: dict[str, tuple[str, np.ndarray]]) -> tuple[bytes, bytes]:
    """variables.index (an SSTable of BundleEntryProto, snappy-framed data block) and the data file.

    Checksums are written as zeros: curate's reader does not check them (the release's sha256 is pinned).
    """
    data, entries = bytearray(), {}
    object_graph = _msg(*[(1, _msg((2, _msg((1, "VARIABLE_VALUE"), (2, name), (3, key)))))
                          for key, (name, _) in variables.items()])
    graph_bytes = _varint(len(object_graph)) + b"\0\0\0\0" + object_graph
    entries["_CHECKPOINTABLE_OBJECT_GRAPH"] = _msg((1, 7), (2, _shape(())), (4, len(data)), (5, len(graph_bytes)))
    data += graph_bytes
    for key, (_, array) in variables.items():
        raw = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        entries[key] = _msg((1, _DT[array.dtype]), (2, _shape(array.shape)), (4, len(data)), (5, len(raw)))
        data += raw
    entries[""] = _msg((1, 1), (3, _msg((1, 1))))
    block = b"".join(
        _varint(0) + _varint(len(key)) + _varint(len(value)) + key.encode() + value
        for key, value in sorted(entries.items())
    )
    block += struct.pack("<II", 0, 1)
    framed = _varint(len(block)) + b"".join(  # snappy, literals only (at most 60 bytes each)
        bytes([(len(chunk) - 1) << 2]) + chunk for chunk in (block[i : i + 60] for i in range(0, len(block), 60))
    )
    table = framed + b"\x01\0\0\0\0"
    index_offset = len(table)
    last = max(entries).encode()
    handle = _varint(0) + _varint(len(framed))
    index_block = _varint(0) + _varint(len(last)) + _varint(len(handle)) + last + handle + struct.pack("<II", 0, 1)
    table += index_block + b"\0\0\0\0\0"
    meta_offset = len(table)
    table += struct.pack("<II", 0, 1) + b"\0\0\0\0\0"
    footer = _varint(meta_offset) + _varint(8) + _varint(index_offset) + _varint(len(index_block))
    table += footer + b"\0" * (40 - len(footer)) + struct.pack("<Q", 0xDB4775248B80FB57)
    return table, bytes(data)
