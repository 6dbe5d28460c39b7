"""Weld classifiers on (seam crop, spectra) pairs: the fusion model of paper 000 and its baselines.

Every model takes the same inputs, one pair per weld of a sample (section 4.2):

- ``images``: ``[B, W, 3, h, w]`` float in [0, 1], the seam crops (the first flipped vertically);
- ``spectra``: ``[B, W, C, T]`` float, min-max normalised, the selected channels;

and returns logits ``[B, K]``. The encoders are shared by the welds; the tokens of all welds of a
sample are concatenated before the classification head.

Registered names: ``weld_fusion`` (paper 000: vision encoder, spectral embedding, fusion switch,
self-attention head), ``weld_vision`` (vision-only), ``weld_dlinear`` (spectrum-only DLinear),
``weld_informer`` (spectrum-only Informer-style encoder with ProbSparse attention) and
``weld_inverted`` (the inverted-embedding encoder alone, iTransformer-like).
"""

from __future__ import annotations

import torch
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.layers.attention import SelfAttentionHead, feature_map_to_tokens
from defectscope.models.registry import register_model
from defectscope.models.weld_fusion.layers import (
    InformerEncoderLayer,
    InvertedEmbedding,
    SeriesDecomposition,
    VanillaEmbedding,
    build_fusion,
)


def _check_inputs(images: torch.Tensor | None, spectra: torch.Tensor | None, channels: int | None = None,
                  seq_len: int | None = None, feature_channels: int | None = None) -> None:
    if images is not None and (images.ndim != 5 or images.shape[2] not in (3, feature_channels)):
        raise ValueError(f"images: expected [B, W, 3, h, w] (or cached features [B, W, {feature_channels}, h', w']), "
                         f"got {tuple(images.shape)}")
    if spectra is not None:
        if spectra.ndim != 4:
            raise ValueError(f"spectra: expected [B, W, C, T], got {tuple(spectra.shape)}")
        if channels is not None and spectra.shape[2] != channels:
            raise ValueError(f"spectra: expected {channels} channels, got {spectra.shape[2]} (shape {tuple(spectra.shape)})")
        if seq_len is not None and spectra.shape[3] != seq_len:
            raise ValueError(f"spectra: expected T={seq_len} time steps, got {spectra.shape[3]}")
    if images is not None and spectra is not None and images.shape[:2] != spectra.shape[:2]:
        raise ValueError(f"images {tuple(images.shape[:2])} and spectra {tuple(spectra.shape[:2])} disagree on [B, W]")


