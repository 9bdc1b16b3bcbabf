"""CLIP encoder: a tiny open_clip config of the real architecture, loaded through the same path as ViT-L/14."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from curate.models import ClipEncoder, WeightsError
from curate.models.device import pixels_to_tensor
from curate.models.preprocess import CLIP_MEAN, CLIP_STD, clip_pixels, decode
from curate.models.testing import TINY_CLIP_CONFIG


def quick_gelu_count(module: torch.nn.Module) -> int:
    return sum(isinstance(child, QuickGELU) for child in module.modules())


def test_folder_loads_strictly_and_matches_open_clip(tiny_weights: dict[str, str], photo_jpegs: list[bytes]) -> None:
    encoder = ClipEncoder.load(tiny_weights["clip_weights"])
    reference, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{tiny_weights['clip_weights']}", force_quick_gelu=True
    )
    images = [Image.open(io.BytesIO(data)) for data in photo_jpegs]
    with torch.no_grad():
        expected = reference.eval().encode_image(torch.stack([preprocess(image) for image in images]), normalize=True)
    embeddings = encoder.encode(images)
    assert embeddings.shape == (len(images), 768) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(embeddings, expected.numpy(), atol=1e-5)
    assert quick_gelu_count(encoder.visual) > 0


def test_quick_gelu_is_forced_for_a_local_weight_file(tmp_path: Path) -> None:
    config = {key: value for key, value in TINY_CLIP_CONFIG.items() if key != "quick_gelu"}
    (tmp_path / "curate-test-tiny-gelu.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "curate-test-tiny-gelu.json")
    plain = open_clip.create_model("curate-test-tiny-gelu")
    assert quick_gelu_count(plain) == 0  # what open_clip builds for a local file unless told
    torch.save(plain.state_dict(), tmp_path / "ViT-L-14.pt")
    encoder = ClipEncoder.load(tmp_path / "ViT-L-14.pt", model_name="curate-test-tiny-gelu")
    assert quick_gelu_count(encoder.visual) == TINY_CLIP_CONFIG["vision_cfg"]["layers"]


def test_wrong_architecture_fails_strict_load(tmp_path: Path, tiny_weights: dict[str, str]) -> None:
    folder = Path(tiny_weights["clip_weights"])
    state = torch.load(folder / "open_clip_pytorch_model.bin", weights_only=True)
    state.pop("visual.proj")
    (tmp_path / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(WeightsError, match="visual.proj"):
        ClipEncoder.load(tmp_path)


def test_input_equals_the_open_clip_transform(photo_jpegs: list[bytes]) -> None:
    preprocess = open_clip.image_transform(224, is_train=False)
    for data in photo_jpegs:
        expected = preprocess(Image.open(io.BytesIO(data)))
        ours = pixels_to_tensor(clip_pixels(decode(data, draft=False))[None], CLIP_MEAN, CLIP_STD)[0]
        assert float((ours - expected).abs().max()) <= 1e-5


def test_draft_decoding_changes_pixels_little(photo_jpegs: list[bytes]) -> None:
    image = Image.open(io.BytesIO(photo_jpegs[0])).resize((1200, 1100), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    drafted, full = decode(buffer.getvalue(), draft=True), decode(buffer.getvalue(), draft=False)
    assert drafted.size == (600, 550) and full.size == (1200, 1100)
    difference = np.abs(clip_pixels(drafted).astype(int) - clip_pixels(full).astype(int))
    assert difference.mean() < 1.0
