"""make bench-gpu (issue 18): the score stage on one GPU, from stored JPEG bytes, against the ways it is done today.

In one run, on the same images and the same real-size models (open_clip ViT-L-14 with QuickGELU, LAION aesthetic v2,
timm efficientnet_b3 + LAION head; random weights: timing does not depend on them):
  1. the bf16 matmul peak of this GPU (8192^3), measured first;
  2. ours: `score_images` with the tensor decoder (batched nvJPEG decode_jpeg, torch resizes on the GPU, a producer
     thread on its own CUDA stream), the ViT's matmuls in bf16 (`--precision auto`), results kept on the GPU until
     the table is done; images/s for the whole stage, decode included;
  3. the models alone on inputs already on the GPU (images/s, and the ViT's share of the bf16 peak);
  4. the current PIL path: the same stage with `decoder="pil"` (PIL draft decode in one thread per core);
  5. a clip-retrieval-style reference: a torch DataLoader (one worker per core) doing `Image.open().convert("RGB")`
     and torchvision transforms, the ViT under fp16 autocast as clip-retrieval runs it, the watermark network fp32
     as LAION's script runs it.
The images: 64 distinct photo-like JPEGs (q90, 1024 px on the long side, from the photos bundled with
scikit-image), repeated to --images rows (decode cost does not depend on repetition).

On the GPU machine with the device tool (it has torch, torchvision, timm, pyarrow, pillow, numpy, scikit-image but
not open_clip; the wheels travel in bench/wheels, git-ignored, fetched here once with
`.venv/bin/python -m pip download open_clip_torch==3.3.0 ftfy wcwidth --no-deps --only-binary=:all:
--python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d bench/wheels`):

    run(kind="nvidia-h100-x1", carry=["bench/wheels"], timeout_s=420, command=
        "python3 -m pip install -q --no-index --no-deps --target /tmp/site bench/wheels/*.whl && "
        "export PYTHONPATH=/tmp/site && PYTHONUNBUFFERED=1 python3 -m bench.bench_gpu --out $OUT/gpu.json "
        "2>&1 | tee $OUT/gpu.log")

(`make bench-gpu PY=python3` is the same run without --out.)

then, here: `.venv/bin/python -m bench.bench_gpu --merge /work/.device/.../gpu.json` merges the gpu_* figures
into bench/results/latest.json. `--smoke` runs the same code on CPU in seconds (tiny CLIP, 4 small images, no warm-up).
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn

from bench.bench_score import CLIP_TRANSFORM, VIT_L14_GFLOP, WATERMARK_TRANSFORM
from bench.common import merge_results
from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
from curate.models.aesthetic import build_head
from curate.models.watermark import build_watermark_network
from curate.stages.score import Scorer, score_images
from curate.stages.verdict import with_verdict_columns

TARGET_IMAGES_PER_S, TARGET_RATIO = 3000.0, 3.0  # issue 18, on one H100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bf16_peak_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """Mean bf16 matmul rate over repeats products after three warm-ups, TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def photo_jpegs(count: int, long_side: int, seed: int = 0) -> list[bytes]:
    """count distinct JPEGs (q90) of long_side px: random crops of scikit-image's photos, with mild grain."""
    from skimage import data

    names = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field")
    sources = [getattr(data, name)()[..., :3] for name in names]
    rng = np.random.default_rng(seed)
    encoded = []
    for index in range(count):
        source = sources[index % len(sources)]
        height, width = source.shape[:2]
        crop_h, crop_w = (int(side * rng.uniform(0.6, 1.0)) for side in (height, width))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        image = Image.fromarray(np.ascontiguousarray(source[top : top + crop_h, left : left + crop_w]))
        scale = long_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (image.height, image.width, 1))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def build_models(smoke: bool, device: torch.device, batch_size: int) -> tuple[Scorer, nn.Module]:
    """The stage's Scorer (tensor decoder, --precision auto) and an fp32 copy of the ViT for the reference."""
    import open_clip

    torch.manual_seed(0)
    if smoke:
        from curate.models.testing import TINY_CLIP_CONFIG

        visual = open_clip.CLIP(**TINY_CLIP_CONFIG).visual  # type: ignore[arg-type]
    else:
        visual = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True).visual
    reference_visual = copy.deepcopy(visual).eval().to(device)
    scorer = Scorer(
        clip=ClipEncoder(visual, device=device, precision="auto"),
        aesthetic=AestheticPredictor(build_head("v2"), device=device),
        watermark=WatermarkDetector(build_watermark_network(), device=device),
        batch_size=batch_size,
        decoder="tensor",
    )
    return scorer, reference_visual


