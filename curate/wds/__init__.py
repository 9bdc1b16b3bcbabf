"""WebDataset: the one tar writer, reading img2dataset/WebDataset input, verify."""
