"""Figure 5: the score stage against a plain reference, same real-size models (random weights), same images.

Ours: `score_images` with a `Scorer` (one decode per image, JPEG draft mode, both model inputs from that decode,
decoding in threads ahead of the models, the ViT's matmuls in bf16 where `--precision auto` picks it).
Reference, written plainly from the published scripts: full-size
`Image.open(...).convert("RGB")`, torchvision `Resize(224, bicubic) + CenterCrop(224) + ToTensor + Normalize` for CLIP
and `Resize((256, 256)) + ToTensor + Normalize` for the watermark network, fp32, batches run one after the other
(decoded once for both models, which favours the reference over running the two published scripts).
Both use the same model objects: open_clip ViT-L-14 with QuickGELU, LAION aesthetic v2 MLP, timm efficientnet_b3 +
LAION head, with random weights (nothing is downloaded). On CPU the ViT-L/14 forward (~162 GFLOP per image) is most
of the time; the number of images is cut to fit the time budget when the machine is slow, and printed.

The pixel shortcut (JPEG draft decoding) is measured in the same run: mean and max |change| of aesthetic score and
watermark probability against the reference. Random heads give nearly constant outputs, so both heads are first
rescaled (last layer only) on the reference outputs of the warm-up (8 images): aesthetic scores to mean 5, std 1
across the images, watermark logit differences to mean 0, std 2 (probabilities 0.1-0.9, where they move most). The
deltas are a proxy for the real models' (whose sensitivity to pixels this cannot know); read them against the
between-image spread.

    .venv/bin/python -m bench.bench_score [--images 64] [--repeats 3] [--budget-s 300] [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

from bench.common import WORK, Series, interleaved, machine, merge_results
from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
from curate.models.aesthetic import build_head
from curate.models.preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, model_inputs
from curate.models.watermark import build_watermark_network
from curate.schema import AESTHETIC_SCORE, EMBEDDING, WATERMARK_PROB
from curate.stages.score import Scorer, score_images
from curate.stages.verdict import with_verdict_columns

IMAGES = WORK / "score-images"
BATCH_SIZE = 32  # the brief's config batch size (Config.batch_size defaults to 64)
VIT_L14_GFLOP = 162.0  # MODELS.md: ~81 GMAC per 224 px image
LIMITS = {"aesthetic": 0.02, "watermark": 0.01}  # issue 3: the mean change a pixel shortcut may cause

CLIP_TRANSFORM = transforms.Compose([
    transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC),
    transforms.CenterCrop(224),
    transforms.ToTensor(),
    transforms.Normalize(CLIP_MEAN, CLIP_STD),
])
WATERMARK_TRANSFORM = transforms.Compose([
    transforms.Resize((256, 256)),
    transforms.ToTensor(),
    transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
])


def photos() -> list[np.ndarray]:
    """Real RGB photos shipped with scikit-image and scikit-learn (no download)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina"]
    return [getattr(data, name)()[..., :3] for name in names] + list(load_sample_images().images)


def make_images(count: int = 64, seed: int = 0) -> list[bytes]:
    """count JPEGs (q90) of 1024-2048 px on the long side: random crops of the photos, upscaled (Lanczos), with
    mild grain (sigma 3 levels) for the fine detail a web photo of that size has. Cached under bench/work."""
    folder = IMAGES / f"{count}-{seed}"
    paths = [folder / f"{index:03d}.jpg" for index in range(count)]
    if all(path.exists() for path in paths):
        return [path.read_bytes() for path in paths]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = photos()
    for index, path in enumerate(paths):
        source = sources[index % len(sources)]
        height, width = source.shape[:2]
        crop_h, crop_w = (int(side * rng.uniform(0.6, 1.0)) for side in (height, width))
        top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
        image = Image.fromarray(source[top : top + crop_h, left : left + crop_w])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = int(rng.integers(1024, 2049))
        scale = long_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        pixels = np.asarray(image, dtype=np.float32) + rng.normal(0, 3, (image.height, image.width, 1))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        path.write_bytes(buffer.getvalue())
    return [path.read_bytes() for path in paths]


