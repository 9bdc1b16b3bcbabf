"""Tiny weight files of the real architectures, written once per test session."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from curate.models.testing import write_tiny_weights

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_tiny_weights(tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture(scope="session")
def photo_jpegs() -> list[bytes]:
    """Real photos (bundled with scikit-image) as JPEGs of several shapes, one grayscale."""
    sizes = [(512, 512), (731, 300), (300, 997), (224, 500)]
    encoded = []
    for name, size in zip(PHOTOS, sizes, strict=True):
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        encoded.append(buffer.getvalue())
    buffer = io.BytesIO()
    Image.fromarray(skimage.data.camera()).save(buffer, "JPEG")
    encoded.append(buffer.getvalue())
    return encoded


@pytest.fixture()
def unit_vectors() -> np.ndarray:
    values = np.random.default_rng(0).standard_normal((5, 768)).astype(np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def photo_set(photo_jpegs: list[bytes]) -> list[bytes]:
    """The bundled photos plus photo-like JPEGs (a photo upscaled past 1024 px with grain, progressive, CMYK)."""
    rng = np.random.default_rng(0)
    source = Image.fromarray(skimage.data.chelsea()).resize((1280, 960), Image.Resampling.LANCZOS)
    grain = np.asarray(source, dtype=np.float32) + rng.normal(0, 3, (960, 1280, 1))
    large = Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8))
    extra = []
    for image, options in ((large, {"quality": 90}), (large.rotate(90, expand=True), {"progressive": True}),
                           (Image.fromarray(skimage.data.coffee()).convert("CMYK"), {"quality": 90})):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **options)
        extra.append(buffer.getvalue())
    return photo_jpegs + extra


@pytest.fixture(scope="session")
def calibrated_weights(tiny_weights: dict[str, str], photo_set: list[bytes], tmp_path_factory) -> dict[str, str]:
    """The tiny weights with both heads' last layers rescaled on the fp32 outputs of photo_set, as bench_score does:
    aesthetic scores to mean 5 / std 1, the watermark logit gap to mean 0 / std 2 (pwatermark 0.1-0.9).

    Random heads give nearly constant outputs, so a bf16 or resize error would not show in them otherwise."""
    from curate.models import AestheticPredictor, ClipEncoder, WatermarkDetector
    from curate.models.preprocess import model_inputs

    folder = tmp_path_factory.mktemp("calibrated")
    clip = ClipEncoder.load(tiny_weights["clip_weights"])
    aesthetic = AestheticPredictor.load(tiny_weights["aesthetic_weights"])
    watermark = WatermarkDetector.load(tiny_weights["watermark_weights"])
    inputs = [model_inputs(data, draft=False) for data in photo_set]
    embeddings = clip.encode_pixels(np.stack([pixels[0] for pixels in inputs]))
    penultimate: list[torch.Tensor] = []
    final = watermark.network.classifier[5]
    hook = final.register_forward_pre_hook(lambda module, args: penultimate.append(args[0].clone()))
    watermark.predict_pixels(np.stack([pixels[1] for pixels in inputs]))
    hook.remove()
    with torch.no_grad():
        last = aesthetic.module.layers[7]
        scores = torch.from_numpy(aesthetic.predict(embeddings))
        last.weight.div_(scores.std())
        last.bias.sub_(scores.mean()).div_(scores.std()).add_(5.0)
        gap = final(penultimate[0]) @ torch.tensor([1.0, -1.0])
        gain, shift = 2.0 / gap.std(), gap.mean()
        final.weight.mul_(gain)
        final.bias.mul_(gain)
        final.bias[0] -= shift * gain
    torch.save(aesthetic.module.state_dict(), folder / "aesthetic.pth")
    torch.save(watermark.network.state_dict(), folder / "watermark.pt")
    return {**tiny_weights, "aesthetic_weights": str(folder / "aesthetic.pth"),
            "watermark_weights": str(folder / "watermark.pt")}
