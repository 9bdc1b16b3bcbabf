"""curate: LAION-style image-text metadata to WebDataset shards for text-to-image training."""

__version__ = "0.1.0"
