"""Building blocks of the weld fusion model (paper 000, sections 4.1.2-4.2.3).

- :class:`CompactUNet`: the compact weld-seam U-Net of Fig. 7;
- :class:`InvertedEmbedding` (eq. 3, one token per channel) and :class:`VanillaEmbedding`
  (one token per time step);
- the fusion switch (:func:`build_fusion`): vision-to-spectrum cross-attention (eq. 4-8, default),
  spectrum-to-vision, bidirectional (eq. 9), element-wise addition (eq. 10), channel concatenation
  (eq. 11). Every fusion module maps image tokens ``[B, N, d]`` and spectral tokens ``[B, M, d]`` to
  fused tokens ``[B, N', out_dim]`` plus a dict of attention weights (rows sum to 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from defectscope.models.layers.attention import CrossAttentionFusion

FUSIONS = ("v2s", "s2v", "bidirectional", "add", "concat")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two (conv 3x3, stride 1, padding 1) + BatchNorm + ReLU layers (paper 000 Fig. 7 Conv Block)."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class CompactUNet(nn.Module):
    """A compact U-Net (Ronneberger et al. 2015) for binary weld-seam masks (paper 000 section 4.1.2, Fig. 7).

    Encoder: ``depth`` conv blocks with ``base * 2**i`` channels and 2x2 max-pooling; decoder:
    transposed-conv upsampling, skip concatenation, conv blocks; a 1x1 conv to one logit. About 0.1 M
    parameters at ``base=8, depth=3``: the seam is a large, simple structure and a CPU must train it in
    seconds.

    Forward:
        ``x``: ``[B, 3, H, W]`` in [0, 1], H and W divisible by ``2**depth``; returns logits ``[B, 1, H, W]``.

    Raises:
        ValueError: H or W not divisible by ``2**depth``.
    """

    def __init__(self, base: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.depth = depth
        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_conv_block(3 if i == 0 else chans[i - 1], chans[i]) for i in range(depth)])
        self.bottom = _conv_block(chans[depth - 1], chans[depth])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, 2) for i in reversed(range(depth))])
        self.dec = nn.ModuleList([_conv_block(2 * chans[i], chans[i]) for i in reversed(range(depth))])
        self.out = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2**self.depth
        if x.ndim != 4 or x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"seam U-Net: expected [B, 3, H, W] with H, W divisible by {f}, got {tuple(x.shape)}")
        x = (x - 0.5) / 0.25
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottom(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return self.out(x)


def build_seam_unet(base: int = 8, depth: int = 3) -> nn.Module:
    """The compact seam U-Net (:class:`CompactUNet`), random init."""
    return CompactUNet(base, depth)


class InvertedEmbedding(nn.Module):
    """Inverted embedding (paper 000 eq. 3, Liu et al. 2023): each channel's whole series becomes one token.

    Args:
        seq_len: ``T`` time steps.
        dim: ``D_s`` token width.
        dropout: dropout on the tokens.

    Forward:
        ``x``: ``[B, C, T]`` -> ``[B, C, D_s]`` (``Linear(T -> D_s)`` shared by all channels).
    """

    def __init__(self, seq_len: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(seq_len, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.proj.in_features:
            raise ValueError(f"spectra: expected [B, C, {self.proj.in_features}], got {tuple(x.shape)}")
        return self.drop(self.proj(x))


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """Transformer positional encoding ``[length, dim]`` (Vaswani et al. 2017)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe


