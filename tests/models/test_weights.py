"""Weight resolution: local paths, URLs into the cache, the official source, sha256 pins, safe loading."""

from __future__ import annotations

import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from curate.models import weights
from curate.models.aesthetic import AESTHETIC_V2
from curate.models.weights import Source, WeightsError, WeightSpec, load_state_dict, resolve_weights, sha256_of

SPEC = WeightSpec(name="test weight", option="--test-weights")


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(weights, "_download_url", refuse)
    monkeypatch.setattr(weights, "_download_hub", refuse)


@pytest.fixture()
def http_root(tmp_path: Path) -> tuple[str, Path]:
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


def test_missing_local_file_names_weight_path_and_option(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError) as caught:
        resolve_weights(AESTHETIC_V2, missing, tmp_path / "cache")
    message = str(caught.value)
    assert "aesthetic predictor v2" in message and str(missing) in message and "--aesthetic-weights" in message


def test_failed_download_names_cache_and_option(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(WeightsError) as caught:
        resolve_weights(AESTHETIC_V2, None, tmp_path / "cache")
    message = str(caught.value)
    assert str(tmp_path / "cache" / "sac+logos+ava1-l14-linearMSE.pth") in message
    assert "--aesthetic-weights" in message and "network disabled" in message


def test_cached_official_file_with_wrong_sha256_raises(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"not the published weights")
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(AESTHETIC_V2, None, cache)


def test_cached_official_file_with_pinned_sha256_resolves(tmp_path: Path, no_network: None) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    content = tmp_path / "w.pth"
    torch.save({"weight": torch.ones(2)}, content)
    spec = WeightSpec("pinned", "--pinned", (Source("https://example.invalid/w.pth", "w.pth", sha256_of(content)),))
    (cache / "w.pth").write_bytes(content.read_bytes())
    assert resolve_weights(spec, None, cache) == cache / "w.pth"


def test_url_downloads_into_cache_then_reuses_it(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, root = http_root
    torch.save({"weight": torch.arange(3.0)}, root / "head.pth")
    cache = tmp_path / "cache"
    path = resolve_weights(SPEC, f"{base}/head.pth", cache)
    assert path == cache / "head.pth"
    assert torch.equal(load_state_dict(path, SPEC)["weight"], torch.arange(3.0))
    (root / "head.pth").unlink()
    assert resolve_weights(SPEC, f"{base}/head.pth", cache) == path
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_download_with_wrong_sha256_raises(tmp_path: Path, http_root: tuple[str, Path]) -> None:
    base, root = http_root
    (root / "w.pth").write_bytes(b"tampered")
    spec = WeightSpec("pinned", "--pinned", (Source(f"{base}/w.pth", "w.pth", sha256="0" * 64),))
    with pytest.raises(WeightsError, match="sha256"):
        resolve_weights(spec, None, tmp_path / "cache")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "object": SPEC}, path)
    with pytest.raises(WeightsError, match="weights-only"):
        load_state_dict(path, SPEC)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_loads_only_when_its_sha256_is_pinned(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    with pytest.raises(WeightsError, match="TorchScript"):
        load_state_dict(path, SPEC)
    pinned = WeightSpec("pinned", "--pinned", (Source("https://example.invalid/s.pt", "s.pt", sha256_of(path)),))
    assert set(load_state_dict(path, pinned)) == {"weight", "bias"}


def test_safetensors_file_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(2, 2)}, str(path))
    assert torch.equal(load_state_dict(path, SPEC)["weight"], torch.ones(2, 2))
