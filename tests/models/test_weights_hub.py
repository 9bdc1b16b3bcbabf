"""Official weights on the Hugging Face hub: one short try when the hub is unreachable, HF_HUB_OFFLINE respected.

The hub is a server on 127.0.0.1 (or a closed port there): the tests never reach the internet.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from curate.models import weights
from curate.models.weights import Source, WeightsError, WeightSpec, resolve_weights

BODY = b"weights" * 100
SPEC = WeightSpec("hub weight", "--clip-weights", (Source("hf", "w.bin", hub_repo="org/model"),))


def point_hub_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """What HF_ENDPOINT does when set before huggingface_hub is imported."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")


class _Hub(BaseHTTPRequestHandler):
    """Answers HEAD and GET for org/model's w.bin with the headers hf_hub_download needs."""

    def _headers(self) -> bool:
        found = self.path == "/org/model/resolve/main/w.bin"
        self.send_response(200 if found else 404)
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("ETag", '"w-bin"')
        self.send_header("Content-Length", str(len(BODY) if found else 0))
        self.end_headers()
        return found

    def do_HEAD(self) -> None:  # noqa: N802 - the name http.server calls
        self._headers()

    def do_GET(self) -> None:  # noqa: N802
        if self._headers():
            self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


@pytest.fixture()
def unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}")


def test_weights_on_the_hub_download_into_the_cache(tmp_path: Path, hub: None) -> None:
    path = resolve_weights(SPEC, None, tmp_path / "cache")
    assert path == tmp_path / "cache" / "hub" / "org--model" / "w.bin" and path.read_bytes() == BODY


def test_an_unreachable_hub_fails_at_once_with_one_message(tmp_path: Path, unreachable_hub: None,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(WeightsError) as caught:
        resolve_weights(SPEC, None, tmp_path / "cache")
    assert time.monotonic() - started < 5  # hf_hub_download alone retries for ~25 s
    assert "--clip-weights" in str(caught.value)
    assert [r.name for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert len([r for r in caplog.records if "hub weight" in r.getMessage()]) == 1  # the one "downloading" line


def test_hf_hub_offline_downloads_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("downloaded although HF_HUB_OFFLINE is set")

    monkeypatch.setattr(weights, "_download_url", refuse)
    monkeypatch.setattr(weights, "_download_hub", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as caught:
        resolve_weights(SPEC, None, tmp_path / "cache")
    assert "HF_HUB_OFFLINE" in str(caught.value) and "--clip-weights PATH" in str(caught.value)
