"""CLIP ViT-L/14 text tower (the same OpenAI weights as the image tower): L2-normalized embeddings of captions."""

from __future__ import annotations

from typing import cast

import numpy as np
import open_clip
import torch
from open_clip.tokenizer import SimpleTokenizer
from torch import nn

CONTEXT_LENGTH = 77  # CLIP's text context: longer captions are truncated, the last token kept as end-of-text
# Captions per text batch; each batch is cut to its longest caption, so length-sorted batches stay short.
TEXT_BATCH = 256
# Only the first 77 tokens count, and every word holds at least one: the tokenizer sees a caption's first 77 words,
# each cut at WORD_CHARS (a CLIP token is at most a few dozen characters), so a hostile megabyte caption costs what a
# sentence costs (BPE is quadratic in a word's length: one 1 MB word took 1-2.5 s).
WORD_CHARS = 4096


def bounded(caption: str) -> str:
    """The part of a caption its first 77 CLIP tokens come from."""
    return " ".join(word[:WORD_CHARS] for word in caption.split(maxsplit=CONTEXT_LENGTH)[:CONTEXT_LENGTH])


class ClipTextTower(nn.Module):
    """open_clip CLIP's text transformer, run on only as many positions as the longest caption of a batch needs.

    The attention mask is causal, so the end-of-text token's output depends only on the tokens before it: cutting the
    padding after the longest caption gives the same embedding as open_clip's `encode_text` on all 77 positions.
    """

    def __init__(self, model: open_clip.CLIP) -> None:
        super().__init__()
        if getattr(model, "text_pool_type", "argmax") != "argmax":
            raise ValueError(f"CLIP text tower: pooling {model.text_pool_type!r} is not the OpenAI model's argmax")
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)

    @property
    def output_dim(self) -> int:
        projection = self.text_projection
        return int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalized text features [N, output_dim] of token ids [N, <= 77] (end-of-text is the largest id)."""
        ends = tokens.argmax(dim=-1)
        length = int(ends.max()) + 1
        positions, mask = cast(torch.Tensor, self.positional_embedding), cast(torch.Tensor, self.attn_mask)
        x = self.token_embedding(tokens[:, :length]) + positions[:length]
        x = self.transformer(x, attn_mask=mask[:length, :length])
        x = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), ends]
        return self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection


class ClipTextEncoder:
    """Captions to L2-normalized float32 embeddings with open_clip's tokenizer (lowercased, cleaned, 77 tokens)."""

    def __init__(self, tower: ClipTextTower, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.tower = tower.eval().to(self.device)  # bf16 blocks where ClipEncoder made them so, fp32 elsewhere
        self.tokenizer = SimpleTokenizer(context_length=CONTEXT_LENGTH)

    @property
    def embed_dim(self) -> int:
        return self.tower.output_dim

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """Token ids [N, 77] on the CPU, truncated to CLIP's context."""
        return self.tokenizer([bounded(caption) for caption in captions])

    def embed_rows(self, tokens: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        """`embed` of the token rows at the given indices."""
        return self.embed(tokens[torch.as_tensor(rows, dtype=torch.long)])

    @torch.inference_mode()
    def embed(self, tokens: torch.Tensor, batch_size: int = TEXT_BATCH) -> torch.Tensor:
        """L2-normalized float32 embeddings, on the device, of token ids; batches run shortest captions first."""
        if not len(tokens):
            return torch.zeros((0, self.embed_dim), device=self.device)
        order = torch.argsort(tokens.argmax(dim=-1), stable=True)
        out = torch.empty((len(tokens), self.embed_dim), device=self.device)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            features = self.tower(tokens[rows].to(self.device, non_blocking=True))
            out[rows.to(self.device)] = torch.nn.functional.normalize(features.float(), dim=-1)
        return out

    def encode(self, captions: list[str]) -> np.ndarray:
        """L2-normalized float32 embeddings [N, embed_dim] of captions."""
        return self.embed(self.tokenize(captions)).cpu().numpy()


@torch.inference_mode()
def paired_cosines(images: list[torch.Tensor], image_index: np.ndarray, texts: torch.Tensor) -> np.ndarray:
    """The CLIP score: cosine of the L2-normalized image embeddings (batches, concatenated) at image_index with the
    text embeddings [len(image_index), D], row by row, as float32."""
    if not len(image_index):
        return np.zeros(0, dtype=np.float32)
    chosen = torch.cat(images)[torch.as_tensor(image_index, device=images[0].device)].float()
    return (chosen * texts.to(chosen.device).float()).sum(dim=-1).cpu().numpy()
