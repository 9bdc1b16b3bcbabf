"""Shared pieces of the hostile-input tests: small images, a served corpus, a run with tight limits."""

from __future__ import annotations

import io
import socket
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import Config
from curate.net import fetch
from curate.pipeline.run import run_local
from curate.testing.server import ImageServer, Response

TIMEOUT = 1.5  # seconds per URL: small, so the stalling servers cost little
ORIGIN_FILES = ["/robots.txt", "/.well-known/tdmrep.json"]  # what a run asks an origin first, once


def picture(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB image: distinct per seed, so no two test images are perceptual duplicates."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(seed: int = 0, width: int = 96, height: int = 64) -> bytes:
    return encode(picture(width, height, seed))


def _png(width: int, height: int, depth: int, colour_type: int, data: bytes) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb as far as the header goes)."""
    return _png(width, height, 8, 2, b"\0" * 64)


def png_rgba16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGBA PNG (Pillow cannot write one) from a uint16 [height, width, 4] array."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + line.astype(">u2").tobytes() for line in pixels)
    return _png(width, height, 16, 6, rows)


def row(url: str | None, caption: str | None = "a caption", **extra: Any) -> dict[str, Any]:
    """A LAION-schema row that passes every metadata threshold unless told otherwise."""
    return {"URL": url, "TEXT": caption, "WIDTH": 96.0, "HEIGHT": 64.0, "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1,
            **extra}


def hostile_config(**changes: Any) -> Config:
    """Everything that survives lands in one shard; no perceptual or content dedup between the test images."""
    values: dict[str, Any] = dict(scores="metadata", world_size=1, workers_per_rank=1, min_size=1, threads=8,
                                  timeout=TIMEOUT, allow_private_network=True, dedup=["url"], image_size=64,
                                  batch_size_rows=1000)
    values.update(changes)
    return Config(**values).validate()


def write_rows(path: Path, rows: list[dict[str, Any]], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def run_rows(tmp_path: Path, rows: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    """Run the pipeline on rows; returns stats, ledger and samples, each ledger row findable by its caption."""
    sample = write_rows(tmp_path / "input.parquet", rows)
    out = tmp_path / "out"
    stats = run_local([str(sample)], out, hostile_config(**changes))
    ledger, samples = pq.read_table(out / "ledger.parquet"), pq.read_table(out / "samples.parquet")
    assert stats["input_rows"] == len(rows) == samples.num_rows + ledger.num_rows  # input = kept + dropped
    return {"stats": stats, "ledger": ledger, "samples": samples, "out": out}


def outcomes(result: dict[str, Any], rows: list[dict[str, Any]]) -> dict[int, str]:
    """Input row number -> `kept` or the ledger reason."""
    found = {r["row"]: r["reason"] for r in result["ledger"].to_pylist()}
    found.update({r: "kept" for r in result["samples"]["row"].to_pylist()})
    return {i: found[i] for i in range(len(rows))}


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer() as running:
        yield running


@pytest.fixture
def requests_seen(server: ImageServer) -> list[str]:
    """Paths the server was asked for, in order."""
    seen: list[str] = []

    class Counting(dict):
        def get(self, key: str, default: Any = None) -> Any:
            seen.append(key)
            return super().get(key, default)

    counting = Counting(server.routes)
    server.httpd.RequestHandlerClass.routes = counting  # type: ignore[attr-defined]
    server.routes = counting
    return seen


@pytest.fixture
def fake_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Host names -> addresses, answered before the real resolver (the tests have no internet)."""
    names: dict[str, str] = {}
    real = socket.getaddrinfo

    def lookup(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host in names:
            return real(names[host], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    return names


@pytest.fixture
def loopback_is_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.1 (the test server) as a public address, so the address checks stay on for everything else."""
    real = fetch._blocked
    monkeypatch.setattr(fetch, "_blocked", lambda address: address != "127.0.0.1" and real(address))


def serve(server: ImageServer, path: str, response: Response) -> str:
    server.routes[path] = response
    return server.url(path)
