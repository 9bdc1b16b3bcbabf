"""Check curate's torch port of LAION's NSFW detector against the Keras SavedModel itself (run by hand, not in CI).

TensorFlow is not a dependency: give the python of a throwaway venv that has it, e.g.
    python3 -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu
    .venv/bin/python bench/check_safety_keras.py --zip clip_autokeras_binary_nsfw.zip --tf-python /tmp/tfvenv/bin/python
The TF side runs `tf.saved_model.load(...).signatures["serving_default"]`, the graph Keras saved (no autokeras
needed). Four sets of inputs: random unit vectors; "real-looking" unit vectors drawn from the per-column mean and
variance of LAION's training embeddings (the Normalization layer's statistics); unit vectors whose categorical
columns hold table keys; and vectors at the exact float32 edges of keys (and one step outside). Prints max and mean
|Δ| of punsafe for the port and for a port of the dense layers alone (categorical columns passed through raw).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REFERENCE_COUNT = 8  # rows per set kept in tests/models/data/safety_keras_reference.json
KERAS_SIDE = """
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
inputs = np.load(sys.argv[2])
name = list(model.structured_input_signature[1])[0]
out = [next(iter(model(**{name: tf.constant(inputs[i:i + 4096])}).values())).numpy().reshape(-1)
       for i in range(0, len(inputs), 4096)]
np.save(sys.argv[3], np.concatenate(out).astype(np.float64))
"""


def input_sets(graph, count: int, seed: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """float64 inputs that are float32-exact (Keras casts to float32 first, the port reads float32)."""
    from curate.models.safety import _from_sortable, lookup_intervals

    rng = np.random.default_rng(seed)
    dim = graph.input_dim
    unit = rng.standard_normal((count, dim))
    mean, std = graph.mean.reshape(-1).astype(np.float64), np.sqrt(graph.variance.reshape(-1).astype(np.float64))
    real = mean + std * rng.standard_normal((count, dim))
    columns = [int(graph.columns[lookup.position]) for lookup in graph.lookups]
    keys = [[float(lookup.keys[i]) for i in rng.integers(len(lookup.keys), size=count)] for lookup in graph.lookups]
    keyed = _unit_with(mean + std * rng.standard_normal((count, dim)), columns, keys)
    edge_values = []
    for lookup in graph.lookups:
        starts, ends, _ = lookup_intervals(lookup)
        pick = rng.integers(len(starts), size=count)
        step = rng.integers(-1, 3, size=count)  # -1: just below start, 0: start, 1: end, 2: just above end
        sortable = np.where(step <= 0, starts[pick].astype(np.int64) + step, ends[pick].astype(np.int64) + step - 1)
        edge_values.append([_from_sortable(int(s)) for s in sortable])
    edges = _unit_with(mean + std * rng.standard_normal((count, dim)), columns, edge_values)
    sets = {
        "random unit": unit / np.linalg.norm(unit, axis=1, keepdims=True),
        "real-looking unit": real / np.linalg.norm(real, axis=1, keepdims=True),
        "table keys (unit)": keyed,
        "key edges ±1 float": edges,
    }
    return {name: values.astype(np.float32).astype(np.float64) for name, values in sets.items()}


def _unit_with(base: np.ndarray, columns: list[int], values: list[list[float]]) -> np.ndarray:
    """Rows with columns set to float32 values exactly, the other columns rescaled to give unit norm."""
    rows = base.copy()
    for column, column_values in zip(columns, values, strict=True):
        rows[:, column] = np.float32(column_values)
    others = np.ones(rows.shape[1], dtype=bool)
    others[columns] = False
    room = np.sqrt(np.clip(1 - (rows[:, columns] ** 2).sum(1), 0, None)) / np.linalg.norm(rows[:, others], axis=1)
    rows[:, others] *= room[:, None]
    return rows


def dense_only(graph, inputs: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    """The port a reader of the kernels alone would write: no categorical encoding."""
    hidden = (inputs.astype(np.float32) - graph.mean.reshape(-1)) / np.maximum(
        np.sqrt(graph.variance.reshape(-1)), np.float32(graph.epsilon)
    )
    for kernel, bias, activation in graph.layers:
        hidden = hidden @ kernel + bias
        hidden = np.maximum(hidden, 0) if activation == "Relu" else hidden
        hidden = 1 / (1 + np.exp(-hidden)) if activation == "Sigmoid" else hidden
    return hidden.reshape(-1).astype(np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", required=True, help="clip_autokeras_binary_nsfw.zip")
    parser.add_argument("--tf-python", required=True, help="python of a venv with tensorflow")
    parser.add_argument("--count", type=int, default=4000, help="embeddings per set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument(
        "--write-reference", help="write Keras punsafe of REFERENCE_COUNT inputs per set (a test fixture)"
    )
    args = parser.parse_args()
    import torch

    from curate.models.safety import SAFETY, SafetyNetwork
    from curate.models.safety_graph import read_safety_model
    from curate.models.weights import sha256_of

    graph = read_safety_model(args.zip, SAFETY)
    network = SafetyNetwork(graph).eval()
    sets = input_sets(graph, args.count, args.seed)
    results: dict = {"zip_sha256": sha256_of(args.zip), "sets": {}}
    reference: dict = {"zip_sha256": results["zip_sha256"], "seed": args.seed, "count": args.count, "sets": {}}
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(args.zip) as archive:
            archive.extractall(folder)
        model_dir = str(next(Path(folder).rglob("saved_model.pb")).parent)
        for name, inputs in sets.items():
            np.save(f"{folder}/in.npy", inputs)
            subprocess.run(
                [args.tf_python, "-c", KERAS_SIDE, model_dir, f"{folder}/in.npy", f"{folder}/out.npy"],
                check=True,
                stderr=subprocess.DEVNULL,
            )
            keras = np.load(f"{folder}/out.npy")
            with torch.inference_mode():
                ours = network(torch.from_numpy(inputs.astype(np.float32))).numpy().astype(np.float64)
            port, dense = np.abs(ours - keras), np.abs(dense_only(graph, inputs) - keras)
            if args.write_reference:
                reference["sets"][name] = keras[:REFERENCE_COUNT].tolist()
            results["sets"][name] = {
                "n": len(inputs),
                "port_max": float(port.max()),
                "port_mean": float(port.mean()),
                "dense_only_max": float(dense.max()),
                "dense_only_mean": float(dense.mean()),
                "keras_punsafe_range": [float(keras.min()), float(keras.max())],
            }
    everything = np.array([v["port_max"] for v in results["sets"].values()])
    results["n_total"] = sum(v["n"] for v in results["sets"].values())
    results["port_max_all"] = float(everything.max())
    json.dump(results, sys.stdout, indent=1)
    print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.write_reference:
        Path(args.write_reference).write_text(json.dumps(reference, indent=1) + "\n")
    if results["port_max_all"] > 1e-4:
        sys.exit("the port disagrees with Keras by more than 1e-4")


if __name__ == "__main__":
    main()
