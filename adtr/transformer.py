"""ADTR's reconstruction transformer (You et al., ICONIP 2022, section 3.2).

An encoder reads the feature tokens; a decoder whose input is a learnable query embedding
(not the features) cross-attends to the encoder output and emits the reconstruction. The
query keeps the model from learning an identity map. A learned position embedding is
added to queries and keys in every attention layer, as in DETR. Layers are post-norm.
All tensors are batch-first: (B, K, D) with K tokens of width D.

Attention runs through `torch.nn.functional.scaled_dot_product_attention` (a fused kernel on
CPUs). Dropout on the attention weights is off by default: on 2 cores it took 40% of a
training step (a Bernoulli draw per entry of every (K, K) attention matrix) and forces the
unfused path; dropout on the residual branches stays (docs/design.md, "Training speed").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (checkpoints of
    either load into the other) over the fused scaled-dot-product kernel.

    query (B, Kq, D), key (B, Kk, D), value (B, Kk, D) -> (B, Kq, D).
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """mask: (Kq, Kk) bool, True where a query may attend to a key; None: everywhere."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        b, kq, d = query.shape

        def heads(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w, bias).unflatten(-1, (self.heads, d // self.heads)).transpose(1, 2)  # (B, h, K, d/h)

        out = F.scaled_dot_product_attention(
            heads(query, w_q, b_q),
            heads(key, w_k, b_k),
            heads(value, w_v, b_v),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, kq, d))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.attn = Attention(dim, heads, attention_dropout)
        self.ffn = _feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.drop(self.attn(q, k, x, mask)))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, attention_dropout: float = 0.0):
        super().__init__()
        self.self_attn = Attention(dim, heads, attention_dropout)
        self.cross_attn = Attention(dim, heads, attention_dropout)
        self.ffn = _feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = k = tgt + pos
        tgt = self.norm1(tgt + self.drop(self.self_attn(q, k, tgt, mask)))
        tgt = tgt.expand(memory.shape[0], -1, -1)  # a query shared by the batch (B = 1) meets each image here
        attended = self.cross_attn(tgt + pos, memory + pos, memory, mask)
        tgt = self.norm2(tgt + self.drop(attended))
        return self.norm3(tgt + self.ffn(tgt))


class LayerQueryDecoderLayer(nn.Module):
    """A decoder layer that starts from its own learnable query (UniAD's layer-wise query, You et
    al., NeurIPS 2022, section 3.3): the query attends to the encoder output, then to the
    previous layer's output, then a feed-forward block. No residual path carries the previous
    layer's output, so reaching it costs attention: (B, K, D) -> (B, K, D)."""

    def __init__(self, num_tokens: int, dim: int, heads: int, ffn_dim: int, dropout: float,
                 attention_dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.query_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        nn.init.normal_(self.query_embed, std=0.02)
        self.memory_attn = Attention(dim, heads, attention_dropout)
        self.previous_attn = Attention(dim, heads, attention_dropout)
        self.ffn = _feed_forward(dim, ffn_dim, dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        tgt = self.query_embed.expand(memory.shape[0], -1, -1)
        tgt = self.norm1(tgt + self.drop(self.memory_attn(tgt + pos, memory + pos, memory, mask)))
        tgt = self.norm2(tgt + self.drop(self.previous_attn(tgt + pos, previous + pos, previous, mask)))
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
        attention_dropout: float = 0.0,
        grid: tuple[int, int] | None = None,
        neighbor_mask: int = 0,
        layer_query: bool = False,
    ):
        """layer_query: every decoder layer starts from its own learnable query
        (LayerQueryDecoderLayer) instead of the previous layer's output; needs use_query.

        neighbor_mask > 0 (needs grid = (h, w), h * w = num_tokens): no token attends to the
        neighbor_mask x neighbor_mask window of grid positions around its own, so that no
        layer can copy a position's input to its output (UniAD, You et al., NeurIPS 2022,
        "neighbor masked attention"). ValueError with use_query False: the decoder's input is
        then the encoder output, whose residual path carries each token's own features past
        the mask (measured: the same validation loss as without it, docs/design.md)."""
        super().__init__()
        mask = None
        if layer_query and not use_query:
            raise ValueError("layer_query is a learnable query per decoder layer: it needs use_query")
        if neighbor_mask > 0 and not use_query:
            raise ValueError("neighbor_mask needs the learnable query (use_query): without it the decoder "
                             "reads each token's own features through its residual path, past the mask")  # fmt: skip
        if neighbor_mask > 0:
            if grid is None or grid[0] * grid[1] != num_tokens:
                raise ValueError(f"neighbor_mask needs the token grid; got {grid} for {num_tokens} tokens")
            mask = neighbor_attention_mask(grid, neighbor_mask)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
        # with layer_query each decoder layer holds its own query (the first reads the encoder output)
        self.query_embed = nn.Parameter(torch.empty(1, num_tokens, dim)) if use_query and not layer_query else None
        nn.init.normal_(self.pos_embed, std=0.02)
        if self.query_embed is not None:
            nn.init.normal_(self.query_embed, std=0.02)
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, heads, ffn_dim, dropout, attention_dropout) for _ in range(num_encoder_layers)
        )
        if layer_query:
            self.decoder = nn.ModuleList(
                LayerQueryDecoderLayer(num_tokens, dim, heads, ffn_dim, dropout, attention_dropout)
                for _ in range(num_decoder_layers)
            )
        else:
            self.decoder = nn.ModuleList(
                DecoderLayer(dim, heads, ffn_dim, dropout, attention_dropout) for _ in range(num_decoder_layers)
            )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = self.pos_embed
        memory = tokens
        mask = self.attention_mask
        for layer in self.encoder:
            memory = layer(memory, pos, mask)
        if self.query_embed is not None:
            # Outside training the first decoder layer's self-attention over the query is the same
            # for every image: it runs once, on the (1, K, D) query (an exported graph folds it
            # into a constant; about 5% of the default graph's time). Training expands the query first,
            # so that dropout differs per image.
            tgt = self.query_embed.expand(tokens.shape[0], -1, -1) if self.training else self.query_embed
        else:  # no-query ablation: the features it must reconstruct; layer_query: the first layer's "previous"
            tgt = memory
        for layer in self.decoder:
            tgt = layer(tgt, memory, pos, mask)
        return tgt


def neighbor_attention_mask(grid: tuple[int, int], size: int) -> torch.Tensor:
    """(h*w, h*w) bool, True where token j lies OUTSIDE the size x size window centred on token i
    (row-major grid positions): the attention UniAD allows."""
    h, w = grid
    rows = torch.arange(h * w) // w
    cols = torch.arange(h * w) % w
    r = size // 2
    near = ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)
    return ~near
