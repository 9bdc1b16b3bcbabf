"""LAION's NSFW detector: a tiny SavedModel in the release's file format, read without TensorFlow and run in torch."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from curate.models import savedmodel
from curate.models.safety import SAFETY, SafetyDetector, SafetyNetwork, key_interval
from curate.models.safety_graph import read_safety_model
from curate.models.testing import TinySafety, tiny_safety, write_tiny_safety
from curate.models.weights import WeightsError, resolve_weights

REFERENCE = Path(__file__).parent / "data" / "safety_keras_reference.json"


def graph_by_hand(model: TinySafety, inputs: np.ndarray) -> np.ndarray:
    """The detector's graph in numpy, from the arrays the fixture was written from (not from the parser)."""
    values = inputs.astype(np.float32)
    encoded = np.where(np.isnan(values), np.float32(0), values)
    for column, (keys, table_values, default) in model.tables.items():
        table = dict(zip(keys, table_values.tolist(), strict=True))
        # TF's AsString is C's "%f"; Python's "%f" rounds the same way and keeps the sign of -0.0
        encoded[:, column] = [table.get("%f" % float(v), default) for v in values[:, column]]  # noqa: UP031
    hidden = (encoded - model.mean) / np.maximum(np.sqrt(model.variance), np.float32(model.epsilon))
    for kernel, bias, activation in model.layers:
        hidden = hidden @ kernel + bias
        hidden = np.maximum(hidden, 0) if activation == "Relu" else 1 / (1 + np.exp(-hidden))
    return hidden.reshape(-1)


def dense_only(model: TinySafety, inputs: np.ndarray) -> np.ndarray:
    plain = TinySafety(model.mean, model.variance, model.layers, {}, model.epsilon)
    return graph_by_hand(plain, inputs)


def probe_inputs(model: TinySafety, rows: int = 64, seed: int = 1) -> np.ndarray:
    """Unit vectors; then rows whose categorical columns hold keys, -1e-9 ("-0.000000"), +0.0, NaN."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((rows, len(model.mean))).astype(np.float32)
    inputs /= np.linalg.norm(inputs, axis=1, keepdims=True)
    for column, (keys, _, _) in model.tables.items():
        printable = [float(key) for key in keys if key not in ("0.5", "abc")]
        inputs[: rows // 2, column] = np.float32(rng.choice(printable, rows // 2))
        inputs[rows // 2 : rows // 2 + 4, column] = [-1e-9, 0.0, -0.0, np.nan]
    inputs[-1, 1] = np.nan  # a numeric column: NaN becomes 0
    return inputs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinySafety, Path]:
    model = tiny_safety()
    return model, write_tiny_safety(tmp_path_factory.mktemp("safety") / "clip_autokeras_binary_nsfw.zip", model)


def test_parser_reads_the_graph_structure(tiny: tuple[TinySafety, Path]) -> None:
    model, path = tiny
    graph = read_safety_model(path, SAFETY)
    assert graph.input_dim == 16 and graph.columns.tolist() == list(range(16))
    assert [lookup.position for lookup in graph.lookups] == [3, 9]
    assert graph.lookups[0].keys == model.tables[3][0] and graph.lookups[0].default == 0
    assert graph.nan_to_zero.tolist() == [column not in (3, 9) for column in range(16)]
    assert [activation for _, _, activation in graph.layers] == ["Relu", "Relu", "Sigmoid"]
    for (kernel, bias, _), (want_kernel, want_bias, _) in zip(graph.layers, model.layers, strict=True):
        np.testing.assert_array_equal(kernel, want_kernel)
        np.testing.assert_array_equal(bias, want_bias)
    np.testing.assert_array_equal(graph.mean.reshape(-1), model.mean)
    assert graph.epsilon == pytest.approx(1e-7)


def test_forward_equals_the_graph_computed_by_hand(tiny: tuple[TinySafety, Path]) -> None:
    model, path = tiny
    inputs = probe_inputs(model)
    network = SafetyNetwork(read_safety_model(path, SAFETY)).eval()
    with torch.inference_mode():
        ours = network(torch.from_numpy(inputs)).numpy()
    expected = graph_by_hand(model, inputs)
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    # the lookups matter: the same weights without the encoding are far off on the keyed rows
    assert np.abs(dense_only(model, inputs) - expected)[:32].max() > 1e-2


def test_detector_normalizes_embeddings_first(tiny: tuple[TinySafety, Path]) -> None:
    model, path = tiny
    detector = SafetyDetector.load(str(path))
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((8, 16)).astype(np.float32) * 7
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    scores = detector.predict(raw)
    assert scores.dtype == np.float32 and scores.shape == (8,)
    np.testing.assert_allclose(scores, graph_by_hand(model, unit), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        detector.predict(np.zeros((2, 15), np.float32))


def test_lookup_is_exact_at_every_float_near_key_edges(tiny: tuple[TinySafety, Path]) -> None:
    """Every float32 within 40 steps of each key's edges looks up as its "%f" string does in the table."""
    model, path = tiny
    network = SafetyNetwork(read_safety_model(path, SAFETY))
    keys, values, default = model.tables[3]
    table = dict(zip(keys, values.tolist(), strict=True))
    candidates = []
    for key in keys:
        interval = key_interval(key)
        if interval is not None:
            for edge in interval:
                candidates += [edge + step for step in range(-40, 41)]
    from curate.models.safety import _from_sortable

    floats = np.array([_from_sortable(s) for s in candidates], dtype=np.float32)
    expected = np.array([table.get("%f" % float(v), default) for v in floats], dtype=np.float32)  # noqa: UP031
    got = network._look_up(torch.from_numpy(floats), 0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert (expected != default).sum() > 100 and (expected == default).sum() > 10


def test_key_intervals_of_special_and_unprintable_keys() -> None:
    assert key_interval("0.5") is None and key_interval("abc") is None and key_interval("1e-3") is None
    negative_zero, positive_zero = key_interval("-0.000000"), key_interval("0.000000")
    assert negative_zero is not None and positive_zero is not None
    assert negative_zero[1] == -1 and positive_zero[0] == 0  # -0.0 and +0.0 themselves
    low, high = key_interval("0.125488")  # type: ignore[misc]
    from curate.models.safety import _from_sortable

    assert "%f" % _from_sortable(low) == "0.125488" != "%f" % _from_sortable(low - 1)  # noqa: UP031
    assert "%f" % _from_sortable(high) == "0.125488" != "%f" % _from_sortable(high + 1)  # noqa: UP031
    assert key_interval("nan") is not None and key_interval("-inf") is not None


def test_unzipped_folder_loads_the_same(tiny: tuple[TinySafety, Path], tmp_path: Path) -> None:
    model, path = tiny
    with zipfile.ZipFile(path) as archive:
        archive.extractall(tmp_path)
    inputs = probe_inputs(model, rows=8)
    from_zip = SafetyDetector.load(str(path)).network
    from_folder = SafetyDetector.load(str(tmp_path / "clip_autokeras_binary_nsfw")).network
    with torch.inference_mode():
        torch.testing.assert_close(from_folder(torch.from_numpy(inputs)), from_zip(torch.from_numpy(inputs)))


def _rezip(source: Path, target: Path, change) -> Path:  # type: ignore[no-untyped-def]
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)
    return target