class _VisionTokens(nn.Module):
    """Backbone feature map of each crop -> tokens ``[B*W, N, d]`` (eq. 4), ``N = h' * w'``.

    Inputs with ``backbone.out_channels`` channels instead of 3 are taken as cached feature maps
    ``[B, W, C_feat, h', w']`` of a frozen backbone (the CPU demo trains on them; see
    ``model.freeze_backbone``) and skip the backbone.
    """

    def __init__(self, backbone: str, dim: int, pretrained: bool, weights: str | None) -> None:
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.proj = nn.Linear(self.backbone.out_channels, dim)
        self.grid: tuple[int, int] = (0, 0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.flatten(0, 1)
        fmap = x if x.shape[1] == self.backbone.out_channels and x.shape[1] != 3 else self.backbone(x)
        self.grid = (int(fmap.shape[-2]), int(fmap.shape[-1]))
        return self.proj(feature_map_to_tokens(fmap))


@register_model("weld_fusion")
class WeldFusionNet(nn.Module):
    """Paper 000 (Fig. 9): vision encoder + spectral embedding + fusion + self-attention head.

    Args:
        num_classes: ``K``.
        channels: ``C`` spectral channels per weld (after selection).
        seq_len: ``T`` time steps.
        backbone: registry backbone of the vision encoder.
        fusion: ``v2s`` (default), ``s2v``, ``bidirectional``, ``add`` or ``concat``.
        embedding: ``inverted`` (eq. 3, default) or ``vanilla``.
        spectral_dim: ``D_s`` width of the spectral embedding (paper: 64/96/128).
        embed_dim: ``d`` token width of fusion and head.
        num_heads, num_layers, dropout: attention settings.
        pretrained, weights: backbone weights (see ``create_backbone``).

    Forward:
        ``images [B, W, 3, h, w]``, ``spectra [B, W, C, T]`` -> logits ``[B, K]``.
        :meth:`forward_with_attention` also returns the fusion's attention weights per weld,
        e.g. ``{"v2s": [B, W, heads, N, C]}`` for inverted embedding (rows sum to 1).

    Raises:
        ValueError: unknown fusion/embedding or input shapes that do not fit.
    """

    def __init__(self, num_classes: int, channels: int, seq_len: int = 560, backbone: str = "efficientnet_lite0",
                 fusion: str = "v2s", embedding: str = "inverted", spectral_dim: int = 96, embed_dim: int = 128,
                 num_heads: int = 4, num_layers: int = 1, dropout: float = 0.1, pretrained: bool = False,
                 weights: str | None = None) -> None:
        super().__init__()
        self.channels, self.seq_len, self.fusion_kind = channels, seq_len, fusion
        self.vision = _VisionTokens(backbone, embed_dim, pretrained, weights)
        if embedding == "inverted":
            self.spec_embed: nn.Module = InvertedEmbedding(seq_len, spectral_dim, dropout)
        elif embedding == "vanilla":
            self.spec_embed = VanillaEmbedding(channels, seq_len, spectral_dim, dropout)
        else:
            raise ValueError(f"unknown embedding {embedding!r}; choose inverted or vanilla")
        self.spec_proj = nn.Linear(spectral_dim, embed_dim)
        self.fusion = build_fusion(fusion, embed_dim, num_heads, 0.0)
        self.head = SelfAttentionHead(self.fusion.out_dim, num_classes, num_heads, num_layers, dropout=dropout)

    @property
    def grid(self) -> tuple[int, int]:
        """``(h', w')`` of the last vision feature map (image tokens are row-major over it)."""
        return self.vision.grid

    def forward_with_attention(self, images: torch.Tensor, spectra: torch.Tensor):
        _check_inputs(images, spectra, self.channels, self.seq_len, self.vision.backbone.out_channels)
        b, w = images.shape[:2]
        img = self.vision(images)  # [B*W, N, d]
        spec = self.spec_proj(self.spec_embed(spectra.flatten(0, 1)))  # [B*W, M, d]
        fused, attn = self.fusion(img, spec)
        tokens = fused.reshape(b, w * fused.shape[1], fused.shape[2])
        attn = {k: v.reshape(b, w, *v.shape[1:]) for k, v in attn.items()}
        return self.head(tokens), attn

    def forward(self, images: torch.Tensor, spectra: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(images, spectra)[0]


@register_model("weld_vision")
class WeldVisionOnly(nn.Module):
    """Vision-only baseline: backbone tokens of every crop -> self-attention head (spectra ignored).

    Forward: ``images [B, W, 3, h, w]`` (``spectra`` optional, unused) -> logits ``[B, K]``.
    """

    def __init__(self, num_classes: int, backbone: str = "efficientnet_lite0", embed_dim: int = 128, num_heads: int = 4,
                 num_layers: int = 1, dropout: float = 0.1, pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        self.vision = _VisionTokens(backbone, embed_dim, pretrained, weights)
        self.head = SelfAttentionHead(embed_dim, num_classes, num_heads, num_layers, dropout=dropout)

    def forward(self, images: torch.Tensor, spectra: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(images, None, feature_channels=self.vision.backbone.out_channels)
        b, w = images.shape[:2]
        tok = self.vision(images)
        return self.head(tok.reshape(b, w * tok.shape[1], tok.shape[2]))


@register_model("weld_dlinear")
class WeldDLinear(nn.Module):
    """Spectrum-only DLinear classifier (Zeng et al. 2023): decomposition, two linear maps ``T -> D``, linear classifier.

    Forward: ``spectra [B, W, C, T]`` (``images`` unused) -> logits ``[B, K]``.
    """

    def __init__(self, num_classes: int, channels: int, seq_len: int = 560, welds: int = 2, spectral_dim: int = 96,
                 kernel: int = 25, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels, self.seq_len = channels, seq_len
        self.decomp = SeriesDecomposition(kernel)
        self.seasonal = nn.Linear(seq_len, spectral_dim)
        self.trend = nn.Linear(seq_len, spectral_dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(welds * channels * spectral_dim, num_classes)

    def forward(self, images: torch.Tensor | None, spectra: torch.Tensor) -> torch.Tensor:
        _check_inputs(None, spectra, self.channels, self.seq_len)
        b = spectra.shape[0]
        s, t = self.decomp(spectra.flatten(0, 1))
        z = self.seasonal(s) + self.trend(t)  # [B*W, C, D]
        return self.classifier(self.drop(z.reshape(b, -1)))


@register_model("weld_informer")
class WeldInformer(nn.Module):
    """Spectrum-only Informer-style encoder (Zhou et al. 2021) as a classifier.

    Conv1d token embedding (one token per time step) + sinusoidal positions, ``num_layers`` encoder
    layers with ProbSparse self-attention and distilling, token mean pooling per weld, the welds'
    features concatenated, linear classifier.

    Forward: ``spectra [B, W, C, T]`` -> logits ``[B, K]``.
    """

    def __init__(self, num_classes: int, channels: int, seq_len: int = 560, welds: int = 2, embed_dim: int = 64,
                 num_heads: int = 4, num_layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        from defectscope.models.weld_fusion.layers import sinusoidal_positions

        self.channels, self.seq_len = channels, seq_len
        self.token = nn.Conv1d(channels, embed_dim, 3, padding=1, padding_mode="circular")
        self.register_buffer("pos", sinusoidal_positions(seq_len, embed_dim), persistent=False)
        self.layers = nn.Sequential(*[InformerEncoderLayer(embed_dim, num_heads, dropout, distil=i < num_layers - 1)
                                      for i in range(num_layers)])
        self.norm = nn.LayerNorm(embed_dim)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(welds * embed_dim, num_classes)

    def forward(self, images: torch.Tensor | None, spectra: torch.Tensor) -> torch.Tensor:
        _check_inputs(None, spectra, self.channels, self.seq_len)
        b = spectra.shape[0]
        x = self.token(spectra.flatten(0, 1)).transpose(1, 2) + self.pos
        x = self.norm(self.layers(x)).mean(1)
        return self.classifier(self.drop(x.reshape(b, -1)))


@register_model("weld_inverted")
class WeldInvertedEncoder(nn.Module):
    """Spectrum-only inverted-embedding encoder (iTransformer-like): eq. 3 tokens -> self-attention head.

    Forward: ``spectra [B, W, C, T]`` -> logits ``[B, K]`` (tokens of all welds' channels together).
    """

    def __init__(self, num_classes: int, channels: int, seq_len: int = 560, spectral_dim: int = 96, embed_dim: int = 128,
                 num_heads: int = 4, num_layers: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.channels, self.seq_len = channels, seq_len
        self.embed = InvertedEmbedding(seq_len, spectral_dim, dropout)
        self.proj = nn.Linear(spectral_dim, embed_dim)
        self.head = SelfAttentionHead(embed_dim, num_classes, num_heads, num_layers, dropout=dropout)

    def forward(self, images: torch.Tensor | None, spectra: torch.Tensor) -> torch.Tensor:
        _check_inputs(None, spectra, self.channels, self.seq_len)
        b, w, c, _ = spectra.shape
        tok = self.proj(self.embed(spectra.flatten(0, 1)))
        return self.head(tok.reshape(b, w * c, -1))


@register_model("weld_seam_unet")
def weld_seam_unet(base: int = 8, depth: int = 3) -> nn.Module:
    """The compact seam U-Net (:class:`defectscope.models.weld_fusion.layers.CompactUNet`)."""
    from defectscope.models.weld_fusion.layers import build_seam_unet

    return build_seam_unet(base, depth)


#: which inputs each registered weld model uses
MODALITIES = {"weld_fusion": ("image", "spectra"), "weld_vision": ("image",), "weld_dlinear": ("spectra",),
              "weld_informer": ("spectra",), "weld_inverted": ("spectra",),
              # the closed-form references (models/signal_stats, models/linear_probe)
              "weld_signal_stats": ("spectra",), "weld_image_probe": ("image",)}
