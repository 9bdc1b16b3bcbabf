"""What the NSFW detector's SavedModel computes, read off its serving graph (no TensorFlow, no torch).

From the `serving_default` output back to its input, through function calls: sigmoid/ReLU dense layers, the
Normalization, the multi-category encoding's ConcatV2 of per-column NaN guards and string-table lookups, the
SplitV of the input. Constants come from the graph, variables from the checkpoint (by the object graph's
checkpoint keys), tables from their initializers. A graph of any other shape is refused, not approximated.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from curate.models import savedmodel
from curate.models.savedmodel import Function, Node, SavedModel
from curate.models.weights import WeightsError, WeightSpec

CALLS = ("StatefulPartitionedCall", "PartitionedCall")
ACTIVATIONS = ("Relu", "Sigmoid")
FLOAT_TYPES = {1: "float32", 2: "float64"}


@dataclass
class Lookup:
    """One categorical column: its position in the encoded row and its string table (keys → int64, default)."""

    position: int
    keys: list[str]
    values: np.ndarray
    default: int


@dataclass
class SafetyGraph:
    """The inference graph as data: column order, lookups, normalization and dense layers (kernel [in, out])."""

    input_dim: int
    columns: np.ndarray  # source column of each encoded position (ConcatV2 order)
    nan_to_zero: np.ndarray  # positions whose NaN becomes 0 (the numeric columns)
    lookups: list[Lookup]
    mean: np.ndarray
    variance: np.ndarray
    epsilon: float
    layers: list[tuple[np.ndarray, np.ndarray, str | None]] = field(default_factory=list)


@dataclass(eq=False)
class _Frame:
    function: Function | None  # None: the top-level graph
    args: list[_Ref]
    path: tuple[str, ...]  # call nodes from the top: tells apart two calls of one function


@dataclass(eq=False)
class _Ref:
    frame: _Frame
    node: Node
    index: int

    @property
    def op(self) -> str:
        return self.node.op

    @property
    def key(self) -> tuple:
        return self.frame.path, self.node.name, self.index


class _Graph:
    """Tensor references resolved through Identity, call nodes (into the callee) and arguments (to the caller)."""

    def __init__(self, model: SavedModel, variables: dict[str, np.ndarray]) -> None:
        self.model = model
        self.variables = variables
        self.top = _Frame(None, [], ())

    def resolve(self, frame: _Frame, name: str) -> _Ref:
        parts = name.split(":")
        if frame.function is None:
            graph_node, index = self._node(self.model.nodes, parts[0]), int(parts[1]) if len(parts) > 1 else 0
        elif len(parts) == 1:
            names = frame.function.args
            if name not in names or names.index(name) >= len(frame.args):
                raise ValueError(f"{frame.function.name} has no node or bound argument {name!r}")
            return frame.args[names.index(name)]
        else:
            graph_node, index = self._node(frame.function.nodes, parts[0]), int(parts[-1])
        if graph_node.op == "Identity":
            return self.resolve(frame, graph_node.inputs[0])
        if graph_node.op in CALLS:
            callee = self.model.function(graph_node.function())
            if callee is None or index >= len(callee.outputs):
                raise ValueError(f"call {graph_node.name} to a missing function or output")
            args = [self.resolve(frame, name) for name in graph_node.inputs]
            inner = _Frame(callee, args, frame.path + (graph_node.name,))
            return self.resolve(inner, callee.ret[callee.outputs[index]])
        return _Ref(frame, graph_node, index)

    @staticmethod
    def _node(nodes: dict[str, Node], name: str) -> Node:
        if name not in nodes:
            raise ValueError(f"the graph has no node {name!r}")
        return nodes[name]

    def inputs(self, ref: _Ref, ops: tuple[str, ...] | None = None) -> list[_Ref]:
        refs = [self.resolve(ref.frame, name) for name in ref.node.inputs]
        if ops is not None and tuple(r.op for r in refs) != ops:
            found = tuple(r.op for r in refs)
            raise ValueError(f"{ref.op} node {ref.node.name} takes {found}, expected {ops}")
        return refs

    def value(self, ref: _Ref) -> np.ndarray:
        """A constant: a Const node, or a variable read from the checkpoint."""
        if ref.op == "Const":
            return ref.node.tensor()
        if ref.op == "ReadVariableOp":
            return self.value(self.inputs(ref)[0])
        if ref.op == "VarHandleOp":
            shared = ref.node.attr("shared_name").get(2)
            name = shared.decode() if isinstance(shared, bytes) and shared else ref.node.name
            if name not in self.variables:
                raise ValueError(f"variable {name!r} is not in the checkpoint")
            return self.variables[name]
        raise ValueError(f"{ref.op} node {ref.node.name} is not a constant or variable")

    def table(self, ref: _Ref) -> tuple[list[str], np.ndarray]:
        """Keys and values a HashTableV2 is initialized with (LookupTableImportV2 in some graph-level call)."""
        if ref.op != "HashTableV2":
            raise ValueError(f"lookup table {ref.node.name} is a {ref.op}; only HashTableV2 is supported")
        found = [item for item in self._imports() if self.resolve(item.frame, item.node.inputs[0]).key == ref.key]
        if len(found) != 1:
            raise ValueError(f"lookup table {ref.node.name} has {len(found)} initializers, expected 1")
        _, keys, values = self.inputs(found[0])
        texts, indices = [key.decode() for key in self.value(keys).reshape(-1)], self.value(values).reshape(-1)
        if len(texts) != len(indices) or len(set(texts)) != len(texts):
            raise ValueError(
                f"lookup table {ref.node.name} has {len(texts)} keys ({len(set(texts))} distinct) "
                f"for {len(indices)} values"
            )
        return texts, indices.astype(np.int64)

    def _imports(self) -> list[_Ref]:
        """Every LookupTableImportV2 reached from a graph-level call node, in its calling frame."""
        found: list[_Ref] = []
        for graph_node in self.model.nodes.values():
            if graph_node.op in CALLS:
                args = [self.resolve(self.top, name) for name in graph_node.inputs]
                self._collect(graph_node.function(), args, (graph_node.name,), found, depth=0)
        return found

    def _collect(self, name: str, args: list[_Ref], path: tuple[str, ...], found: list[_Ref], depth: int) -> None:
        function = self.model.function(name)
        if function is None or depth > 8:
            return
        frame = _Frame(function, args, path)
        for body in function.nodes.values():
            if body.op == "LookupTableImportV2":
                found.append(_Ref(frame, body, 0))
            elif body.op in CALLS:
                inner = [self.resolve(frame, arg) for arg in body.inputs]
                self._collect(body.function(), inner, path + (body.name,), found, depth + 1)


def extract(model: SavedModel, variables: dict[str, np.ndarray]) -> SafetyGraph:
    """The SafetyGraph of a SavedModel whose serving_default has one input and one output."""
    outputs = model.signature_outputs.get("serving_default", {})
    inputs = model.signature_inputs.get("serving_default", {})
    if len(outputs) != 1 or len(inputs) != 1:
        raise ValueError("no serving_default signature with one input and one output")
    graph = _Graph(model, variables)
    ref = graph.resolve(graph.top, next(iter(outputs.values())))
    layers: list[tuple[np.ndarray, np.ndarray, str | None]] = []
    while ref.op != "RealDiv":
        activation = None
        if ref.op in ACTIVATIONS:
            activation, ref = ref.op, graph.inputs(ref)[0]
        matmul, bias = graph.inputs(ref, ("MatMul", "ReadVariableOp")) if ref.op == "BiasAdd" else _unexpected(ref)
        if any(matmul.node.attr(flag).get(5) for flag in ("transpose_a", "transpose_b")):
            raise ValueError(f"transposed MatMul {matmul.node.name}")
        hidden, kernel = graph.inputs(matmul)
        layers.append((graph.value(kernel).astype(np.float32), graph.value(bias).astype(np.float32), activation))
        ref = hidden
    if not layers:
        raise ValueError("no dense layers after the normalization")
    centered, scale = graph.inputs(ref, ("Sub", "Maximum"))
    concat, mean = graph.inputs(centered)
    root, epsilon = graph.inputs(scale)
    (variance,) = graph.inputs(root, ("Const",)) if root.op == "Sqrt" else _unexpected(root)
    variance_value = graph.value(variance)
    encoded = _encoding(graph, concat, inputs)
    encoded.mean, encoded.variance = graph.value(mean).astype(np.float32), variance_value.astype(np.float32)
    encoded.epsilon = float(graph.value(epsilon))
    encoded.layers = layers[::-1]
    _check_shapes(encoded)
    return encoded


def _check_shapes(graph: SafetyGraph) -> None:
    if graph.mean.size != len(graph.columns) or graph.variance.size != len(graph.columns):
        raise ValueError(f"normalization of {graph.mean.size} columns after an encoding of {len(graph.columns)}")
    width = len(graph.columns)
    for kernel, bias, _ in graph.layers:
        if kernel.ndim != 2 or kernel.shape[0] != width or bias.shape != (kernel.shape[1],):
            raise ValueError(f"a dense layer of kernel {kernel.shape} and bias {bias.shape} after {width} columns")
        width = kernel.shape[1]
    if width != 1:
        raise ValueError(f"the model ends in {width} outputs, not one probability")


def _encoding(graph: _Graph, concat: _Ref, inputs: dict[str, str]) -> SafetyGraph:
    if concat.op != "ConcatV2":
        _unexpected(concat)
    *columns, axis = graph.inputs(concat)
    if int(graph.value(axis)) not in (1, -1):
        raise ValueError("the encoding does not concatenate along columns")
    sources, guarded, lookups, split = [], [], [], None
    for position, column in enumerate(columns):
        if column.op == "SelectV2":  # SelectV2(IsNan(x), ZerosLike(x), x): NaN → 0
            is_nan, zeros, value = graph.inputs(column, ("IsNan", "ZerosLike", "SplitV"))
            if not graph.inputs(is_nan)[0].key == graph.inputs(zeros)[0].key == value.key:
                raise ValueError(f"NaN guard {column.node.name} mixes columns")
            sources.append(value)
            guarded.append(True)
        elif column.op == "Cast":  # Cast(LookupTableFindV2(table, AsString(x), default))
            (find,) = graph.inputs(column, ("LookupTableFindV2",))
            table, text, default = graph.inputs(find, ("HashTableV2", "AsString", "Const"))
            _check_as_string(text)
            (value,) = graph.inputs(text, ("SplitV",))
            keys, table_values = graph.table(table)
            lookups.append(Lookup(position, keys, table_values, int(graph.value(default))))
            sources.append(value)
            guarded.append(False)
        elif column.op == "SplitV":
            sources.append(column)
            guarded.append(False)
        else:
            _unexpected(column)
        split = split or sources[-1]
        if sources[-1].frame.path != split.frame.path or sources[-1].node is not split.node:
            raise ValueError("the encoding's columns come from different splits")
    assert split is not None
    width = _check_split(graph, split, inputs)
    indices = np.array([source.index for source in sources], dtype=np.int64)
    if indices.min() < 0 or indices.max() >= width:
        raise ValueError("the encoding reads a column past the input")
    return SafetyGraph(width, indices, np.array(guarded), lookups, np.zeros(0), np.zeros(0), 0.0)


def _check_split(graph: _Graph, split: _Ref, inputs: dict[str, str]) -> int:
    """The input width; the split must cut the (cast) signature input into single columns along axis 1."""
    source, sizes, axis = graph.inputs(split)
    if FLOAT_TYPES.get(int(split.node.attr("T").get(6, 0))) != "float32":  # type: ignore[arg-type]
        raise ValueError("the encoding does not compute in float32")
    if source.op == "Cast":
        (source,) = graph.inputs(source)
    expected = graph.resolve(graph.top, next(iter(inputs.values())))
    if source.op != "Placeholder" or source.key != expected.key:
        raise ValueError("the encoding does not read the signature's input")
    sizes_value = graph.value(sizes)
    if int(graph.value(axis)) not in (1, -1) or not np.all(sizes_value == 1):
        raise ValueError("the encoding's split is not one column each")
    return int(sizes_value.size)


def _check_as_string(ref: _Ref) -> None:
    """Only AsString's defaults ("%f") are reproduced; any formatting attribute set is refused."""
    for name in ("precision", "width"):
        if int(ref.node.attr(name).get(3, -1)) not in (-1,):  # type: ignore[arg-type]
            raise ValueError(f"AsString {ref.node.name} sets {name}")
    if ref.node.attr("scientific").get(5) or ref.node.attr("shortest").get(5) or ref.node.attr("fill").get(2):
        raise ValueError(f"AsString {ref.node.name} sets a format")


