"""Watermark detector: the released head's keys, both file layouts, softmax index 0, torchvision-equal inputs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from curate.models import WatermarkDetector, WeightsError
from curate.models.device import pixels_to_tensor
from curate.models.preprocess import IMAGENET_MEAN, IMAGENET_STD, decode, watermark_pixels
from curate.models.watermark import build_watermark_network

HEAD_SHAPES = {
    "classifier.0.weight": (625, 1536),
    "classifier.0.bias": (625,),
    "classifier.3.weight": (256, 625),
    "classifier.3.bias": (256,),
    "classifier.5.weight": (2, 256),
    "classifier.5.bias": (2,),
}


@pytest.fixture(scope="module")
def network_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_watermark_network().state_dict()


def test_head_has_the_released_key_names_and_shapes(network_state: dict[str, torch.Tensor]) -> None:
    head = {key: tuple(value.shape) for key, value in network_state.items() if key.startswith("classifier.")}
    assert head == HEAD_SHAPES
    assert "conv_stem.weight" in network_state and "bn2.running_var" in network_state


def test_bare_and_wrapped_state_dicts_load_strictly_and_agree(
    tmp_path: Path, network_state: dict[str, torch.Tensor], photo_jpegs: list[bytes]
) -> None:
    torch.save(network_state, tmp_path / "bare.pt")
    torch.save({"weights": network_state}, tmp_path / "wrapped.pt")
    images = [Image.open(io.BytesIO(data)) for data in photo_jpegs[:2]]
    bare = WatermarkDetector.load(tmp_path / "bare.pt").predict(images)
    wrapped = WatermarkDetector.load(tmp_path / "wrapped.pt").predict(images)
    assert bare.shape == (2,) and bare.dtype == np.float32
    np.testing.assert_array_equal(bare, wrapped)
    assert ((bare >= 0) & (bare <= 1)).all()


def test_pwatermark_is_softmax_index_zero(tmp_path: Path, network_state: dict[str, torch.Tensor]) -> None:
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    for bias, expected in (([3.0, 0.0], 1 / (1 + np.exp(-3.0))), ([0.0, 3.0], 1 / (1 + np.exp(3.0)))):
        state = dict(network_state)
        state["classifier.5.weight"] = torch.zeros(2, 256)
        state["classifier.5.bias"] = torch.tensor(bias)
        torch.save(state, tmp_path / "w.pt")
        np.testing.assert_allclose(WatermarkDetector.load(tmp_path / "w.pt").predict([image]), [expected], rtol=1e-5)


def test_missing_head_key_fails_strict_load(tmp_path: Path, network_state: dict[str, torch.Tensor]) -> None:
    state = {key: value for key, value in network_state.items() if key != "classifier.5.bias"}
    torch.save({"weights": state}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="classifier.5.bias"):
        WatermarkDetector.load(tmp_path / "w.pt")


def test_input_equals_the_published_torchvision_transform(photo_jpegs: list[bytes]) -> None:
    reference = transforms.Compose(
        [transforms.Resize((256, 256)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    for data in photo_jpegs:
        expected = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        ours = pixels_to_tensor(watermark_pixels(decode(data, draft=False))[None], IMAGENET_MEAN, IMAGENET_STD)[0]
        assert float((ours - expected).abs().max()) <= 1e-5