def random_scorer(seed: int = 0, precision: str = "auto") -> tuple[Scorer, nn.Module]:
    """The stage's Scorer around real-size networks with random weights (ClipEncoder.load builds the same model),
    at the pipeline's --precision, and an fp32 copy of the ViT for the reference."""
    import open_clip

    torch.manual_seed(seed)
    clip = open_clip.create_model("ViT-L-14", pretrained=None, force_quick_gelu=True)
    fp32_visual = copy.deepcopy(clip.visual).eval()
    scorer = Scorer(
        clip=ClipEncoder(clip.visual, precision=precision),
        aesthetic=AestheticPredictor(build_head("v2")),
        watermark=WatermarkDetector(build_watermark_network()),
        batch_size=BATCH_SIZE,
    )
    return scorer, fp32_visual


class ForwardClock:
    """Seconds spent inside a module's forward (hooks), and optionally the input of one of its layers."""

    def __init__(self, module: nn.Module) -> None:
        self.seconds = 0.0
        self.images = 0
        self._started = 0.0
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.images += int(inputs[0].shape[0])
        self._started = time.perf_counter()

    def _stop(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._started

    def take(self) -> tuple[float, int]:
        taken = (self.seconds, self.images)
        self.seconds, self.images = 0.0, 0
        return taken


def ours(scorer: Scorer, jpgs: list[bytes]) -> dict[str, np.ndarray]:
    table = with_verdict_columns(pa.table({"key": [f"{i:03d}" for i in range(len(jpgs))], "jpg": jpgs}))
    out = score_images(table, scorer)
    return {
        "aesthetic": out[AESTHETIC_SCORE].to_numpy(zero_copy_only=False).astype(np.float32),
        "watermark": out[WATERMARK_PROB].to_numpy(zero_copy_only=False).astype(np.float32),
        "embedding": np.array(out[EMBEDDING].to_pylist(), dtype=np.float32),
    }


def reference_watermark(scorer: Scorer) -> nn.Module:
    """The watermark network as the published script has it: the same weights, loaded into a default (NCHW) module.

    The Scorer's copy is channels_last (WatermarkDetector's layout); without this the reference would get that
    speed-up too. The outputs are the same to 1e-8."""
    network = build_watermark_network().eval()
    network.load_state_dict(scorer.watermark.network.state_dict())
    return network


def reference(scorer: Scorer, jpgs: list[bytes], network: nn.Module, visual: nn.Module,
              batch_size: int = BATCH_SIZE) -> dict[str, Any]:
    """The published scripts' way, in one loop: full decode, torchvision transforms, fp32, batch after batch."""
    head = scorer.aesthetic.module
    results: dict[str, list[np.ndarray]] = {"aesthetic": [], "watermark": [], "embedding": []}
    for start in range(0, len(jpgs), batch_size):
        images = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpgs[start : start + batch_size]]
        clip_batch = torch.stack([CLIP_TRANSFORM(image) for image in images])
        watermark_batch = torch.stack([WATERMARK_TRANSFORM(image) for image in images])
        with torch.no_grad():
            features = visual(clip_batch)
            features = features / features.norm(dim=-1, keepdim=True)
            results["embedding"].append(features.numpy())
            results["aesthetic"].append(head(features).numpy().reshape(-1))
            results["watermark"].append(torch.softmax(network(watermark_batch), dim=1)[:, 0].numpy())
    return {name: np.concatenate(parts) for name, parts in results.items()}


def calibrate_heads(
    scorer: Scorer, networks: list[nn.Module], embeddings: np.ndarray, penultimate: torch.Tensor
) -> None:
    """Rescale each random head's last layer: aesthetic to mean 5 / std 1, watermark logit gap to mean 0 / std 2."""
    last = scorer.aesthetic.module.layers[7]
    with torch.no_grad():
        scores = scorer.aesthetic.module(torch.from_numpy(embeddings)).reshape(-1)
        last.weight.div_(scores.std())
        last.bias.sub_(scores.mean()).div_(scores.std()).add_(5.0)
        final = networks[0].classifier[5]
        gap = final(penultimate) @ torch.tensor([1.0, -1.0])
        gain, shift = 2.0 / gap.std(), gap.mean()
        for network in networks:  # the Scorer's and the reference's copy of the same weights
            network.classifier[5].weight.mul_(gain)
            network.classifier[5].bias.mul_(gain)
            network.classifier[5].bias[0] -= shift * gain


