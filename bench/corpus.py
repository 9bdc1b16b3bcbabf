"""The benchmark corpus: distinct generated JPEGs of 200 KB–2 MB cached on disk, LAION-schema parquet rows that
point at them, and a threaded HTTP server on 127.0.0.1 that serves them, with some 404s and slow answers."""

from __future__ import annotations

import io
import math
import multiprocessing
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from bench.common import WORK

IMAGES = WORK / "images-v1"  # bump the suffix when the generator changes
FIELD_SIDE = 2048
MIN_BYTES, MAX_BYTES = 200_000, 2_000_000
BYTES_PER_PIXEL = 1.5  # what quality 100 makes of the generator's noise, measured
MISSING_EVERY, SLOW_EVERY = 29, 37  # ~3.4% of rows answer 404, ~2.7% answer after 0.2-1.0 s
WORDS = ("a photo of", "a painting of", "close-up of", "landscape with", "portrait of", "vintage poster of")
THINGS = ("a cat", "the sea", "mountains", "a coffee cup", "an astronaut", "a rocket", "flowers", "a city at night")
_ROUTE = re.compile(r"^/(img|slow|missing)/(\d+)(?:/(\d+))?\.jpg$")
_field: np.ndarray | None = None


def image_size(index: int) -> tuple[int, int]:
    """Width and height of image `index`: bytes skewed toward the small end of 200 KB–2 MB, as on the web."""
    rng = np.random.default_rng([7, index])
    target = MIN_BYTES * 10 ** (rng.random() ** 2 * math.log10(MAX_BYTES / MIN_BYTES))
    aspect = rng.uniform(0.75, 1.4)
    pixels = target / BYTES_PER_PIXEL
    return max(256, int(math.sqrt(pixels * aspect))), max(256, int(math.sqrt(pixels / aspect)))


def generated_jpeg(index: int) -> bytes:
    """A coarse colour field (its own pHash) over a crop of shared noise (the bytes of a detailed photo)."""
    global _field
    if _field is None:
        _field = np.random.default_rng(1).integers(0, 128, size=(FIELD_SIDE, FIELD_SIDE, 3), dtype=np.uint8)
    width, height = image_size(index)
    width, height = min(width, FIELD_SIDE), min(height, FIELD_SIDE)
    rng = np.random.default_rng([11, index])
    x, y = int(rng.integers(0, FIELD_SIDE - width + 1)), int(rng.integers(0, FIELD_SIDE - height + 1))
    coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR))
    pixels = (base >> 1) + _field[y:y + height, x:x + width]
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=100)
    return buffer.getvalue()


def _write_image(index: int) -> None:
    path = image_path(index)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(generated_jpeg(index))
    tmp.replace(path)


def image_path(index: int) -> Path:
    return IMAGES / f"{index:05d}.jpg"


def _generate(folder: Path, indices: Iterable[int], path_of: Callable[[int], Path], write: Callable[[int], None],
              processes: int, chunksize: int = 32) -> float:
    """Write the cached images of these indices that are missing, in a process pool; returns the seconds it took."""
    folder.mkdir(parents=True, exist_ok=True)
    missing = [i for i in indices if not path_of(i).exists()]
    started = time.perf_counter()
    if missing:
        print(f"generating {len(missing)} images under {folder} (cached for later runs)", flush=True)
        with ProcessPoolExecutor(processes) as pool:
            list(pool.map(write, missing, chunksize=chunksize))
    return time.perf_counter() - started


def ensure_images(count: int, processes: int = 2) -> float:
    """Generate the images 0..count-1 that are not cached yet; returns the seconds it took."""
    return _generate(IMAGES, range(count), image_path, _write_image, processes)


def route(row: int) -> str:
    """The URL path of row `row`: its image, a slow answer of its image, or a 404."""
    if row % MISSING_EVERY == MISSING_EVERY - 1:
        return f"/missing/{row}.jpg"
    if row % SLOW_EVERY == SLOW_EVERY - 1:
        return f"/slow/{200 + (row * 7919) % 800}/{row}.jpg"
    return f"/img/{row}.jpg"


