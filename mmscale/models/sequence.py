"""Sequence models for next-item prediction: a SASRec-style causal encoder and MP4SR's pieces.

Histories are left-padded (PAD = -1) with the most recent item last, so a sequence's
representation is always the output at the last position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU mask takes 16 random bits per element from 64-bit random words.

    torch's CPU dropout draws each element's Bernoulli separately (twice the forward and backward time of this one
    here, where dropout was a third of an MP4SR step). p is rounded to a multiple of 2^-16 and the kept values are
    scaled by the rounded keep rate, so the expectation is unchanged. Other devices use torch's fused dropout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        dropped = round(self.p * 65536)
        if dropped == 65536:
            return x * 0.0
        words = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        keep = words.view(torch.int16)[: x.numel()].view(x.shape) >= dropped - 32768
        return x * keep.to(x.dtype).mul_(65536 / (65536 - dropped))


class CausalSequenceEncoder(nn.Module):
    """Positional embeddings, LayerNorm and dropout, then a causal transformer (SASRec).

    Only the last position's output is used, so the last layer computes only that position: its query,
    attention row and feed-forward (keys and values still come from every position). The other rows of the
    last layer were about half the encoder's work on ml100k; the output is the full stack's last row.
    """

    def __init__(self, hidden: int, layers: int, heads: int, dropout: float, max_len: int):
        super().__init__()
        self.position = nn.Embedding(max_len, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = Dropout(dropout)
        layer = nn.TransformerEncoderLayer(hidden, heads, 4 * hidden, dropout, activation="gelu", batch_first=True, norm_first=False)
        layer.dropout, layer.dropout1, layer.dropout2 = Dropout(dropout), Dropout(dropout), Dropout(dropout)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        causal = torch.triu(torch.ones(max_len, max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, inputs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """inputs [B, L, H] item vectors; valid [B, L] True at real items -> [B, H] (last position)."""
        length = inputs.shape[1]
        x = inputs + self.position.weight[:length]
        x = self.dropout(self.norm(x)) * valid.unsqueeze(-1)
        # Left padding: a padded position may attend only to itself, so no row is fully masked.
        mask = self.causal_mask[:length, :length].unsqueeze(0) | ~valid.unsqueeze(1)
        mask = mask & ~torch.eye(length, dtype=torch.bool, device=x.device)
        *lower, last = self.transformer.layers
        mask = mask.repeat_interleave(last.self_attn.num_heads, dim=0)
        for layer in lower:
            x = layer(x, src_mask=mask)
        return self._last_row(last, x, mask[:, -1:])

    @staticmethod
    def _last_row(layer: nn.TransformerEncoderLayer, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`layer` (post-norm, as built above) at the last position only: [B, L, H] -> [B, H]."""
        query = x[:, -1:]
        attended = layer.self_attn(query, x, x, attn_mask=mask, need_weights=False)[0]
        h = layer.norm1(query + layer.dropout1(attended))
        h = layer.norm2(h + layer.dropout2(layer.linear2(layer.dropout(layer.activation(layer.linear1(h))))))
        return h[:, 0]


class AttentionPooling(nn.Module):
    """Pools a set of vectors (sentence embeddings, image tokens) into one, weights from a small MLP."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """vectors [..., S, D], mask [..., S] -> [..., D]; an all-masked set pools to zeros."""
        logits = self.score(vectors).squeeze(-1).masked_fill(~mask, torch.finfo(vectors.dtype).min)
        weights = torch.softmax(logits, dim=-1) * mask.any(-1, keepdim=True)
        # A batched matmul: never materialises the weighted [..., S, D] copy of every item's set.
        return (weights.unsqueeze(-2) @ vectors).squeeze(-2)


class MoEAdaptor(nn.Module):
    """n experts (linear + LayerNorm) over the dropped-out input, mixed by a softmax gate over the input.

    The experts run as one [dim_in, n * dim_out] matmul, and they share one dropout mask: the
    adaptor is applied to every catalogue item each step, and per-expert masks over the input
    (n times the random draws) took about a third of a CPU step on ml100k.
    """

    def __init__(self, dim_in: int, dim_out: int, experts: int, dropout: float):
        super().__init__()
        self.experts, self.dim_out = experts, dim_out
        self.dropout = Dropout(dropout)
        self.proj = nn.Linear(dim_in, experts * dim_out)
        self.norm_weight = nn.Parameter(torch.ones(experts, dim_out))
        self.norm_bias = nn.Parameter(torch.zeros(experts, dim_out))
        self.gate = nn.Linear(dim_in, experts, bias=False)
        nn.init.zeros_(self.gate.weight)  # start as an even mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = torch.softmax(self.gate(x), dim=-1)
        outputs = self.proj(self.dropout(x)).unflatten(-1, (self.experts, self.dim_out))
        outputs = F.layer_norm(outputs, (self.dim_out,), eps=1e-12) * self.norm_weight + self.norm_bias
        return (gates.unsqueeze(-2) @ outputs).squeeze(-2)


def complementary_mixup(text: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, ratio, draws: torch.Tensor):
    """Swaps the two modalities at the real positions whose draw falls under the ratio.

    text, image [B, L, H]; valid [B, L]; ratio a float or [B, 1] per sequence; draws [B, L]
    uniforms. Returns (text-led, image-led) sequences: where swapped the first holds the image
    feature and the second the text feature, elsewhere the other way round, so the two are
    complementary at every position. Padding is never swapped; a ratio of 0 leaves both pure.
    """
    swap = ((draws < ratio) & valid).unsqueeze(-1)
    return torch.where(swap, image, text), torch.where(swap, text, image)


def random_item_drop(history: torch.Tensor, ratio, draws: torch.Tensor, pad: int = -1) -> torch.Tensor:
    """Drops each real item whose draw falls under the ratio (the most recent is always kept)
    and re-packs the survivors against the right edge in their order.

    history [B, L] left-padded; ratio a float or [B, 1]; draws [B, L] uniforms.
    """
    valid = history != pad
    keep = valid & (draws >= ratio)
    keep[:, -1] = valid[:, -1]
    # A stable sort puts dropped and padding positions first and the survivors after them, in order.
    order = torch.sort(keep.int(), dim=1, stable=True).indices
    return torch.where(keep.gather(1, order), history.gather(1, order), torch.full_like(history, pad))
