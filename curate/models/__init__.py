"""Scoring models: CLIP ViT-L/14, LAION aesthetic predictor, watermark and NSFW detectors (torch lives here only)."""

from curate.models.aesthetic import AestheticPredictor
from curate.models.clip import ClipEncoder
from curate.models.safety import SafetyDetector
from curate.models.watermark import WatermarkDetector
from curate.models.weights import WeightsError

__all__ = ["AestheticPredictor", "ClipEncoder", "SafetyDetector", "WatermarkDetector", "WeightsError"]
