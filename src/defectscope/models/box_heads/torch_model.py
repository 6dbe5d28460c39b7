"""Backbone features + class head + box head (paper 002, section III-C to III-E, Fig. 4 and 5).

:class:`SlotDetector` maps images ``[B, 3, H, W]`` in [0, 1] to ``K`` slots, each a class
distribution and a box:

- ``mode="single"`` (section III-C, Fig. 4): ``K = 1``; ``C`` class logits (softmax)
  and 4 box numbers.
- ``mode="slots"`` (section III-D, Fig. 5, and our set-prediction variant): ``K`` slots,
  each ``C + 1`` logits (the last class is "no defect") and 4 box numbers.

Two heads read the backbone's feature map ``[B, D, h, w]``:

- ``head="pooled"`` (the paper's): global average pooling, a dense layer, then two
  dense paths: ``K * (C [+1])`` class logits and ``K * 4`` box numbers.
- ``head="attention"`` (ours): the feature map(s) become tokens (1x1 projection to
  ``hidden_dim`` + 2-D sine positions), ``encoder_layers`` of self-attention, then ``K``
  slot queries with learned reference points read them through a transformer decoder
  (``decoder_layers``); a linear class path and a 3-layer box MLP per slot
  (see :class:`AttentionSlotHead`). ``extra_level=True`` adds the backbone's stride-16
  map to the tokens (CNN backbones).

Boxes are normalised ``cx, cy, w, h`` in [0, 1] (sigmoid). :meth:`SlotDetector.detect`
turns outputs into scored ``xmin, ymin, xmax, ymax`` boxes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.box_heads.losses import cxcywh_to_xyxy
from defectscope.models.registry import register_model


def sine_positions(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """2-D sine/cosine position codes ``[h * w, dim]`` (half the channels for y, half for x).

    Raises:
        ValueError: ``dim`` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"position code width must be divisible by 4, got {dim}")
    q = dim // 4
    freq = torch.exp(torch.arange(q, device=device, dtype=torch.float32) * (-math.log(10000.0) / q))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py = torch.cat([torch.sin(ys[:, None] * freq), torch.cos(ys[:, None] * freq)], dim=1)  # [h, dim/2]
    px = torch.cat([torch.sin(xs[:, None] * freq), torch.cos(xs[:, None] * freq)], dim=1)  # [w, dim/2]
    pos = torch.cat([py[:, None, :].expand(h, w, 2 * q), px[None, :, :].expand(h, w, 2 * q)], dim=-1)
    return pos.reshape(h * w, dim).to(dtype)