def stage_rate(scorer: Scorer, jpgs: list[bytes], decoder: str) -> float:
    """images/s of score_images over the whole table (decode included; ends with the one host copy)."""
    scorer.decoder = decoder
    table = with_verdict_columns(pa.table({"key": [str(i) for i in range(len(jpgs))], "jpg": jpgs}))
    started = time.perf_counter()
    out = score_images(table, scorer)
    seconds = time.perf_counter() - started
    assert out["aesthetic_score"].null_count == 0, "every image should have been scored"
    return len(jpgs) / seconds


def models_rate(scorer: Scorer, images: int, device: torch.device) -> float:
    """images/s of the three models on normalized inputs already on the device, one sync at the end."""
    batch = scorer.batch_size
    clip = torch.randn(batch, 3, 224, 224, device=device)
    watermark = torch.randn(batch, 3, 256, 256, device=device).contiguous(memory_format=torch.channels_last)
    rounds = max(1, images // batch)
    outputs = []
    sync(device)
    started = time.perf_counter()
    for _ in range(rounds):
        features = scorer.clip.embed(clip)
        outputs += [scorer.aesthetic.score(features), scorer.watermark.probabilities(watermark)]
    torch.cat(outputs).cpu()
    return rounds * batch / (time.perf_counter() - started)


class _ReferenceImages(torch.utils.data.Dataset):
    def __init__(self, jpgs: list[bytes]) -> None:
        self.jpgs = jpgs

    def __len__(self) -> int:
        return len(self.jpgs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(io.BytesIO(self.jpgs[index])).convert("RGB")
        return CLIP_TRANSFORM(image), WATERMARK_TRANSFORM(image)


def reference_rate(scorer: Scorer, visual: nn.Module, jpgs: list[bytes], device: torch.device, workers: int,
                   batch_size: int) -> float:
    """clip-retrieval style: DataLoader workers decode and transform; ViT under fp16 autocast, watermark fp32."""
    loader = torch.utils.data.DataLoader(_ReferenceImages(jpgs), batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    head, network = scorer.aesthetic.module, scorer.watermark.network
    results = []
    started = time.perf_counter()
    with torch.no_grad():
        for clip_batch, watermark_batch in loader:
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                features = visual(clip_batch.to(device, non_blocking=True))
            features = features.float()
            features = features / features.norm(dim=-1, keepdim=True)
            results.append(head(features).cpu())
            results.append(torch.softmax(network(watermark_batch.to(device, non_blocking=True)), dim=1)[:, 0].cpu())
    return len(jpgs) / (time.perf_counter() - started)


def measure(images: int, batch_size: int, rounds: int, smoke: bool) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
    workers = os.cpu_count() or 1
    peak = bf16_peak_tflops(device, 512 if smoke else 8192, repeats=2 if smoke else 10)
    print(f"{name}: bf16 matmul {peak:.1f} TFLOP/s; {workers} CPU cores", flush=True)
    distinct = photo_jpegs(4 if smoke else 64, 256 if smoke else 1024)
    jpgs = [distinct[index % len(distinct)] for index in range(images)]
    print(f"{images} JPEGs ({len(distinct)} distinct, median {statistics.median(map(len, distinct)) / 1e3:.0f} KB)")
    scorer, reference_visual = build_models(smoke, device, batch_size)
    scorer.decode_workers = workers
    print(f"models built; ViT dtype {scorer.clip.dtype}, batch {batch_size}", flush=True)
    if not smoke:  # warm-up: cuDNN autotuning, allocator, DataLoader start-up
        warm = jpgs[: min(len(jpgs), 2 * batch_size)]
        stage_rate(scorer, warm, "tensor"), stage_rate(scorer, warm, "pil")
        reference_rate(scorer, reference_visual, warm, device, workers, batch_size)
        models_rate(scorer, batch_size, device)
    rates: dict[str, list[float]] = {"ours": [], "models": [], "pil": [], "reference": []}
    for round_index in range(rounds):  # interleaved: ours, models alone, PIL path, reference
        rates["ours"].append(stage_rate(scorer, jpgs, "tensor"))
        rates["models"].append(models_rate(scorer, images, device))
        rates["pil"].append(stage_rate(scorer, jpgs, "pil"))
        rates["reference"].append(reference_rate(scorer, reference_visual, jpgs, device, workers, batch_size))
        print(f"  round {round_index}: " + ", ".join(f"{key} {values[-1]:.0f}" for key, values in rates.items())
              + " images/s", flush=True)
    median = {key: statistics.median(values) for key, values in rates.items()}
    ratios = [a / b for a, b in zip(rates["ours"], rates["reference"], strict=True)]
    fraction = median["models"] * VIT_L14_GFLOP / 1e3 / peak
    print(f"score stage, {images} images, batch {batch_size} (median of {rounds}, min-max):")
    for key, label in (("ours", "ours (nvJPEG + torch resize + bf16)"), ("models", "models alone"),
                       ("pil", "current PIL path"), ("reference", "clip-retrieval-style reference")):
        print(f"  {label}: {median[key]:.0f} images/s ({min(rates[key]):.0f}-{max(rates[key]):.0f})")
    print(f"  ratio ours/reference {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}); models "
          f"alone at {fraction:.2f} of the bf16 peak (ViT-L/14 FLOPs only); fallbacks to PIL: {scorer.fallbacks}")
    met = median["ours"] >= TARGET_IMAGES_PER_S and statistics.median(ratios) >= TARGET_RATIO
    print(f"  targets (>= {TARGET_IMAGES_PER_S:.0f} images/s, >= {TARGET_RATIO}x reference): "
          f"{'met' if met else 'NOT met'}{' (smoke run: not a GPU figure)' if smoke else ''}")
    return {
        "gpu_device": name,
        "gpu_score_images_per_s": round(median["ours"], 1),
        "gpu_score_images_per_s_min_max": [round(min(rates["ours"]), 1), round(max(rates["ours"]), 1)],
        "gpu_models_images_per_s": round(median["models"], 1),
        "gpu_pil_path_images_per_s": round(median["pil"], 1),
        "gpu_reference_images_per_s": round(median["reference"], 1),
        "gpu_ratio_vs_reference": round(statistics.median(ratios), 3),
        "gpu_ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "gpu_bf16_matmul_tflops": round(peak, 1),
        "gpu_models_fraction_of_bf16_peak": round(fraction, 3),
        "gpu_decode_fallbacks": scorer.fallbacks,
        "gpu_bench_images": images,
        "gpu_bench_batch_size": batch_size,
        "gpu_bench_rounds": rounds,
        "gpu_cpu_cores": workers,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3072, help="rows per timed run")
    parser.add_argument("--batch-size", type=int, default=512, help="the stage's --batch-size")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timed rounds after a warm-up")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny CLIP, 4 small images: checks it runs")
    parser.add_argument("--out", type=Path, help="also write the figures here (e.g. $OUT/gpu.json on the device)")
    parser.add_argument("--merge", type=Path, help="merge a --out file from the GPU into latest.json, then stop")
    parser.add_argument("--no-write", action="store_true", help="print only; leave latest.json alone")
    args = parser.parse_args(argv)
    if args.merge:
        figures = json.loads(args.merge.read_text())
        merge_results(figures)
        print(f"merged {len(figures)} gpu figures ({figures.get('gpu_device')}) into bench/results/latest.json")
        return figures
    if args.smoke:
        args.images, args.batch_size, args.rounds = min(args.images, 4), min(args.batch_size, 2), 1
    figures = measure(args.images, args.batch_size, args.rounds, args.smoke)
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    if not args.no_write and not args.smoke:
        merge_results(figures)
        print(f"merged {len(figures)} gpu figures into bench/results/latest.json")
    return figures


if __name__ == "__main__":
    main()