def matmul_gflops(size: int = 4096, repeats: int = 3, dtype: torch.dtype = torch.float32) -> list[float]:
    """torch.matmul rates in dtype, GFLOP/s (one untimed warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.matmul(a, b)
        rates.append(2 * size**3 / (time.perf_counter() - started) / 1e9)
    return rates


def counted_vit_gflop(visual: nn.Module) -> float:
    """FLOPs of one 224 px image through the ViT, as torch's FlopCounterMode counts them (matmuls, attention).

    nn.MultiheadAttention's inference fast path is one fused op the counter does not see: count with it off."""
    counter = FlopCounterMode(display=False)
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), counter:
            visual(torch.zeros(1, 3, 224, 224))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops() / 1e9


def preprocessing(jpgs: list[bytes], repeats: int) -> dict[str, Any]:
    """Decode + both model inputs only, one thread each: draft vs full decode, and the pixels they give."""
    def ours_inputs() -> float:
        started = time.perf_counter()
        for data in jpgs:
            model_inputs(data, draft=True)
        return len(jpgs) / (time.perf_counter() - started)

    def reference_inputs() -> float:
        started = time.perf_counter()
        for data in jpgs:
            image = Image.open(io.BytesIO(data)).convert("RGB")
            CLIP_TRANSFORM(image), WATERMARK_TRANSFORM(image)
        return len(jpgs) / (time.perf_counter() - started)

    rates = interleaved({"ours": ours_inputs, "reference": reference_inputs}, repeats)
    clip_delta, watermark_delta = [], []
    for data in jpgs:
        draft, full = model_inputs(data, draft=True), model_inputs(data, draft=False)
        clip_delta.append(np.abs(draft[0].astype(np.int16) - full[0]).mean())
        watermark_delta.append(np.abs(draft[1].astype(np.int16) - full[1]).mean())
    ratios = [a / b for a, b in zip(rates["ours"], rates["reference"], strict=True)]
    return {"rates": rates, "ratios": ratios, "clip_px": float(np.mean(clip_delta)),
            "watermark_px": float(np.mean(watermark_delta))}


def deltas(ours_out: dict[str, np.ndarray], reference_out: dict[str, np.ndarray]) -> dict[str, float]:
    found: dict[str, float] = {}
    for name in ("aesthetic", "watermark"):
        change = np.abs(ours_out[name] - reference_out[name])
        found[f"{name}_mean"] = float(change.mean())
        found[f"{name}_max"] = float(change.max())
        found[f"{name}_spread"] = float(reference_out[name].std())
    cosine = (ours_out["embedding"] * reference_out["embedding"]).sum(axis=1)
    cosine /= np.linalg.norm(ours_out["embedding"], axis=1) * np.linalg.norm(reference_out["embedding"], axis=1)
    found["embedding_cosine_min"] = float(cosine.min())
    unit = reference_out["embedding"] / np.linalg.norm(reference_out["embedding"], axis=1, keepdims=True)
    pairs = unit @ unit.T
    found["embedding_cosine_between_images"] = float(pairs[~np.eye(len(unit), dtype=bool)].mean())
    return found


def describe_deltas(found: dict[str, float], label: str) -> None:
    for name in ("aesthetic", "watermark"):
        mean, high, spread = found[f"{name}_mean"], found[f"{name}_max"], found[f"{name}_spread"]
        verdict = "within" if mean <= LIMITS[name] else "OVER"
        print(f"  {label} {name}: mean |Δ| {mean:.5f}, max {high:.5f} ({verdict} the {LIMITS[name]} limit; "
              f"between-image std {spread:.3f})")
    print(f"  {label} embedding cosine(ours, reference) min {found['embedding_cosine_min']:.6f} (between different "
          f"images, mean {found['embedding_cosine_between_images']:.4f}: how alike the random ViT sees them)")


def warm_up(scorer: Scorer, network: nn.Module, visual: nn.Module, jpgs: list[bytes]) -> float:
    """Both paths once on a few images; rescales the random heads on the reference's outputs (see the docstring).

    Returns the reference's seconds per image."""
    ours(scorer, jpgs)
    penultimate: list[torch.Tensor] = []
    capture = network.classifier[5].register_forward_pre_hook(
        lambda module, inputs: penultimate.append(inputs[0].detach().clone()))
    started = time.perf_counter()
    outputs = reference(scorer, jpgs, network, visual)
    seconds = time.perf_counter() - started
    capture.remove()
    calibrate_heads(scorer, [scorer.watermark.network, network], outputs["embedding"], torch.cat(penultimate))
    return seconds / len(jpgs)


