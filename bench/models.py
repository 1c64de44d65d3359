"""The models the benchmarks train and time: the paper's MNIST MLP and a small character-level transformer."""

from __future__ import annotations

import torch
from torch import nn


def mlp(inputs: int = 64, hidden: int = 1000, classes: int = 10) -> nn.Module:
    """The paper's MNIST network: one hidden layer of 1000 ReLU units."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class CharTransformer(nn.Module):
    """A small GPT-style character language model (pre-norm blocks, learned positions)."""

    def __init__(self, vocab: int, dim: int = 128, layers: int = 2, heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        x = self.embed(idx) + self.pos[:t]
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))
