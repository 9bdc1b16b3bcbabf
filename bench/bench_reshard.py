"""`make bench-reshard`: curate on img2dataset-format tars against the script a user would otherwise write.

The input: img2dataset's webdataset layout (KEY.jpg, KEY.txt, KEY.json with its fields and LAION's scores passed
through, one NNNNN.parquet per shard) of photo-like JPEGs, 512 px and more on the shorter side. A third fail the
recipe on their metadata (aesthetic < 5.0 or watermark > 0.8).
- curate: `curate run TARS --scores metadata` (thresholds from the json, every image checked, pHash and sha256,
  dedup, equal shards, books, report), in a fresh process.
- hand-rolled: `webdataset.WebDataset(tars).decode("pil")` to check every image, the same thresholds from the json,
  `webdataset.TarWriter` writing the kept samples back, in a fresh process.
Images/s over the input samples, interleaved rounds, median and spread; the ratio merges into latest.json as
reshard_ratio_vs_handrolled.

    .venv/bin/python -m bench.bench_reshard [--rows 2000] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bench.common import WORK, Series, bench_main, interleaved, tool, wall
from bench.corpus import ensure_images_at, image_path, live_images

SHARD_SAMPLES = 500
HANDROLLED = '''
import json, sys, webdataset as wds
tars, out = sys.argv[1:-1], sys.argv[-1]
kept = 0
with wds.TarWriter(out) as sink:
    for sample in wds.WebDataset(tars, shardshuffle=False).decode("pil"):
        meta = sample["json"]
        image = sample["jpg"]
        if min(image.size) < 512 or meta["AESTHETIC_SCORE"] < 5.0 or meta["pwatermark"] > 0.8:
            continue
        sink.write({"__key__": sample["__key__"], "jpg": image, "txt": sample["txt"], "json": meta})
        kept += 1
print(kept)
'''


def write_input(rows: int, folder: Path) -> list[Path]:
    """img2dataset's webdataset output for `rows` cached bench images (made once, reused)."""
    marker = folder / f".complete-{rows}"
    if marker.exists():
        return sorted(folder.glob("*.tar"))
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    indices = live_images(rows)
    ensure_images_at(indices)
    rng = np.random.default_rng(5)
    for shard in range(0, rows, SHARD_SAMPLES):
        records = []
        with tarfile.open(folder / f"{shard // SHARD_SAMPLES:05d}.tar", "w") as tar:
            for offset, index in enumerate(indices[shard:shard + SHARD_SAMPLES]):
                key = f"{shard // SHARD_SAMPLES:05d}{offset:04d}"
                body = image_path(index).read_bytes()
                with Image.open(io.BytesIO(body)) as image:
                    width, height = image.size
                meta = {"url": f"https://example.com/{index}.jpg", "caption": f"a photo, number {index}", "key": key,
                        "status": "success", "error_message": None, "width": width, "height": height,
                        "original_width": width, "original_height": height,
                        "AESTHETIC_SCORE": float(rng.uniform(4.0, 7.5)), "pwatermark": float(rng.beta(0.6, 2.0))}
                for extension, payload in (("jpg", body), ("txt", meta["caption"].encode()),
                                           ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                records.append(meta)
        pq.write_table(pa.Table.from_pylist(records), folder / f"{shard // SHARD_SAMPLES:05d}.parquet")
    marker.touch()
    return sorted(folder.glob("*.tar"))


def measure(rows: int, repeats: int) -> dict[str, Any]:
    work = WORK / "reshard"
    tars = write_input(rows, work / "input")
    script = work / "handrolled.py"
    script.write_text(HANDROLLED)
    python = str(Path(tool("curate")).parent / "python")
    processes = len(os.sched_getaffinity(0))

    def ours() -> float:
        out = work / "curate-out"
        shutil.rmtree(out, ignore_errors=True)
        seconds = wall([python, "-m", "curate", "run", str(work / "input"), "--output", str(out), "--scores",
                        "metadata", "--min-size", "512", "--image-size", "4096", "--world-size", "2",
                        "--workers-per-rank", "1", "--processes", str(processes), "--batch-size-rows", "500"])
        return rows / seconds

    def theirs() -> float:
        (work / "handrolled.tar").unlink(missing_ok=True)
        return rows / wall([python, str(script), *map(str, tars), str(work / "handrolled.tar")])

    load_before = os.getloadavg()
    results = interleaved({"curate": ours, "handrolled": theirs}, repeats)
    ratios = [a / b for a, b in zip(results["curate"], results["handrolled"], strict=True)]
    for name, values in results.items():
        print(Series(f"{name} images/s", "img/s", values).describe(1))
    print(Series("curate / hand-rolled", "x", ratios).describe(3), "(target >= 1.5 on 2 cores)")
    stats = json.loads((work / "curate-out" / "stats.json").read_text())
    print(f"curate kept {stats['kept']} of {stats['input_rows']}; load {load_before} -> {os.getloadavg()}")
    return {"reshard_rows": rows, "reshard_ratio_vs_handrolled": round(statistics.median(ratios), 3),
            "reshard_ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
            "reshard_curate_images_per_s": round(statistics.median(results["curate"]), 1),
            "reshard_handrolled_images_per_s": round(statistics.median(results["handrolled"]), 1),
            "reshard_load_average_before_after": [list(load_before), list(os.getloadavg())]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(__doc__, argv, measure, "input samples (img2dataset-format tars of 512 px+ JPEGs)")


if __name__ == "__main__":
    main()