def corpus_table(rows: int, base_url: str) -> pa.Table:
    """LAION-schema metadata; about a third of the rows fail the metadata thresholds (score, watermark)."""
    rng = np.random.default_rng([3, rows])
    sizes = [image_size(i) for i in range(rows)]
    return pa.table({
        "URL": [base_url + route(i) for i in range(rows)],
        "TEXT": [f"{WORDS[i % len(WORDS)]} {THINGS[(i // 6) % len(THINGS)]} #{i}" for i in range(rows)],
        "WIDTH": pa.array([float(w) for w, _ in sizes]),
        "HEIGHT": pa.array([float(h) for _, h in sizes]),
        "AESTHETIC_SCORE": rng.uniform(4.0, 7.5, rows),
        "pwatermark": rng.beta(0.6, 2.0, rows),
        "punsafe": rng.beta(0.5, 8, rows),
        "similarity": rng.uniform(0.25, 0.4, rows),
    })


def write_corpus(rows: int, base_url: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(corpus_table(rows, base_url), path)
    return path


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        match = _ROUTE.match(self.path)
        if match is None or match.group(1) == "missing":
            self.send_error(404)
            return
        if match.group(1) == "slow":
            time.sleep(int(match.group(2)) / 1000)
        path = image_path(int(match.group(3) or match.group(2)))
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed below, after sendfile
        except FileNotFoundError:
            self.send_error(404)
            return
        with source:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            try:
                self.connection.sendfile(source)  # the kernel copies: the server costs the clients little CPU
            except (BrokenPipeError, ConnectionResetError):
                pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - silence per-request logging
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops SYNs from 32 clients: 1 s retransmits


class CorpusServer:
    """`with CorpusServer() as server: server.base_url` serves the cached images on 127.0.0.1 from a child process,
    so the server never holds the harness's GIL and forked pipeline workers never inherit its threads."""

    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.process = multiprocessing.get_context("fork").Process(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> CorpusServer:
        self.process.start()
        self.httpd.socket.close()  # the child listens; the harness keeps only the address
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join()


# The scale corpus (bench_scale): N rows of which a fixed few pass the metadata prefilter; generated in chunks.
SCALE_DEAD_HOST = "http://127.0.0.1:9"  # nothing listens on port 9; prefilter drops these rows before download
SCALE_MIN_SIDE = 512  # curate run's default --min-size: live rows' images are at least this large
SCALE_REPEAT_EVERY = 20  # 5 % of the rows repeat an earlier row's url+caption
SCALE_CHUNK_ROWS = 500_000  # rows generated and written at a time (one row group)
_GOLDEN, _MASK64 = 0x9E3779B97F4A7C15, (1 << 64) - 1
SCALE_SCHEMA = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.float64()),
                          ("HEIGHT", pa.float64()), ("similarity", pa.float64()), ("punsafe", pa.float64()),
                          ("pwatermark", pa.float64()), ("AESTHETIC_SCORE", pa.float64())])


