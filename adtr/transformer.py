"""ADTR's reconstruction transformer (You et al., ICONIP 2022, section 3.2).

An encoder reads the feature tokens; a decoder whose input is a learnable query embedding
(not the features) cross-attends to the encoder output and emits the reconstruction. The
query keeps the model from learning an identity map. A learned position embedding is
added to queries and keys in every attention layer, as in DETR. Layers are post-norm.
All tensors are batch-first: (B, K, D) with K tokens of width D.
"""

from __future__ import annotations

import torch
from torch import nn


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.drop(self.attn(q, k, x, need_weights=False)[0]))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attended = self.cross_attn(tgt + pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop(attended))
        return self.norm3(tgt + self.ffn(tgt))


def _feed_forward(dim: int, ffn_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim), nn.Dropout(dropout)
    )


class ReconstructionTransformer(nn.Module):
    """Encoder over feature tokens, decoder over a learnable query: (B, K, D) -> (B, K, D)."""

    def __init__(
        self,
        num_tokens: int,
        dim: int,
        heads: int,
        ffn_dim: int,
        num_encoder_layers: int,
        num_decoder_layers: int,
        dropout: float,
        use_query: bool = True,
    ):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        self.query_embed = nn.Parameter(torch.empty(1, num_tokens, dim)) if use_query else None
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.query_embed is not None:
            nn.init.normal_(self.query_embed, std=0.02)
        self.encoder = nn.ModuleList(EncoderLayer(dim, heads, ffn_dim, dropout) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim, heads, ffn_dim, dropout) for _ in range(num_decoder_layers))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos)
        if self.query_embed is not None:
            tgt = self.query_embed.expand(tokens.shape[0], -1, -1)
        else:
            tgt = memory  # ablation: the decoder sees the features it must reconstruct
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos)
        return tgt