@pytest.mark.parametrize(
    "case",
    ["not a zip", "truncated zip", "no variables", "truncated graph", "truncated data", "garbage index"],
)
def test_bad_files_give_a_weights_error_naming_the_option(
    tiny: tuple[TinySafety, Path], tmp_path: Path, case: str
) -> None:
    _, path = tiny
    bad = tmp_path / "bad.zip"
    if case == "not a zip":
        bad.write_bytes(b"<html>404</html>")
    elif case == "truncated zip":
        bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        cut = {
            "no variables": lambda n, d: None if "variables/" in n else d,
            "truncated graph": lambda n, d: d[: len(d) * 2 // 3] if n.endswith("saved_model.pb") else d,
            "truncated data": lambda n, d: d[:100] if ".data-" in n else d,
            "garbage index": lambda n, d: b"\x07" * len(d) if n.endswith(".index") else d,
        }[case]
        _rezip(path, bad, cut)
    with pytest.raises(WeightsError, match="--safety-weights") as caught:
        SafetyDetector.load(str(bad))
    assert str(bad) in str(caught.value)


def test_missing_local_file_and_wrong_sha256(tiny: tuple[TinySafety, Path], tmp_path: Path) -> None:
    _, path = tiny
    with pytest.raises(WeightsError, match="--safety-weights"):
        SafetyDetector.load(str(tmp_path / "nope.zip"))
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(path, cache / "clip_autokeras_binary_nsfw.zip")  # not the release: its sha256 differs from the pin
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(SAFETY, None, cache)


def test_snappy_blocks_with_back_references() -> None:
    assert savedmodel.snappy_decompress(b"\x0c\x08abc\x15\x03") == b"abcabcabcabc"
    with pytest.raises(ValueError):
        savedmodel.snappy_decompress(b"\x0c\x08abc\x15\x09")  # a copy from before the start


@pytest.mark.real_weights
def test_release_reproduces_the_keras_reference() -> None:
    """The real release against punsafe that Keras computed (bench/check_safety_keras.py --write-reference); opt-in,
    as CI cannot download the release: `CURATE_SAFETY_WEIGHTS=clip_autokeras_binary_nsfw.zip pytest -m real_weights`."""
    from bench.check_safety_keras import REFERENCE_COUNT, input_sets

    assert os.environ.get("CURATE_SAFETY_WEIGHTS"), "set CURATE_SAFETY_WEIGHTS to the release zip"
    reference = json.loads(REFERENCE.read_text())
    graph = read_safety_model(os.environ["CURATE_SAFETY_WEIGHTS"], SAFETY)
    network = SafetyNetwork(graph).eval()
    for name, inputs in input_sets(graph, reference["count"], reference["seed"]).items():
        with torch.inference_mode():
            ours = network(torch.from_numpy(inputs[:REFERENCE_COUNT].astype(np.float32))).numpy()
        np.testing.assert_allclose(ours, reference["sets"][name], atol=1e-6, rtol=0, err_msg=name)


@pytest.mark.parametrize("case", ["kernels that do not chain", "a table with a key twice"])
def test_a_model_of_another_shape_is_refused_naming_the_option(tmp_path: Path, case: str) -> None:
    model = tiny_safety()
    if case == "kernels that do not chain":
        kernel, bias, activation = model.layers[1]
        model.layers[1] = (np.zeros((kernel.shape[0] + 1, kernel.shape[1]), np.float32), bias, activation)
    else:
        keys, values, default = model.tables[3]
        model.tables[3] = ([*keys[:-1], keys[0]], values, default)
    path = write_tiny_safety(tmp_path / "odd.zip", model)
    with pytest.raises(WeightsError, match="--safety-weights"):
        SafetyDetector.load(str(path))