class PooledHead(nn.Module):
    """The paper's head (Fig. 4/5): GAP, dense + ReLU + dropout, a class path and a box path.

    Forward: features ``[B, D, h, w]`` -> ``(logits [B, K, L], boxes [B, K, 4])``, ``L`` logits per slot.
    """

    def __init__(self, in_channels: int, num_slots: int, num_logits: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.k, self.l = num_slots, num_logits
        self.shared = nn.Sequential(nn.Linear(in_channels, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.cls = nn.Linear(hidden_dim, num_slots * num_logits)
        self.box = nn.Linear(hidden_dim, num_slots * 4)

    def forward(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.shared(f.mean(dim=(2, 3)))
        return self.cls(z).view(-1, self.k, self.l), self.box(z).view(-1, self.k, 4).sigmoid()


class AttentionSlotHead(nn.Module):
    """Ours: slot queries with learned reference points read the feature-map tokens through a transformer decoder.

    Every feature level (the backbone's last map, and optionally its stride-16 map) is projected to
    ``hidden_dim`` by a 1x1 convolution and gets 2-D sine positions plus a learned level code; the
    tokens of all levels are concatenated and pass ``encoder_layers`` self-attention layers. Each of
    the ``K`` slots has a learned content vector and a learned reference point (initialised on a
    grid over the image); the decoder refines the slots, and each slot predicts its class and its
    box centre as an offset from its reference point (in logit space) plus its width and height.
    Every decoder layer's output is decoded by the same class/box paths (auxiliary outputs, used
    by the set loss during training).

    Forward: list of features ``[B, D_l, h_l, w_l]`` -> ``(logits [B, K, L], boxes [B, K, 4], aux)``
    with ``aux`` a list of ``(logits, boxes)`` of the earlier decoder layers.
    """

    def __init__(self, in_channels: list[int], num_slots: int, num_logits: int, hidden_dim: int, num_heads: int,
                 encoder_layers: int, decoder_layers: int, dropout: float) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.proj = nn.ModuleList(nn.Conv2d(c, hidden_dim, 1) for c in in_channels)
        self.level = nn.Parameter(torch.zeros(len(in_channels), hidden_dim))
        enc = nn.TransformerEncoderLayer(hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, encoder_layers, enable_nested_tensor=False) if encoder_layers else None
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(hidden_dim, num_heads, 2 * hidden_dim, dropout, batch_first=True, norm_first=True)
            for _ in range(decoder_layers))
        self.norm = nn.LayerNorm(hidden_dim)
        self.queries = nn.Parameter(torch.randn(num_slots, hidden_dim) * 0.1)
        side = math.ceil(math.sqrt(num_slots))
        grid = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        ref = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)[:num_slots]
        self.reference = nn.Parameter(torch.logit(ref))
        self.ref_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden_dim))
        self.cls = nn.Linear(hidden_dim, num_logits)
        self.box = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                 nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, 4))

    def _decode(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.norm(q)
        d = self.box(q)
        centre = (self.reference.to(d.dtype) + d[..., :2]).sigmoid()
        return self.cls(q), torch.cat([centre, d[..., 2:].sigmoid()], dim=-1)

    def forward(self, feats: list[torch.Tensor]):
        tokens = []
        for i, (f, proj) in enumerate(zip(feats, self.proj)):
            _, _, h, w = f.shape
            t = proj(f).flatten(2).transpose(1, 2)
            tokens.append(t + sine_positions(h, w, self.hidden_dim, t.device, t.dtype) + self.level[i].to(t.dtype))
        mem = torch.cat(tokens, dim=1)
        if self.encoder is not None:
            mem = self.encoder(mem)
        b = mem.shape[0]
        ref_pos = sine_positions_1d(self.reference.sigmoid(), self.hidden_dim)
        q = (self.queries + self.ref_embed(ref_pos)).unsqueeze(0).expand(b, -1, -1).to(mem.dtype)
        outs = []
        for layer in self.layers:
            q = layer(q, mem)
            outs.append(self._decode(q))
        logits, boxes = outs[-1]
        return logits, boxes, outs[:-1]


def sine_positions_1d(points: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine/cosine codes ``[K, dim]`` of normalised 2-D points ``[K, 2]`` (half the channels per axis)."""
    q = dim // 4
    freq = torch.exp(torch.arange(q, device=points.device, dtype=torch.float32) * (-math.log(10000.0) / q))
    parts = []
    for a in (1, 0):  # y then x, as sine_positions
        v = points[:, a : a + 1].float() * 2 * math.pi * freq
        parts += [v.sin(), v.cos()]
    return torch.cat(parts, dim=1)


@register_model("slot_detector")
class SlotDetector(nn.Module):
    """Backbone + class head + box head with ``K`` slots (see the module docstring).

    Args:
        backbone: registry name (``efficientnet_lite0``, ``vit_tiny_patch16``, ...).
        num_classes: ``C`` defect classes.
        num_slots: ``K`` (forced to 1 for ``mode="single"``).
        mode: ``single`` (``C`` logits, no "no defect" class) or ``slots`` (``C + 1`` logits).
        head: ``pooled`` (paper) or ``attention`` (ours).
        hidden_dim, num_heads, encoder_layers, decoder_layers, dropout: head sizes.
        image_size: input side the model was trained at (stored for predict; inputs are not resized here).
        pretrained / weights: see :func:`defectscope.models.create_backbone`.

    Forward:
        ``x`` ``[B, 3, H, W]`` in [0, 1] -> ``{"logits": [B, K, L], "boxes": [B, K, 4]}`` (normalised cxcywh).
    """

    def __init__(self, backbone: str, num_classes: int, num_slots: int = 9, mode: Literal["single", "slots"] = "slots",
                 head: Literal["pooled", "attention"] = "attention", hidden_dim: int = 256, num_heads: int = 8,
                 encoder_layers: int = 1, decoder_layers: int = 2, dropout: float = 0.1, image_size: int = 200,
                 extra_level: bool = False, pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        if mode not in ("single", "slots"):
            raise ValueError(f"mode must be 'single' or 'slots', got {mode!r}")
        if head not in ("pooled", "attention"):
            raise ValueError(f"head must be 'pooled' or 'attention', got {head!r}")
        self.mode, self.num_classes, self.image_size = mode, num_classes, image_size
        self.num_slots = 1 if mode == "single" else num_slots
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        num_logits = num_classes if mode == "single" else num_classes + 1
        c = self.backbone.out_channels
        self.extra_level = extra_level
        channels = [c]
        if extra_level:
            info = getattr(self.backbone.body, "feature_info", None)
            if self.backbone.spec.kind != "cnn" or info is None or not hasattr(self.backbone.body, "forward_intermediates"):
                raise ValueError(f"extra_level needs a timm CNN backbone with forward_intermediates, not '{backbone}'")
            self._extra_index = next(i for i, f in enumerate(info) if f["reduction"] == 16)
            channels.append(int(info[self._extra_index]["num_chs"]))
        if head == "pooled":
            self.head: nn.Module = PooledHead(c, self.num_slots, num_logits, hidden_dim, dropout)
        else:
            self.head = AttentionSlotHead(channels, self.num_slots, num_logits, hidden_dim, num_heads, encoder_layers,
                                          decoder_layers, dropout)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Backbone feature maps of images ``[B, 3, H, W]`` in [0, 1]: ``[last [B, D, h, w]]``, and with
        ``extra_level`` also the stride-16 map ``[B, D16, H/16, W/16]``."""
        if not self.extra_level:
            return [self.backbone(x)]
        bb = self.backbone
        final, inter = bb.body.forward_intermediates((x - bb.mean) / bb.std, indices=[self._extra_index])
        return [final, inter[0]]

    def forward_head(self, feats: list[torch.Tensor]) -> dict:
        """Slots from feature maps: ``{"logits": [B, K, L], "boxes": [B, K, 4]}`` (+ ``aux`` outputs of the
        attention head's earlier decoder layers: a list of such pairs)."""
        if isinstance(self.head, PooledHead):
            logits, boxes = self.head(feats[0])
            return {"logits": logits, "boxes": boxes}
        logits, boxes, aux = self.head(feats)
        return {"logits": logits, "boxes": boxes, "aux": aux}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def postprocess(self, out: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Scored boxes per image: ``boxes`` ``[K, 4]`` normalised xyxy (clipped to [0, 1]), ``scores``, ``labels``.

        Score of a slot: its highest defect-class probability (softmax over ``C`` or ``C + 1``
        logits); label: that class. Every slot is returned; thresholds are the caller's.
        """
        prob = out["logits"].float().softmax(-1)
        if self.mode == "slots":
            prob = prob[..., :-1]
        scores, labels = prob.max(-1)
        boxes = cxcywh_to_xyxy(out["boxes"].float()).clamp(0, 1)
        return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(len(boxes))]

    @torch.no_grad()
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """:meth:`postprocess` of :meth:`forward` (eval mode is the caller's)."""
        return self.postprocess(self(x))