def _unexpected(ref: _Ref):  # type: ignore[no-untyped-def]
    raise ValueError(f"unexpected {ref.op} node {ref.node.name} in the graph")


def read_files(path: Path) -> dict[str, bytes]:
    """saved_model.pb and variables/* of a SavedModel zip or folder, keyed by their path below the model folder."""
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with zipfile.ZipFile(path) as archive:
        names = [name for name in archive.namelist() if not name.endswith("/")]
        roots = {name[: -len("saved_model.pb")] for name in names if name.endswith("saved_model.pb")}
        if len(roots) != 1:
            return {}
        root = roots.pop()
        return {name[len(root) :]: archive.read(name) for name in names if name.startswith(root)}


def read_safety_model(path: str | Path, spec: WeightSpec) -> SafetyGraph:
    """The SafetyGraph of a release zip (or unzipped folder); any problem is a WeightsError naming spec.option."""
    path = Path(path)
    try:
        files = read_files(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise WeightsError(
            f"{spec.name}: cannot read {path} as a zip ({error}); pass the release zip with {spec.option}"
        ) from error
    missing = [name for name in ("saved_model.pb", "variables/variables.index") if name not in files]
    if missing:
        raise WeightsError(
            f"{spec.name}: {path} has no {', '.join(missing)}; is it {spec.sources[0].filename}? "
            f"Pass the release zip with {spec.option}"
        )
    try:
        return extract(savedmodel.saved_model(files["saved_model.pb"]), read_variables(files))
    except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError) as error:
        raise WeightsError(
            f"{spec.name}: {path} is not a SavedModel this reader understands ({error}); "
            f"pass the release zip with {spec.option}"
        ) from error


def read_variables(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Every variable of the checkpoint by its full name (as VarHandleOp's shared_name), via the object graph."""
    shards, entries = savedmodel.bundle_entries(files["variables/variables.index"])
    data = {}
    for shard in range(shards):
        name = f"variables/variables.data-{shard:05d}-of-{shards:05d}"
        if name not in files:
            raise ValueError(f"{name} is missing")
        data[shard] = files[name]
    if savedmodel.CHECKPOINT_GRAPH_KEY not in entries:
        raise ValueError("the checkpoint has no object graph")
    graph_entry = entries[savedmodel.CHECKPOINT_GRAPH_KEY]
    object_graph = savedmodel.bundle_tensor(graph_entry, data[graph_entry.shard]).reshape(-1)[0]
    variables = {}
    for full_name, key in savedmodel.checkpoint_keys(object_graph).items():
        if key in entries and entries[key].dtype != savedmodel.DT_STRING:
            variables[full_name] = savedmodel.bundle_tensor(entries[key], data[entries[key].shard])
    return variables