def precision_gate(scorer: Scorer, visual: nn.Module, jpgs: list[bytes]) -> dict[str, float]:
    """The scorer's precision against fp32 on the same (draft) pixels, with the heads as calibrated: bf16 alone.

    The watermark network is fp32 at every precision, so only the aesthetic score and the embedding can move."""
    pixels = np.stack([model_inputs(data)[0] for data in jpgs])
    fp32 = ClipEncoder(visual).encode_pixels(pixels)
    ours_embedding = scorer.clip.encode_pixels(pixels)
    change = np.abs(scorer.aesthetic.predict(ours_embedding) - scorer.aesthetic.predict(fp32))
    return {"aesthetic_mean": float(change.mean()), "aesthetic_max": float(change.max()),
            "embedding_cosine_min": float((ours_embedding * fp32).sum(axis=1).min())}


def measure(images: int, repeats: int, budget_s: float) -> dict[str, Any]:
    load_before = os.getloadavg()
    jpgs = make_images(64)
    sizes = [Image.open(io.BytesIO(data)).size for data in jpgs]
    megapixels = statistics.median(w * h for w, h in sizes) / 1e6
    print(f"images: 64 JPEGs q90, long side {min(max(s) for s in sizes)}-{max(max(s) for s in sizes)} px, "
          f"median {megapixels:.1f} MP, median {statistics.median(len(d) for d in jpgs) / 1e3:.0f} KB")
    pre = preprocessing(jpgs, repeats)
    pre_ours, pre_reference = Series("ours", "images/s", pre["rates"]["ours"]), Series(
        "reference", "images/s", pre["rates"]["reference"])
    print(f"decode + both model inputs, 64 images, one thread: {pre_ours.describe(1)}; {pre_reference.describe(1)}; "
          f"ratio {statistics.median(pre['ratios']):.2f} ({min(pre['ratios']):.2f}-{max(pre['ratios']):.2f})")
    print(f"  draft decode moves the model inputs by a mean {pre['clip_px']:.2f} (CLIP 224) and "
          f"{pre['watermark_px']:.2f} (watermark 256) levels of 255 against the full decode")

    peak_rates = matmul_gflops()
    scorer, fp32_visual = random_scorer()
    precision = "bf16" if scorer.clip.dtype == torch.bfloat16 else "fp32"
    flop_counted = counted_vit_gflop(fp32_visual)
    print(f"ViT-L/14 forward, FlopCounterMode: {flop_counted:.1f} GFLOP per image (MODELS.md: ~{VIT_L14_GFLOP:.0f})")
    vit_clocks = {"ours": ForwardClock(scorer.clip.visual), "reference": ForwardClock(fp32_visual)}
    plain_network = reference_watermark(scorer)
    per_image = warm_up(scorer, plain_network, fp32_visual, jpgs[:8])
    gate = precision_gate(scorer, fp32_visual, jpgs[:8])
    verdict = "within" if gate["aesthetic_mean"] <= LIMITS["aesthetic"] else "OVER"
    print(f"--precision auto -> {precision} (ViT matmuls; residual stream, norms, heads and the watermark network "
          f"fp32): against fp32 on the same 8 images, aesthetic mean |Δ| {gate['aesthetic_mean']:.5f}, max "
          f"{gate['aesthetic_max']:.5f} ({verdict} the {LIMITS['aesthetic']} gate), watermark 0 (fp32), embedding "
          f"cosine min {gate['embedding_cosine_min']:.6f}")
    count = max(8, min(images, len(jpgs), int(budget_s / (2 * repeats * per_image))))
    print(f"warm-up (both paths, 8 images; heads rescaled): reference {per_image:.2f} s per image; timing {count} of "
          f"the 64 images per run, {repeats} interleaved rounds (budget {budget_s:.0f} s; --images, --budget-s)")
    subset = jpgs[:count]

    outputs: dict[str, dict[str, np.ndarray]] = {}
    vit_rates: dict[str, list[float]] = {"ours": [], "reference": []}
    bodies: dict[str, Callable[[], dict[str, np.ndarray]]] = {
        "ours": lambda: ours(scorer, subset),
        "reference": lambda: reference(scorer, subset, plain_network, fp32_visual),
    }

    cpu_seconds: dict[str, list[float]] = {"ours": [], "reference": []}

    def timed(name: str) -> Callable[[], float]:
        def run() -> float:
            if name == "ours":  # the peak is sampled every round: other jobs' load moves it
                peak_rates.extend(matmul_gflops(repeats=1))
            vit_clocks[name].take()
            started, cpu_started = time.perf_counter(), time.process_time()
            outputs[name] = bodies[name]()
            seconds = time.perf_counter() - started
            cpu_seconds[name].append((time.process_time() - cpu_started) / count)
            vit_seconds, vit_images = vit_clocks[name].take()
            vit_rates[name].append(flop_counted * vit_images / vit_seconds)
            print(f"  {name}: {count / seconds:.3f} images/s, {cpu_seconds[name][-1]:.2f} CPU s per image, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
            return count / seconds

        return run

    rates = interleaved({"ours": timed("ours"), "reference": timed("reference")}, repeats, warmup=0)
    peak_rates += matmul_gflops()
    peak = max(peak_rates)
    bf16_peak = max(matmul_gflops(dtype=torch.bfloat16))
    ours_rate, reference_rate = Series("ours", "images/s", rates["ours"]), Series("reference", "images/s",
                                                                                  rates["reference"])
    ratios = [a / b for a, b in zip(rates["ours"], rates["reference"], strict=True)]
    vit_ours = Series("ViT-L/14 in ours", "GFLOP/s", vit_rates["ours"])
    vit_reference = Series("ViT-L/14 in the reference", "GFLOP/s", vit_rates["reference"])
    fractions = [rate / peak for rate in vit_rates["ours"]]
    print(f"score, {count} images, batch {BATCH_SIZE}, CPU, ours {precision} / reference fp32, "
          f"{torch.get_num_threads()} torch threads:")
    print(f"  {ours_rate.describe(3)}\n  {reference_rate.describe(3)}")
    print(f"  ratio ours/reference: median {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}); "
          f"target >= 1.5: {'met' if statistics.median(ratios) >= 1.5 else 'NOT met'}")
    print(f"  {vit_ours.describe(1)}\n  {vit_reference.describe(1)}")
    print(f"  fp32 matmul 4096^3: peak {peak:.1f} GFLOP/s (median {statistics.median(peak_rates):.1f}, "
          f"min {min(peak_rates):.1f}, n={len(peak_rates)}); ViT-L/14 in ours at {statistics.median(fractions):.2f} "
          f"of peak ({min(fractions):.2f}-{max(fractions):.2f}); bf16 matmul peak {bf16_peak:.1f} GFLOP/s, "
          f"ViT-L/14 in ours at {statistics.median(vit_rates['ours']) / bf16_peak:.2f} of it")
    cpu_ratios = [b / a for a, b in zip(cpu_seconds["ours"], cpu_seconds["reference"], strict=True)]
    print(f"  CPU seconds per image (process time, less sensitive to other jobs): ours "
          f"{statistics.median(cpu_seconds['ours']):.2f}, reference {statistics.median(cpu_seconds['reference']):.2f}; "
          f"ratio reference/ours {statistics.median(cpu_ratios):.3f} ({min(cpu_ratios):.3f}-{max(cpu_ratios):.3f})")

    print(f"pixel shortcut (JPEG draft decode) and {precision} together, random-weight heads rescaled as the "
          "docstring says (a proxy):")
    found = deltas(outputs["ours"], outputs["reference"])
    describe_deltas(found, "draft on ")
    figures: dict[str, Any] = {}
    over = [name for name in LIMITS if found[f"{name}_mean"] > LIMITS[name]]
    if over:
        print(f"  the mean change is over the limit for {', '.join(over)}: the shortcut should be off "
              "(Scorer.draft=False); measured with it off:")
        scorer.draft = False
        started = time.perf_counter()
        found_off = deltas(ours(scorer, subset), outputs["reference"])
        off_rate = count / (time.perf_counter() - started)
        scorer.draft = True
        describe_deltas(found_off, "draft off")
        print(f"  ours with draft off: {off_rate:.3f} images/s (one run), ratio {off_rate / reference_rate.median:.3f}")
        figures.update({
            "score_draft_off_images_per_s": round(off_rate, 4),
            "score_draft_off_mean_abs_delta_aesthetic": round(found_off["aesthetic_mean"], 6),
            "score_draft_off_mean_abs_delta_watermark": round(found_off["watermark_mean"], 6),
        })
    load_after = os.getloadavg()
    print(f"load average (1/5/15 min): before {tuple(round(x, 1) for x in load_before)}, "
          f"after {tuple(round(x, 1) for x in load_after)}; machine: {machine()}")
    figures.update({
        "score_precision": precision,
        "score_bf16_gate_mean_abs_delta_aesthetic": round(gate["aesthetic_mean"], 6),
        "score_bf16_gate_max_abs_delta_aesthetic": round(gate["aesthetic_max"], 6),
        "score_bf16_gate_embedding_cosine_min": round(gate["embedding_cosine_min"], 6),
        "score_bench_images": count,
        "score_bench_repeats": repeats,
        "score_bench_batch_size": BATCH_SIZE,
        "score_bench_weights": "random (real-size architectures); deltas are a proxy with rescaled heads",
        "score_images_per_s": round(ours_rate.median, 4),
        "score_images_per_s_min_max": [round(min(rates["ours"]), 4), round(max(rates["ours"]), 4)],
        "score_reference_images_per_s": round(reference_rate.median, 4),
        "score_reference_images_per_s_min_max": [round(min(rates["reference"]), 4),
                                                 round(max(rates["reference"]), 4)],
        "score_ratio_vs_reference": round(statistics.median(ratios), 4),
        "score_ratio_min_max": [round(min(ratios), 4), round(max(ratios), 4)],
        "score_cpu_seconds_per_image": round(statistics.median(cpu_seconds["ours"]), 3),
        "score_reference_cpu_seconds_per_image": round(statistics.median(cpu_seconds["reference"]), 3),
        "score_cpu_time_ratio_vs_reference": round(statistics.median(cpu_ratios), 4),
        "score_cpu_time_ratio_min_max": [round(min(cpu_ratios), 4), round(max(cpu_ratios), 4)],
        "score_preprocess_images_per_s": round(pre_ours.median, 2),
        "score_preprocess_reference_images_per_s": round(pre_reference.median, 2),
        "score_preprocess_ratio_vs_reference": round(statistics.median(pre["ratios"]), 3),
        "score_preprocess_ratio_min_max": [round(min(pre["ratios"]), 3), round(max(pre["ratios"]), 3)],
        "vit_l14_gflop_per_image": round(flop_counted, 1),
        "vit_l14_gflops": round(vit_ours.median, 2),
        "vit_l14_gflops_min_max": [round(min(vit_rates["ours"]), 2), round(max(vit_rates["ours"]), 2)],
        "vit_l14_fraction_of_matmul_peak": round(statistics.median(fractions), 3),
        "vit_l14_fraction_of_matmul_peak_min_max": [round(min(fractions), 3), round(max(fractions), 3)],
        "matmul_fp32_peak_gflops": round(peak, 1),
        "matmul_bf16_peak_gflops": round(bf16_peak, 1),
        "vit_l14_fraction_of_bf16_matmul_peak": round(statistics.median(vit_rates["ours"]) / bf16_peak, 3),
        "score_draft_mean_abs_delta_aesthetic": round(found["aesthetic_mean"], 6),
        "score_draft_max_abs_delta_aesthetic": round(found["aesthetic_max"], 6),
        "score_draft_mean_abs_delta_watermark": round(found["watermark_mean"], 6),
        "score_draft_max_abs_delta_watermark": round(found["watermark_max"], 6),
        "score_draft_mean_abs_delta_pixels_clip": round(pre["clip_px"], 3),
        "score_load_average_before_after": [round(load_before[0], 1), round(load_after[0], 1)],
    })
    return figures


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="images per timed run (at most 64; cut to the budget)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    parser.add_argument("--budget-s", type=float, default=300.0, help="seconds for the model rounds")
    parser.add_argument("--no-write", action="store_true", help="print only; leave latest.json alone")
    args = parser.parse_args(argv)
    figures = measure(args.images, args.repeats, args.budget_s)
    if not args.no_write:
        merge_results(figures)
        print(f"merged {len(figures)} score figures into bench/results/latest.json")
    return figures


if __name__ == "__main__":
    main()
