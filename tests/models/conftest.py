"""Tiny weight files of the real architectures, written once per test session."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
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
