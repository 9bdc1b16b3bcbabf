"""A TensorFlow SavedModel read without TensorFlow: protobuf wire format, graph and function nodes, tensor bundle.

Only what a Keras model's inference graph needs: `saved_model.pb` (MetaGraphDef: GraphDef, function library,
signatures) and the `variables/` tensor bundle (an SSTable of BundleEntryProto plus raw tensor bytes).
Field numbers follow tensorflow/core/protobuf/{saved_model,meta_graph}.proto and framework/{graph,node_def,
function,attr_value,tensor,tensor_shape}.proto. Malformed input raises ValueError.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# DataType enum values (framework/types.proto) for the tensors a Keras inference graph holds.
DTYPES: dict[int, type] = {
    1: np.float32,
    2: np.float64,
    3: np.int32,
    4: np.uint8,
    7: np.object_,  # DT_STRING: bytes
    9: np.int64,
    10: np.bool_,
}
DT_STRING = 7
SSTABLE_MAGIC = 0xDB4775248B80FB57
CHECKPOINT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"


def varint(buffer: bytes, position: int) -> tuple[int, int]:
    """The unsigned varint at position and the position after it."""
    result = shift = 0
    while True:
        if position >= len(buffer):
            raise ValueError("truncated varint")
        byte = buffer[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, position
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def fields(buffer: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for the other wire types."""
    position, end = 0, len(buffer)
    while position < end:
        key, position = varint(buffer, position)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, position = varint(buffer, position)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, position = buffer[position : position + size], position + size
        elif wire == 2:
            size, position = varint(buffer, position)
            value, position = buffer[position : position + size], position + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if position > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("expected a length-delimited protobuf field")
    return value


def _int(value: int | bytes) -> int:
    if not isinstance(value, int):
        raise ValueError("expected a varint protobuf field")
    return value - (1 << 64) if value >= 1 << 63 else value


def _map_entry(buffer: bytes) -> tuple[str, bytes]:
    key, value = "", b""
    for number, item in fields(buffer):
        if number == 1:
            key = _bytes(item).decode()
        elif number == 2:
            value = _bytes(item)
    return key, value


def shape(buffer: bytes) -> tuple[int, ...]:
    """TensorShapeProto's dims (-1 where unknown)."""
    dims = []
    for number, item in fields(buffer):
        if number == 2:
            size = 0
            for sub, value in fields(_bytes(item)):
                if sub == 1:
                    size = _int(value)
            dims.append(size)
    return tuple(dims)


def _packed(number: int, item: int | bytes, fmt: str, width: int) -> list:
    if isinstance(item, int):  # an unpacked varint element
        return [_int(item)]
    if fmt == "varint":
        values, position = [], 0
        while position < len(item):
            value, position = varint(item, position)
            values.append(value - (1 << 64) if value >= 1 << 63 else value)
        return values
    return list(struct.unpack(f"<{len(item) // width}{fmt}", item))


