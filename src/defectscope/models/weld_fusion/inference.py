"""Inference of the weld models: ``(images, spectra) -> logits, softmax(logits / T)`` and the fusion's attention.

:class:`WeldInference` is the one forward of a trained weld model: the pipeline's test predictions
(:func:`predict_weld_probs` in :mod:`defectscope.models.weld_fusion.lightning_model`), ``defectscope
predict`` / ``evaluate``, the service and the ONNX graph all run it. Inputs: ``image`` float32
``[B, W, 3, h, w]`` weld crops in [0, 1]; ``spectra`` float32 ``[B, W, C_sel, T]`` selected, min-max
normalised channels (only those the model reads). Attention outputs (``weld_fusion`` with ``v2s`` /
``s2v`` / ``bidirectional`` fusion): see :mod:`defectscope.deploy.adapters.weld`.
"""

from __future__ import annotations

import torch
from torch import nn


class WeldInference(nn.Module):
    """A weld model ``(images [B, W, 3, h, w], spectra [B, W, C, T]) -> logits [B, K]`` as a graph over
    the inputs it reads, returning ``(logits, softmax(logits / temperature))``.

    Args:
        model: the weld classifier (eval mode, fp32).
        inputs: the input names in order, a non-empty subset of ``("image", "spectra")``.
        temperature: ``T`` of temperature scaling (1 = plain softmax).
    """

    def __init__(self, model: nn.Module, inputs: tuple[str, ...], temperature: float = 1.0,
                 attention: str | None = None) -> None:
        super().__init__()
        self.model, self.names, self.temperature = model, tuple(inputs), float(temperature)
        self.attention = attention

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``softmax(logits / temperature)`` ``[B, K]`` (fp32)."""
        return torch.softmax(logits.float() / self.temperature, dim=1)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(logits [B, K], probabilities [B, K])``, with ``attention`` also the attention outputs of the
        module docstring: ``v2s``: ``attention_map [B, W, h', w']``, ``channel_attention [B, W, C_sel]``;
        ``s2v``: ``attention_map [B, W, h', w']``."""
        x = dict(zip(self.names, args))
        if not self.attention:
            logits = self.model(x.get("image"), x.get("spectra")).float()
            return logits, self.probabilities(logits)
        logits, attn = self.model.forward_with_attention(x["image"], x["spectra"])
        logits = logits.float()
        probs = self.probabilities(logits)
        gh, gw = self.model.grid
        a = attn[self.attention].float().mean(2)  # heads averaged
        if self.attention == "v2s":  # [B, W, N, C]: rows sum to 1 over the channels
            amap = a.amax(-1)
            return logits, probs, amap.reshape(amap.shape[0], amap.shape[1], gh, gw), a.mean(2)
        amap = a.mean(2)  # s2v [B, W, C, N] -> share of attention per image position [B, W, N]
        return logits, probs, amap.reshape(amap.shape[0], amap.shape[1], gh, gw)


def attention_kind(model: nn.Module, model_name: str) -> str | None:
    """Which attention weights of a weld model become outputs: ``v2s`` (also for ``bidirectional``), ``s2v``,
    or ``None`` (no cross-attention fusion: add/concat fusions and the baselines)."""
    if model_name != "weld_fusion":
        return None
    return {"v2s": "v2s", "bidirectional": "v2s", "s2v": "s2v"}.get(getattr(model, "fusion_kind", None))