def _mix(rows: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of each row number: a random number any chunk can compute for any row, earlier chunks' too."""
    z = rows.astype(np.uint64) + np.uint64((seed + 1) * _GOLDEN & _MASK64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def live_images(count: int) -> list[int]:
    """The first `count` image indices whose shorter side passes SCALE_MIN_SIDE (about 40 % of them do)."""
    found: list[int] = []
    index = 0
    while len(found) < count:
        if min(image_size(index)) >= SCALE_MIN_SIDE:
            found.append(index)
        index += 1
    return found


def ensure_images_at(indices: list[int], processes: int = 2) -> float:
    """Generate the images of these indices that are not cached yet; returns the seconds it took."""
    return _generate(IMAGES, indices, image_path, _write_image, processes)


class ScaleLayout:
    """Which rows are live (a fixed set), which repeat an earlier row, and the url and caption of any row."""

    def __init__(self, rows: int, live: int, seed: int, base_url: str) -> None:
        if rows < 2 * live:
            raise ValueError(f"a scale corpus of {rows} rows cannot hold {live} live rows; give at least {2 * live}")
        self.rows, self.seed = rows, seed
        self.live_rows = np.sort(np.random.default_rng([seed, rows, live]).choice(rows, live, replace=False))
        images = live_images(live)
        self.live_urls = pa.array([f"{base_url}/img/{i}.jpg" for i in images])
        self.live_sizes = np.array([image_size(i) for i in images], dtype=np.float64)

    def live_rank(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(is live, index into the live rows) of each row."""
        rank = np.minimum(np.searchsorted(self.live_rows, rows), len(self.live_rows) - 1)
        return self.live_rows[rank] == rows, rank

    def is_repeat(self, rows: np.ndarray) -> np.ndarray:
        repeat = (_mix(rows, self.seed) % np.uint64(SCALE_REPEAT_EVERY) == 0) & (rows != 0)
        return repeat & ~self.live_rank(rows)[0]

    def sources(self, rows: np.ndarray) -> np.ndarray:
        """The row each row takes its url and caption from: itself, or for a repeat a random earlier non-repeat."""
        source = rows.copy()
        repeat = self.is_repeat(rows)
        source[repeat] = (_mix(rows[repeat], self.seed + 1) % rows[repeat].astype(np.uint64)).astype(np.int64)
        while (chained := self.is_repeat(source) & repeat).any():  # row 0 is never a repeat: this ends
            source[chained] -= 1
        return source

    def urls(self, rows: np.ndarray) -> pa.Array:
        live, rank = self.live_rank(rows)
        dead = pc.binary_join_element_wise(SCALE_DEAD_HOST + "/", pc.cast(pa.array(rows), pa.string()), ".jpg", "")
        return pc.if_else(pa.array(live), self.live_urls.take(pa.array(rank)), dead)

    def captions(self, rows: np.ndarray) -> pa.Array:
        words = pa.array(WORDS).take(pa.array(rows % len(WORDS)))
        things = pa.array(THINGS).take(pa.array((_mix(rows, self.seed + 2) % np.uint64(len(THINGS))).astype(np.int64)))
        number = pc.binary_join_element_wise("#", pc.cast(pa.array(rows), pa.string()), "")
        return pc.binary_join_element_wise(words, things, number, " ")


def scale_chunk(layout: ScaleLayout, start: int, stop: int) -> pa.Table:
    """Rows start..stop-1: dead rows fail one metadata check each (aesthetic, size or watermark), repeats and live
    rows pass them all (repeats are dropped as duplicate_url), live rows carry their image's true size."""
    rows = np.arange(start, stop, dtype=np.int64)
    count = stop - start
    rng = np.random.default_rng([layout.seed, layout.rows, start])
    live, rank = layout.live_rank(rows)
    dead = ~live & ~layout.is_repeat(rows)
    reason = np.where(dead, (_mix(rows, layout.seed + 3) % np.uint64(3)).astype(np.int64), -1)
    width, height = rng.integers(512, 2048, count).astype(np.float64), rng.integers(512, 2048, count).astype(np.float64)
    small = reason == 1
    height[small] = rng.integers(64, SCALE_MIN_SIDE, int(small.sum()))
    width[live], height[live] = layout.live_sizes[rank[live], 0], layout.live_sizes[rank[live], 1]
    aesthetic = np.where(reason == 0, rng.uniform(3.0, 4.9, count), rng.uniform(5.0, 8.0, count))
    watermark = np.where(reason == 2, rng.uniform(0.85, 1.0, count), rng.beta(0.6, 2.0, count) * 0.75)
    sources = layout.sources(rows)
    return pa.Table.from_pydict({
        "URL": layout.urls(sources),
        "TEXT": layout.captions(sources),
        "WIDTH": width,
        "HEIGHT": height,
        "similarity": rng.uniform(0.28, 0.4, count),
        "punsafe": rng.beta(0.5, 8.0, count),
        "pwatermark": watermark,
        "AESTHETIC_SCORE": aesthetic,
    }, schema=SCALE_SCHEMA)


def write_scale_corpus(rows: int, live: int, seed: int, base_url: str, path: Path) -> float:
    """The scale corpus at path (kept when already there: the path names rows, live, seed and port); returns the
    seconds it took to write, 0 when cached. Memory is bounded by one chunk."""
    if path.exists():
        return 0.0
    started = time.perf_counter()
    layout = ScaleLayout(rows, live, seed, base_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(temporary, SCALE_SCHEMA) as writer:
        for start in range(0, rows, SCALE_CHUNK_ROWS):
            writer.write_table(scale_chunk(layout, start, min(rows, start + SCALE_CHUNK_ROWS)),
                               row_group_size=SCALE_CHUNK_ROWS)
    temporary.replace(path)
    return time.perf_counter() - started


class PinnedCorpusServer(CorpusServer):
    """CorpusServer on a chosen port when it is free (else any port), so a cached corpus's URLs stay valid."""

    def __init__(self, port: int) -> None:
        try:
            self.httpd = _Server(("127.0.0.1", port), _Handler)
        except OSError:
            self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.process = multiprocessing.get_context("fork").Process(target=self.httpd.serve_forever, daemon=True)


# The LAION-like corpus (issue 17): photo-like JPEGs of 512-2,000 px (median shorter side ~800), quality 75-95,
# served by several origins (as a part of LAION has many hosts), so --max-per-host bounds each as it would there.
LAIONLIKE_IMAGES = WORK / "laionlike-v1"  # bump the suffix when the generator changes
LAIONLIKE_ORIGINS = 8


def laionlike_size(index: int) -> tuple[int, int]:
    """Width and height: shorter side log-normal around 800 px within 512-2,000, aspect 3:4 to 3:2 either way."""
    rng = np.random.default_rng([17, index])
    short = int(np.clip(800 * math.exp(rng.normal(0.0, 0.3)), 512, 2000))
    long = min(2000, int(short * rng.uniform(1.0, 1.5)))
    return (long, short) if rng.random() < 0.6 else (short, long)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth light and colour, a few hard-edged shapes and a fine grain: how a photo's JPEG spends its bytes."""
    from PIL import ImageDraw

    rng = np.random.default_rng([19, seed])
    image = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((width, height),
                                                                                   Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(4, 12))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 20, width // 3)), int(rng.integers(height // 20, height // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=colour)
    grain = Image.effect_noise((width, height), float(rng.uniform(20, 50))).convert("RGB")
    return Image.blend(image, grain, 0.22)


def laionlike_jpeg(index: int) -> bytes:
    width, height = laionlike_size(index)
    quality = int(np.random.default_rng([23, index]).integers(75, 96))
    buffer = io.BytesIO()
    photo_like(width, height, index).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def laionlike_path(index: int) -> Path:
    return LAIONLIKE_IMAGES / f"{index:05d}.jpg"


def _write_laionlike(index: int) -> None:
    path = laionlike_path(index)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(laionlike_jpeg(index))
    tmp.replace(path)


def ensure_laionlike_images(count: int, processes: int = 2) -> float:
    """Generate the LAION-like images 0..count-1 not cached yet; returns the seconds it took."""
    return _generate(LAIONLIKE_IMAGES, range(count), laionlike_path, _write_laionlike, processes, chunksize=16)


def laionlike_corpus_table(rows: int, base_urls: list[str]) -> pa.Table:
    """The bench corpus's rows, each URL on one of base_urls in turn, with the LAION-like images' sizes."""
    table = corpus_table(rows, "")
    sizes = [laionlike_size(i) for i in range(rows)]
    urls = [base_urls[i % len(base_urls)] + path for i, path in enumerate(table["URL"].to_pylist())]
    table = table.set_column(0, "URL", pa.array(urls))
    table = table.set_column(2, "WIDTH", pa.array([float(w) for w, _ in sizes]))
    return table.set_column(3, "HEIGHT", pa.array([float(h) for _, h in sizes]))


class _LaionlikeHandler(_Handler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        match = _ROUTE.match(self.path)
        if match is None or match.group(1) == "missing":
            self.send_error(404)
            return
        if match.group(1) == "slow":
            time.sleep(int(match.group(2)) / 1000)
        path = laionlike_path(int(match.group(3) or match.group(2)))
        body = path.read_bytes() if path.exists() else None
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _serve_all(servers: list[ThreadingHTTPServer]) -> None:
    import threading

    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[0].serve_forever()


class LaionlikeServer:
    """`with LaionlikeServer() as server: server.base_urls`: LAIONLIKE_ORIGINS origins on 127.0.0.1, one child."""

    def __init__(self, origins: int = LAIONLIKE_ORIGINS) -> None:
        self.servers = [_Server(("127.0.0.1", 0), _LaionlikeHandler) for _ in range(origins)]
        self.process = multiprocessing.get_context("fork").Process(target=_serve_all, args=(self.servers,),
                                                                   daemon=True)

    @property
    def base_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{server.server_address[1]}" for server in self.servers]

    def __enter__(self) -> LaionlikeServer:
        self.process.start()
        for server in self.servers:
            server.socket.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.join()