def tensor(buffer: bytes) -> np.ndarray:
    """A TensorProto as a numpy array (strings as an object array of bytes)."""
    dtype_code, content = 0, None
    dims: tuple[int, ...] = ()
    strings: list[bytes] = []
    values: list = []
    for number, item in fields(buffer):
        if number == 1:
            dtype_code = _int(item)
        elif number == 2:
            dims = shape(_bytes(item))
        elif number == 4:
            content = _bytes(item)
        elif number == 8:
            strings.append(_bytes(item))
        elif number == 5:
            values += _packed(number, item, "f", 4)
        elif number == 6:
            values += _packed(number, item, "d", 8)
        elif number in (7, 10, 11):  # int_val, int64_val, bool_val
            values += _packed(number, item, "varint", 0)
    if dtype_code not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {dtype_code}")
    dtype = DTYPES[dtype_code]
    count = int(np.prod(dims)) if dims else 1
    if dtype_code == DT_STRING:
        array = np.empty(len(strings), dtype=object)
        array[:] = strings
    elif content is not None:
        array = np.frombuffer(content, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    else:
        array = np.array(values, dtype=dtype)
    if array.size == 1 and count > 1:  # TF stores a constant filled with one value as that value once
        array = np.repeat(array, count)
    if array.size != count:
        raise ValueError(f"tensor of shape {dims} holds {array.size} values")
    return array.reshape(dims)


@dataclass
class Node:
    """A NodeDef: op, inputs (control inputs dropped) and raw AttrValue messages."""

    name: str
    op: str
    inputs: list[str]
    attrs: dict[str, bytes]

    def attr(self, key: str) -> dict[int, int | bytes]:
        """The AttrValue fields of one attribute ({} when absent): 2 s, 3 i, 4 f, 5 b, 6 type, 8 tensor, 10 func."""
        return dict(fields(self.attrs[key])) if key in self.attrs else {}

    def tensor(self) -> np.ndarray:
        return tensor(_bytes(self.attr("value")[8]))

    def function(self) -> str:
        """The name of the function a call node calls (attribute f)."""
        name_attr = self.attr("f").get(10)
        if name_attr is None:
            raise ValueError(f"node {self.name} ({self.op}) names no function")
        return dict(fields(_bytes(name_attr)))[1].decode()  # type: ignore[union-attr]


def node(buffer: bytes) -> Node:
    name, op, inputs, attrs = "", "", [], {}
    for number, item in fields(buffer):
        if number == 1:
            name = _bytes(item).decode()
        elif number == 2:
            op = _bytes(item).decode()
        elif number == 3:
            text = _bytes(item).decode()
            if not text.startswith("^"):
                inputs.append(text)
        elif number == 5:
            key, value = _map_entry(_bytes(item))
            attrs[key] = value
    return Node(name, op, inputs, attrs)


@dataclass
class Function:
    """A FunctionDef: argument names, output names, body nodes and ret (output name → tensor inside the body)."""

    name: str
    args: list[str]
    outputs: list[str]
    nodes: dict[str, Node]
    ret: dict[str, str]


def function(buffer: bytes) -> Function:
    name, nodes, ret = "", {}, {}
    args: list[str] = []
    outputs: list[str] = []
    for number, item in fields(buffer):
        if number == 1:  # OpDef: 1 name, 2 input_arg, 3 output_arg (ArgDef: 1 name)
            for sub, value in fields(_bytes(item)):
                if sub == 1:
                    name = _bytes(value).decode()
                elif sub in (2, 3):
                    arg = dict(fields(_bytes(value)))[1]
                    (args if sub == 2 else outputs).append(_bytes(arg).decode())
        elif number == 3:
            body = node(_bytes(item))
            nodes[body.name] = body
        elif number == 4:
            key, value = _map_entry(_bytes(item))
            ret[key] = value.decode()
    return Function(name, args, outputs, nodes, ret)


@dataclass
class SavedModel:
    """The first MetaGraphDef of a saved_model.pb: graph nodes, functions, signatures (name → output tensors).

    Function bodies are parsed when first asked for: a Keras model saves each call five ways, one is served.
    """

    nodes: dict[str, Node]
    function_bytes: dict[str, bytes]
    signature_inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    signature_outputs: dict[str, dict[str, str]] = field(default_factory=dict)
    _parsed: dict[str, Function] = field(default_factory=dict)

    def function(self, name: str) -> Function | None:
        if name not in self._parsed and name in self.function_bytes:
            self._parsed[name] = function(self.function_bytes[name])
        return self._parsed.get(name)


def _function_name(buffer: bytes) -> str:
    for number, item in fields(buffer):
        if number == 1:
            for sub, value in fields(_bytes(item)):
                if sub == 1:
                    return _bytes(value).decode()
    raise ValueError("a function without a name")


def saved_model(buffer: bytes) -> SavedModel:
    """Parse saved_model.pb (SavedModel: 2 meta_graphs; MetaGraphDef: 2 graph_def, 5 signature_def)."""
    meta_graphs = [_bytes(item) for number, item in fields(buffer) if number == 2]
    if not meta_graphs:
        raise ValueError("no meta graph")
    model = SavedModel({}, {})
    for number, item in fields(meta_graphs[0]):
        if number == 2:  # GraphDef: 1 node, 2 library (FunctionDefLibrary: 1 function)
            for sub, value in fields(_bytes(item)):
                if sub == 1:
                    graph_node = node(_bytes(value))
                    model.nodes[graph_node.name] = graph_node
                elif sub == 2:
                    for kind, definition in fields(_bytes(value)):
                        if kind == 1:
                            model.function_bytes[_function_name(_bytes(definition))] = _bytes(definition)
        elif number == 5:  # map<string, SignatureDef>; SignatureDef: 1 inputs, 2 outputs (TensorInfo: 1 name)
            key, signature = _map_entry(_bytes(item))
            for sub, value in fields(signature):
                if sub in (1, 2):
                    io_name, info = _map_entry(_bytes(value))
                    target = model.signature_inputs if sub == 1 else model.signature_outputs
                    target.setdefault(key, {})[io_name] = _bytes(dict(fields(info))[1]).decode()
    if not model.nodes:
        raise ValueError("the meta graph has no graph nodes")
    return model


# --- tensor bundle (variables/variables.index + variables.data-NNNNN-of-NNNNN) ---


@dataclass(frozen=True)
class BundleEntry:
    """Where one saved tensor's bytes are: BundleEntryProto 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size."""

    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int


def sstable(buffer: bytes) -> dict[bytes, bytes]:
    """Every key → value of a LevelDB-format table (TF's tensor bundle index); blocks uncompressed or snappy."""
    if len(buffer) < 48 or struct.unpack("<Q", buffer[-8:])[0] != SSTABLE_MAGIC:
        raise ValueError("not a tensor bundle index (bad table footer)")
    _, position = varint(buffer, len(buffer) - 48)  # metaindex offset
    _, position = varint(buffer, position)  # metaindex size
    index_offset, position = varint(buffer, position)
    index_size, _ = varint(buffer, position)
    entries: dict[bytes, bytes] = {}
    for _, handle in _block_entries(_block(buffer, index_offset, index_size)):
        offset, position = varint(handle, 0)
        size, _ = varint(handle, position)
        entries.update(_block_entries(_block(buffer, offset, size)))
    return entries


def _block(buffer: bytes, offset: int, size: int) -> bytes:
    if offset + size + 5 > len(buffer):
        raise ValueError("table block past the end of the file")
    data, compression = buffer[offset : offset + size], buffer[offset + size]
    if compression == 0:
        return data
    if compression == 1:
        return snappy_decompress(data)
    raise ValueError(f"unsupported table block compression {compression}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    if len(block) < 4:
        raise ValueError("table block too short")
    restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 - 4 * restarts
    if end < 0:
        raise ValueError("table block restart array past its start")
    position, key = 0, b""
    while position < end:
        shared, position = varint(block, position)
        unshared, position = varint(block, position)
        value_size, position = varint(block, position)
        key = key[:shared] + block[position : position + unshared]
        position += unshared
        yield key, block[position : position + value_size]
        position += value_size


def snappy_decompress(data: bytes) -> bytes:
    """Raw snappy (the format LevelDB tables use): a varint length, then literals and back-references."""
    length, position = varint(data, 0)
    out = bytearray()
    while position < len(data):
        tag = data[position]
        position += 1
        kind = tag & 3
        if kind == 0:
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(data[position : position + extra], "little")
                position += extra
            size += 1
            out += data[position : position + size]
            position += size
            continue
        if kind == 1:
            size, distance = 4 + ((tag >> 2) & 7), ((tag >> 5) << 8) | data[position]
            position += 1
        else:
            width = 2 if kind == 2 else 4
            size, distance = (tag >> 2) + 1, int.from_bytes(data[position : position + width], "little")
            position += width
        if distance == 0 or distance > len(out):
            raise ValueError("corrupt snappy block")
        for _ in range(size):  # byte by byte: a copy may overlap what it writes
            out.append(out[-distance])
    if len(out) != length:
        raise ValueError("corrupt snappy block (wrong length)")
    return bytes(out)


def bundle_entries(index: bytes) -> tuple[int, dict[str, BundleEntry]]:
    """The shard count and every tensor's BundleEntry of a variables.index file."""
    shards, entries = 1, {}
    for key, value in sstable(index).items():
        parsed = dict(fields(value))
        if key == b"":  # BundleHeaderProto: 1 num_shards, 2 endianness (0 little)
            shards = _int(parsed.get(1, 1))
            if _int(parsed.get(2, 0)) != 0:
                raise ValueError("big-endian tensor bundle")
            continue
        if 7 in parsed:
            raise ValueError(f"sliced (partitioned) variable {key.decode()!r} is not supported")
        entries[key.decode()] = BundleEntry(
            dtype=_int(parsed.get(1, 0)),
            shape=shape(_bytes(parsed[2])) if 2 in parsed else (),
            shard=_int(parsed.get(3, 0)),
            offset=_int(parsed.get(4, 0)),
            size=_int(parsed.get(5, 0)),
        )
    return shards, entries


def bundle_tensor(entry: BundleEntry, data: bytes) -> np.ndarray:
    """One tensor from its shard's bytes; strings are varint lengths, a 4-byte checksum, then the bytes."""
    if entry.offset + entry.size > len(data):
        raise ValueError("tensor bytes past the end of the data file (truncated?)")
    raw = data[entry.offset : entry.offset + entry.size]
    count = int(np.prod(entry.shape)) if entry.shape else 1
    if entry.dtype == DT_STRING:
        sizes, position = [], 0
        for _ in range(count):
            size, position = varint(raw, position)
            sizes.append(size)
        position += 4
        strings = np.empty(count, dtype=object)
        for index, size in enumerate(sizes):
            strings[index], position = raw[position : position + size], position + size
        return strings.reshape(entry.shape)
    if entry.dtype not in DTYPES:
        raise ValueError(f"unsupported tensor dtype {entry.dtype}")
    dtype = np.dtype(DTYPES[entry.dtype]).newbyteorder("<")
    if len(raw) != count * dtype.itemsize:
        raise ValueError(f"tensor of shape {entry.shape} has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype).astype(DTYPES[entry.dtype]).reshape(entry.shape)


def checkpoint_keys(object_graph: bytes) -> dict[str, str]:
    """full_name → checkpoint key of every variable in a TrackableObjectGraph (nodes → attributes)."""
    keys = {}
    for number, item in fields(object_graph):
        if number != 1:
            continue
        for sub, value in fields(_bytes(item)):
            if sub == 2:  # SerializedTensor: 1 name, 2 full_name, 3 checkpoint_key
                attribute = dict(fields(_bytes(value)))
                if 2 in attribute and 3 in attribute:
                    keys[_bytes(attribute[2]).decode()] = _bytes(attribute[3]).decode()
    return keys
