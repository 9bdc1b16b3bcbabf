"""`curate demo`: a LAION-schema sample of real and generated photos served from 127.0.0.1, then `curate run`."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from curate.config import Config
from curate.executors.local.engine import Progress
from curate.testing.server import ImageServer, Response

WORDS = ("a photo of", "a painting of", "close-up of", "landscape with", "portrait of", "vintage poster of")
THINGS = ("a cat", "the sea", "mountains", "a coffee cup", "an astronaut", "a rocket", "flowers", "a city at night")


def real_photos() -> list[np.ndarray]:
    """The real photographs scikit-image and scikit-learn ship with their packages."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        photos = [getattr(data, n)() for n in ("astronaut", "coffee", "rocket", "hubble_deep_field", "chelsea",
                                               "immunohistochemistry", "retina", "camera")]
    photos += [load_sample_image(n) for n in ("china.jpg", "flower.jpg")]
    return [np.stack([p] * 3, axis=-1) if p.ndim == 2 else p for p in photos]


def generated_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random field with a few shapes: compresses like a photo, different every time."""
    coarse = rng.integers(0, 256, size=(4 + rng.integers(0, 6), 4 + rng.integers(0, 6), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def sample_rows(rows: int, seed: int = 0) -> tuple[dict[str, Response], list[dict[str, Any]]]:
    """(routes, metadata rows) with every kind of drop represented; URLs are paths until served."""
    rng = np.random.default_rng(seed)
    photos, routes, table = real_photos(), {}, []
    for i in range(rows):
        kind = rng.choice(["photo", "generated", "generated", "generated"])
        short = int(rng.choice([256, 384, 600, 768, 1024, 1400]))
        width, height = (int(short * rng.uniform(1.0, 1.6)), short) if rng.random() < 0.5 else (short, int(short * 1.3))
        if kind == "photo":
            photo = photos[i % len(photos)]
            image = Image.fromarray(photo).resize((width, height), Image.Resampling.LANCZOS)
        else:
            image = generated_image(rng, width, height)
        path = f"/img/{i:05d}.jpg"
        routes[path] = Response(jpeg(image))
        claimed = (width, height) if rng.random() > 0.1 else (width * 2, height * 2)  # some metadata lies
        table.append({"URL": path, "TEXT": f"{rng.choice(WORDS)} {rng.choice(THINGS)} #{i}",
                      "WIDTH": float(claimed[0]), "HEIGHT": float(claimed[1]),
                      "AESTHETIC_SCORE": float(rng.uniform(4.0, 7.5)), "pwatermark": float(rng.beta(0.6, 2.0)),
                      "punsafe": float(rng.beta(0.5, 4)), "similarity": float(rng.uniform(0.25, 0.4)),
                      "LICENSE": "?", "LANGUAGE": "en"})
    add_hostile_rows(routes, table, rng)
    return routes, table


def add_hostile_rows(routes: dict[str, Response], table: list[dict[str, Any]], rng: np.random.Generator) -> None:
    """Broken URLs, copies and bad bodies, so the funnel shows every kind of drop."""
    base = dict(table[0])
    copies = [dict(table[i], URL=f"/copy/{i}.jpg") for i in range(0, 40, 4)]  # same bytes, other URL
    for row in copies:
        routes[row["URL"]] = routes[f"/img/{int(row['URL'].split('/')[2][:-4]):05d}.jpg"]
    table += copies
    table += [dict(table[i]) for i in range(1, 30, 7)]  # exact url+caption repeats
    table += [dict(base, URL=f"/missing/{i}.jpg", TEXT=f"gone #{i}") for i in range(8)]  # 404
    table += [dict(base, URL="ftp://example.com/a.jpg", TEXT="wrong scheme"), dict(base, URL="/img/blank", TEXT="")]
    routes["/html.jpg"] = Response(b"<html>not an image</html>", headers={"Content-Type": "text/html"})
    routes["/truncated.jpg"] = Response(routes["/img/00001.jpg"].body[:2000])
    routes["/noai.jpg"] = Response(routes["/img/00002.jpg"].body, headers={"X-Robots-Tag": "noindex, noai"})
    table += [dict(base, URL=p, TEXT=f"bad body {p}") for p in ("/html.jpg", "/truncated.jpg", "/noai.jpg")]


def write_sample(path: Path, rows: list[dict[str, Any]], server: ImageServer) -> None:
    served = [dict(r, URL=server.url(r["URL"]) if r["URL"].startswith("/") else r["URL"]) for r in rows]
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(served), path)


def run_demo(output: str | Path, rows: int = 400, progress: Progress | None = None) -> dict[str, Any]:
    from curate.pipeline.run import run_local

    output = Path(output)
    routes, table = sample_rows(rows)
    with ImageServer(routes) as server:
        sample = output.parent / f"{output.name}-sample.parquet"
        write_sample(sample, table, server)
        config = Config(scores="metadata", world_size=8, workers_per_rank=1, allow_private_network=True,
                        max_unsafe=0.5, threads=16).validate()
        if output.exists():
            import shutil

            shutil.rmtree(output)  # the server's port changes each time, so the sample (and the run) is new
        return run_local([str(sample)], output, config, progress)
