"""Aesthetic heads: published key names and shapes, a hand-computed forward pass, normalization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curate.models import AestheticPredictor, WeightsError

# (out, in) of layers.{0,2,4,6,7} of sac+logos+ava1-l14-linearMSE.pth, as published.
V2_SHAPES = {
    "layers.0": (1024, 768),
    "layers.2": (128, 1024),
    "layers.4": (64, 128),
    "layers.6": (16, 64),
    "layers.7": (1, 16),
}


def published_v2_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, (out_features, in_features) in V2_SHAPES.items():
        state_dict[f"{name}.weight"] = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        state_dict[f"{name}.bias"] = torch.randn(out_features, generator=generator)
    return state_dict


def hand_forward(state_dict: dict[str, torch.Tensor], embeddings: np.ndarray) -> np.ndarray:
    values = embeddings.astype(np.float64)
    for name in V2_SHAPES:  # no activations: five affine maps in a row
        values = values @ state_dict[f"{name}.weight"].double().numpy().T + state_dict[f"{name}.bias"].double().numpy()
    return values[:, 0]


@pytest.fixture()
def v2_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state_dict = published_v2_state_dict()
    torch.save(state_dict, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    return tmp_path / "sac+logos+ava1-l14-linearMSE.pth", state_dict


def test_published_v2_keys_and_shapes_load_strictly(v2_file: tuple[Path, dict]) -> None:
    path, state_dict = v2_file
    predictor = AestheticPredictor.load(path)
    assert set(predictor.module.state_dict()) == set(state_dict)
    assert {k: tuple(v.shape) for k, v in predictor.module.state_dict().items()} == {
        k: tuple(v.shape) for k, v in state_dict.items()
    }


def test_v2_matches_hand_computed_forward_on_normalized_input(v2_file: tuple[Path, dict]) -> None:
    path, state_dict = v2_file
    raw = np.random.default_rng(1).standard_normal((6, 768)).astype(np.float32) * 3.0
    expected = hand_forward(state_dict, raw / np.linalg.norm(raw, axis=1, keepdims=True))
    scores = AestheticPredictor.load(path).predict(raw)
    assert scores.dtype == np.float32 and scores.shape == (6,)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)


def test_zero_embedding_stays_zero(v2_file: tuple[Path, dict]) -> None:
    path, state_dict = v2_file
    scores = AestheticPredictor.load(path).predict(np.zeros((2, 768), dtype=np.float32))
    np.testing.assert_allclose(scores, hand_forward(state_dict, np.zeros((2, 768))), rtol=1e-5, atol=1e-5)
    assert np.isfinite(scores).all()


def test_v1_linear_head_loads_and_scores(tmp_path: Path, unit_vectors: np.ndarray) -> None:
    weight, bias = torch.randn(1, 768), torch.tensor([4.5])
    torch.save({"weight": weight, "bias": bias}, tmp_path / "sa_0_4_vit_l_14_linear.pth")
    predictor = AestheticPredictor.load(tmp_path / "sa_0_4_vit_l_14_linear.pth", head="v1")
    expected = unit_vectors.astype(np.float64) @ weight.double().numpy().T + 4.5
    np.testing.assert_allclose(predictor.predict(unit_vectors * 2.0), expected[:, 0], rtol=1e-4, atol=1e-4)


def test_v1_head_for_512_d_embeddings(tmp_path: Path) -> None:
    torch.save({"weight": torch.randn(1, 512), "bias": torch.zeros(1)}, tmp_path / "b32.pth")
    predictor = AestheticPredictor.load(tmp_path / "b32.pth", head="v1")
    assert predictor.predict(np.ones((3, 512), dtype=np.float32)).shape == (3,)
    with pytest.raises(ValueError, match="512"):
        predictor.predict(np.ones((3, 768), dtype=np.float32))


def test_wrong_head_for_the_file_raises(v2_file: tuple[Path, dict]) -> None:
    with pytest.raises(WeightsError, match="--aesthetic-head"):
        AestheticPredictor.load(v2_file[0], head="v1")
    with pytest.raises(ValueError, match="--aesthetic-head"):
        AestheticPredictor.load(v2_file[0], head="v3")


def test_missing_key_fails_strict_load(tmp_path: Path) -> None:
    state_dict = published_v2_state_dict()
    del state_dict["layers.7.bias"]
    torch.save(state_dict, tmp_path / "partial.pth")
    with pytest.raises(WeightsError, match="layers.7.bias"):
        AestheticPredictor.load(tmp_path / "partial.pth")