class VanillaEmbedding(nn.Module):
    """Vanilla temporal embedding: one token per time step, ``Linear(C -> D_s)`` + sinusoidal positions.

    Forward:
        ``x``: ``[B, C, T]`` -> ``[B, T, D_s]``.
    """

    def __init__(self, channels: int, seq_len: int, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, dim)
        self.register_buffer("pos", sinusoidal_positions(seq_len, dim), persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.proj.in_features:
            raise ValueError(f"spectra: expected [B, {self.proj.in_features}, T], got {tuple(x.shape)}")
        return self.drop(self.proj(x.transpose(1, 2)) + self.pos[: x.shape[-1]])


class _Fusion(nn.Module):
    out_dim: int


class VisionToSpectrumFusion(_Fusion):
    """Image tokens query spectral tokens (paper 000 eq. 4-8, the default).

    Forward: ``img [B, N, d]``, ``spec [B, M, d]`` -> ``(fused [B, N, d], {"v2s": [B, h, N, M]})``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ca = CrossAttentionFusion(dim, dim, num_heads, dropout)
        self.out_dim = dim

    def forward(self, img: torch.Tensor, spec: torch.Tensor):
        fused, attn = self.ca(img, spec)
        return fused, {"v2s": attn}


class SpectrumToVisionFusion(_Fusion):
    """Spectral tokens query image tokens (paper 000 section 4.2.3, "spectrum-to-vision").

    Forward: ``img [B, N, d]``, ``spec [B, M, d]`` -> ``(fused [B, M, d], {"s2v": [B, h, M, N]})``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ca = CrossAttentionFusion(dim, dim, num_heads, dropout)
        self.out_dim = dim

    def forward(self, img: torch.Tensor, spec: torch.Tensor):
        fused, attn = self.ca(spec, img)
        return fused, {"s2v": attn}


class BidirectionalFusion(_Fusion):
    """Eq. 9: ``CrossAttn(img <- spec) + CrossAttn(spec <- img)``.

    The two terms have ``N`` and ``M`` tokens; the sum is taken by broadcasting the token mean of the
    spectrum-to-vision term over the ``N`` image tokens (the paper leaves the alignment open).

    Forward: -> ``(fused [B, N, d], {"v2s": [B, h, N, M], "s2v": [B, h, M, N]})``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.v2s = CrossAttentionFusion(dim, dim, num_heads, dropout)
        self.s2v = CrossAttentionFusion(dim, dim, num_heads, dropout)
        self.out_dim = dim

    def forward(self, img: torch.Tensor, spec: torch.Tensor):
        a, wa = self.v2s(img, spec)
        b, wb = self.s2v(spec, img)
        return a + b.mean(1, keepdim=True), {"v2s": wa, "s2v": wb}


class AddFusion(_Fusion):
    """Eq. 10, element-wise addition; the spectral tokens are mean-pooled and broadcast over the image tokens.

    ``num_heads`` and ``dropout`` are accepted for :func:`build_fusion`'s uniform call and unused
    (the operation has no parameters).

    Forward: -> ``(fused [B, N, d], {})``.
    """

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, img: torch.Tensor, spec: torch.Tensor):
        return img + spec.mean(1, keepdim=True), {}


class ConcatFusion(_Fusion):
    """Eq. 11, channel concatenation ``[X_img, X_spec]`` -> ``[B, N, 2d]`` (spectral tokens mean-pooled, broadcast).

    ``num_heads`` and ``dropout`` are accepted for :func:`build_fusion`'s uniform call and unused.

    Forward: -> ``(fused [B, N, 2d], {})``.
    """

    def __init__(self, dim: int, num_heads: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.out_dim = 2 * dim

    def forward(self, img: torch.Tensor, spec: torch.Tensor):
        return torch.cat([img, spec.mean(1, keepdim=True).expand(-1, img.shape[1], -1)], dim=-1), {}


def build_fusion(kind: str, dim: int, num_heads: int, dropout: float = 0.0) -> _Fusion:
    """The fusion module ``kind`` in :data:`FUSIONS`.

    Raises:
        ValueError: unknown kind.
    """
    table = {"v2s": VisionToSpectrumFusion, "s2v": SpectrumToVisionFusion, "bidirectional": BidirectionalFusion,
             "add": AddFusion, "concat": ConcatFusion}
    if kind not in table:
        raise ValueError(f"unknown fusion {kind!r}; choose one of {FUSIONS}")
    return table[kind](dim, num_heads, dropout)


class ProbSparseSelfAttention(nn.Module):
    """ProbSparse self-attention of Informer (Zhou et al. 2021, eq. 3-4).

    Only the ``u = c * ceil(ln L)`` queries with the largest sparsity measure
    ``M(q, K) = max_j(q k_j / sqrt(d)) - mean_j(q k_j / sqrt(d))`` (estimated on ``c * ceil(ln L)``
    sampled keys) attend; the other queries output the mean of the values. Sampling is random in
    training and evenly spaced in eval mode (deterministic prediction).

    Args:
        dim: token width; ``num_heads`` heads; ``factor`` the constant ``c``.

    Forward:
        ``x``: ``[B, L, dim]`` -> ``[B, L, dim]``.
    """

    def __init__(self, dim: int, num_heads: int = 4, factor: int = 5, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.h, self.dh, self.factor = num_heads, dim // num_heads, factor
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)  # [B, h, L, dh] each
        u = min(length, self.factor * math.ceil(math.log(max(length, 2))))
        if self.training:
            idx = torch.randint(length, (length, u), device=x.device)
        else:
            idx = (torch.linspace(0, length - 1, u, device=x.device).round().long()[None] + torch.arange(length, device=x.device)[:, None]) % length
        q = q / math.sqrt(self.dh)
        # The sparsity measure only chooses which queries attend (top-k indices carry no gradient), so it
        # is computed without autograd; its sampled scores q_i k_j / sqrt(d) are read from one score
        # matmul, far cheaper on a CPU than gathering a [B, h, L, u, dh] tensor of sampled keys.
        with torch.no_grad():
            qk_sample = (q @ k.transpose(-1, -2)).gather(-1, idx.expand(b, self.h, length, u))  # [B, h, L, u]
            sparsity = qk_sample.max(-1).values - qk_sample.mean(-1)
            top = sparsity.topk(u, dim=-1).indices  # [B, h, u]
        q_top = torch.gather(q, 2, top[..., None].expand(-1, -1, -1, self.dh))
        attn = self.drop(torch.softmax(q_top @ k.transpose(-1, -2), dim=-1))  # [B, h, u, L]
        ctx = v.mean(2, keepdim=True).expand(-1, -1, length, -1).clone()
        ctx.scatter_(2, top[..., None].expand(-1, -1, -1, self.dh), attn @ v)
        return self.out(ctx.transpose(1, 2).reshape(b, length, -1))


class InformerEncoderLayer(nn.Module):
    """ProbSparse attention + FFN (post-norm), followed by Informer's distilling (conv, ELU, max-pool /2).

    Forward: ``[B, L, d]`` -> ``[B, ceil(L/2), d]`` (``distil=True``) or ``[B, L, d]``.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, distil: bool = True) -> None:
        super().__init__()
        self.attn = ProbSparseSelfAttention(dim, num_heads, dropout=dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.drop = nn.Dropout(dropout)
        self.distil = nn.Sequential(nn.Conv1d(dim, dim, 3, padding=1, padding_mode="circular"), nn.BatchNorm1d(dim),
                                    nn.ELU(), nn.MaxPool1d(3, 2, 1)) if distil else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        x = self.norm2(x + self.drop(self.ffn(x)))
        if self.distil is not None:
            x = self.distil(x.transpose(1, 2)).transpose(1, 2)
        return x


class SeriesDecomposition(nn.Module):
    """DLinear's decomposition (Zeng et al. 2023): trend = moving average (edge-padded), seasonal = rest.

    Forward: ``[B, C, T]`` -> ``(seasonal, trend)``, both ``[B, C, T]``.
    """

    def __init__(self, kernel: int = 25) -> None:
        super().__init__()
        self.kernel = kernel
        self.pool = nn.AvgPool1d(kernel, stride=1)

    def forward(self, x: torch.Tensor):
        front = x[..., :1].expand(-1, -1, (self.kernel - 1) // 2)
        back = x[..., -1:].expand(-1, -1, self.kernel // 2)
        trend = self.pool(torch.cat([front, x, back], dim=-1))
        return x - trend, trend
