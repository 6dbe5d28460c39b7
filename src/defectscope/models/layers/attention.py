"""Cross-attention fusion and the self-attention classification head of paper 000.

Paper 000 (Deep multimodal fusion of spectral and visual data for laser welding
defect classification), section 4.2.3 and 4.3:

- eq. 4: both inputs are token sequences, ``X_q [B, N_q, C_q]`` and ``X_kv [B, N_kv, C_kv]``;
- eq. 5-7: multi-head attention with ``Q = X_q W_Q``, ``K = X_kv W_K``,
  ``V = X_kv W_V``, ``A_i = softmax(Q_i K_i^T / sqrt(d_h)) V_i`` and output
  projection ``W_O`` back to ``C_q``;
- eq. 8: ``F_fused = LayerNorm(F_attn + X_q)``;
- eq. 12-13: a self-attention layer with LayerNorm + FFN over the fused tokens,
  global average pooling over tokens and a linear classifier.

``torch.nn.MultiheadAttention`` computes eq. 5-7 (with ``kdim``/``vdim`` for the
key/value side); these modules add the residual, normalisation and head.
"""

from __future__ import annotations

import torch
from torch import nn


class CrossAttentionFusion(nn.Module):
    """Multi-head cross-attention with residual + LayerNorm (paper 000, eq. 5-8).

    Args:
        query_dim: channels ``C_q`` of the query tokens (output has the same).
        kv_dim: channels ``C_kv`` of the key/value tokens.
        num_heads: heads ``h``; ``query_dim`` must be divisible by it.
        dropout: attention dropout.

    Forward:
        ``x_q``: ``[B, N_q, C_q]`` queries (e.g. image tokens).
        ``x_kv``: ``[B, N_kv, C_kv]`` keys/values (e.g. spectral channel tokens).
        returns ``(fused [B, N_q, C_q], attn [B, h, N_q, N_kv])``; each attention
        row sums to 1 over ``N_kv``.

    Raises:
        ValueError: wrong ranks or channel counts (the message gives the expected shape).
    """

    def __init__(self, query_dim: int, kv_dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if query_dim % num_heads:
            raise ValueError(f"query_dim {query_dim} is not divisible by num_heads {num_heads}")
        self.query_dim, self.kv_dim, self.num_heads = query_dim, kv_dim, num_heads
        self.attn = nn.MultiheadAttention(query_dim, num_heads, dropout=dropout, kdim=kv_dim, vdim=kv_dim, batch_first=True)
        self.norm = nn.LayerNorm(query_dim)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x_q.ndim != 3 or x_q.shape[-1] != self.query_dim:
            raise ValueError(f"queries: expected [B, N_q, {self.query_dim}], got {tuple(x_q.shape)}")
        if x_kv.ndim != 3 or x_kv.shape[-1] != self.kv_dim or x_kv.shape[0] != x_q.shape[0]:
            raise ValueError(f"keys/values: expected [{x_q.shape[0]}, N_kv, {self.kv_dim}], got {tuple(x_kv.shape)}")
        out, weights = self.attn(x_q, x_kv, x_kv, need_weights=True, average_attn_weights=False)
        return self.norm(out + x_q), weights


class SelfAttentionHead(nn.Module):
    """Self-attention layer + LayerNorm + FFN, token mean pooling, linear classifier (eq. 12-13).

    Args:
        dim: token channels ``d``.
        num_classes: classes ``C``.
        num_heads: heads of the self-attention.
        num_layers: stacked encoder layers (paper: 1).
        ffn_dim: hidden width of the FFN (default ``2 * dim``).
        dropout: dropout in attention/FFN and before the classifier.

    Forward:
        ``tokens``: ``[B, N, d]``; returns logits ``[B, C]`` (softmax of eq. 13 is
        applied by the loss / at prediction).
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int = 8, num_layers: int = 1,
                 ffn_dim: int | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, num_heads, ffn_dim or 2 * dim, dropout, batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoded, pooled feature ``f_global`` ``[B, d]`` (eq. 13, left)."""
        return self.encoder(tokens).mean(dim=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(self.forward_features(tokens)))


def feature_map_to_tokens(fmap: torch.Tensor) -> torch.Tensor:
    """Flatten a feature map ``[B, C, H, W]`` to tokens ``[B, H*W, C]`` (paper 000, eq. 4)."""
    return fmap.flatten(2).transpose(1, 2)
