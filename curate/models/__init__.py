"""Scoring models: CLIP ViT-L/14, LAION aesthetic predictor, LAION watermark detector (the one place torch lives)."""

from curate.models.aesthetic import AestheticPredictor
from curate.models.clip import ClipEncoder
from curate.models.watermark import WatermarkDetector
from curate.models.weights import WeightsError

__all__ = ["AestheticPredictor", "ClipEncoder", "WatermarkDetector", "WeightsError"]
