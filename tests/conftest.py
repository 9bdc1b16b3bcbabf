"""Shared fixtures: a real HTTP server on 127.0.0.1 serving generated images, and LAION-schema corpora."""

from __future__ import annotations

import io
import logging
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.config import Config
from curate.stages.ingest import key_of
from curate.testing.server import ImageServer, Response


def make_jpeg(width: int, height: int, seed: int) -> bytes:
    """A distinct smooth random image (distinct pHash per seed)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def tar_samples(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    """Every sample of the tars: key -> extension -> bytes."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, _, extension = member.name.partition(".")
                handle = tar.extractfile(member)
                if handle is not None:
                    samples.setdefault(key, {})[extension] = handle.read()
    return samples


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer() as running:
        yield running


@dataclass
class Corpus:
    """A parquet file in the LAION schema and what the rules say should become of each row."""

    path: Path
    rows: list[dict[str, Any]]
    expected_kept: set[str] = field(default_factory=set)
    expected_reason: dict[int, str] = field(default_factory=dict)


def build_corpus(tmp_path: Path, server: ImageServer, n: int, seed: int = 0, min_size: int = 256,
                 threshold: float = 5.0) -> Corpus:
    """n rows: most good, plus every kind of drop the spine handles, with the expected fate of each row."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    expected: dict[int, str | None] = {}
    for i in range(n):
        width, height = int(rng.integers(260, 420)), int(rng.integers(260, 420))
        small = i % 11 == 3
        if small:
            width = 200
        path = f"/img/{seed}-{i}.jpg"
        server.routes[path] = Response(make_jpeg(width, height, seed * 100_000 + i))
        aesthetic = float(rng.uniform(4.0, 7.0))
        pwatermark = float(rng.uniform(0.0, 1.0))
        rows.append({"URL": server.url(path), "TEXT": f"caption {i}", "WIDTH": float(width * 2),  # metadata lies
                     "HEIGHT": float(height * 2), "AESTHETIC_SCORE": aesthetic, "pwatermark": pwatermark})
        reason = ("metadata_watermark" if pwatermark > 0.8 else "metadata_low_aesthetic" if aesthetic < threshold
                  else "low_resolution" if small else None)
        expected[i] = reason
    base = {"WIDTH": 1000.0, "HEIGHT": 1000.0, "AESTHETIC_SCORE": 6.0, "pwatermark": 0.1}
    extra = [
        ({"URL": server.url("/missing.jpg"), "TEXT": "gone"}, "http_error"),
        ({"URL": "ftp://example.com/a.jpg", "TEXT": "ftp"}, "invalid_url"),
        ({"URL": server.url("/img/x.jpg"), "TEXT": "  "}, "empty_caption"),
        ({"URL": server.url("/not-image.jpg"), "TEXT": "html"}, "decode_failed"),
        ({"URL": server.url("/truncated.jpg"), "TEXT": "truncated"}, "decode_failed"),
        ({"URL": server.url("/copy.jpg"), "TEXT": "same bytes elsewhere"}, "duplicate_exact"),
        ({"URL": server.url("/resized.jpg"), "TEXT": "same picture smaller"}, "duplicate_phash"),
        ({"URL": server.url("/small-meta.jpg"), "TEXT": "metadata says small", "WIDTH": 100.0},
         "metadata_low_resolution"),
    ]
    server.routes["/not-image.jpg"] = Response(b"<html>nope</html>", headers={"Content-Type": "text/html"})
    server.routes["/truncated.jpg"] = Response(make_jpeg(400, 400, 999_999)[:600])
    good = next(i for i in range(n) if expected[i] is None)
    server.routes["/copy.jpg"] = server.routes[f"/img/{seed}-{good}.jpg"]
    image = Image.open(io.BytesIO(server.routes[f"/img/{seed}-{good}.jpg"].body))
    resized = io.BytesIO()
    image.resize((image.width - 3, image.height - 3), Image.Resampling.LANCZOS).save(resized, "JPEG", quality=80)
    server.routes["/resized.jpg"] = Response(resized.getvalue())
    for row, reason in extra:
        expected[len(rows)] = reason
        rows.append({**base, **row})
    # The survivor of the duplicates must be the original: give it the top aesthetic score.
    rows[good]["AESTHETIC_SCORE"] = 6.99
    expected[len(rows)] = "duplicate_url"
    rows.append(dict(rows[good]))
    path = tmp_path / "sample.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    corpus = Corpus(path, rows)
    for index, reason in expected.items():
        if reason is None:
            corpus.expected_kept.add(key_of(rows[index]["URL"], rows[index]["TEXT"]))
        else:
            corpus.expected_reason[index] = reason
    return corpus


@pytest.fixture
def corpus_factory(tmp_path: Path, server: ImageServer):
    return lambda n=100, seed=0: build_corpus(tmp_path, server, n, seed)


def small_config(**changes: Any) -> Config:
    values: dict[str, Any] = dict(scores="metadata", world_size=4, workers_per_rank=2, min_size=256,
                                  allow_private_network=True, threads=8, image_size=256, timeout=30.0)
    values.update(changes)
    return Config(**values).validate()


@pytest.fixture
def config_factory():
    return small_config


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (the S3 REST API over HTTP, nothing mocked in-process), with fake credentials;
    botocore, so s3fs, reads the endpoint from AWS_ENDPOINT_URL, and download workers and subprocesses inherit it."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            patch.setenv(name, value)
        yield endpoint
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the moto server."""
    import fsspec

    name = f"curate-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(name)
    return name


@pytest.fixture(scope="session")
def img2dataset_shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real img2dataset output in its webdataset, files and parquet formats (one img2dataset process for the session:
    the local and the Spark tests read the same folders)."""
    from tests.test_img2dataset_shapes import img2dataset_outputs

    return img2dataset_outputs(tmp_path_factory.mktemp("img2dataset"))
