"""Signal-statistics classifier: summary statistics of each process channel -> a fitted linear map.

The small-data reference of the ``weld`` task (issue 25: on 24 real arc-weld runs, per-run signal
statistics with a scikit-learn logistic regression reached 0.75 grouped cross-validated accuracy
where the fusion network reached 0.50). For signals ``s [B, W, C, T]`` (welds, channels, time
steps of the process window, as the weld reader resamples them) the features are, per weld and
channel, over the time axis:

    mean, standard deviation (population), 10th and 90th percentile (linear interpolation
    between order statistics, as ``numpy.percentile``'s default)

giving ``f [B, W * C * 4]``; a logistic regression on the standardised features
(:func:`defectscope.models.linear_probe.fit_logistic`, L2, ``lbfgs``) is folded into one
``nn.Linear`` (``W' = W / sigma``, ``b' = b - W mu / sigma``), so the model is a plain module
whose coefficients are tensors in ``model.ckpt`` (no pickled scikit-learn object), and it exports
to ONNX like the other weld models (the percentiles are a sort and fixed gathers).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from defectscope.models.registry import register_model
from defectscope.models.training import set_linear

#: the statistics computed per weld and channel, in feature order
STATISTICS = ("mean", "std", "p10", "p90")
_QUANTILES = {"p10": 0.10, "p90": 0.90}


def signal_statistics(spectra: torch.Tensor) -> torch.Tensor:
    """Summary statistics of signals ``[B, W, C, T]`` -> ``[B, W * C * 4]`` (:data:`STATISTICS` per weld and channel).

    Percentile ``q`` is ``x_(i) + (pos - i) (x_(i+1) - x_(i))`` with ``pos = q (T - 1)``, ``i = floor(pos)``
    over the sorted series (``numpy.percentile``, method ``linear``).

    Raises:
        ValueError: ``spectra`` is not 4-D or has fewer than 2 time steps.
    """
    if spectra.ndim != 4 or spectra.shape[-1] < 2:
        raise ValueError(f"signal_statistics: expected signals [B, W, C, T] with T >= 2, got {tuple(spectra.shape)}")
    x = spectra.float()
    t = x.shape[-1]
    srt = torch.sort(x, dim=-1).values
    feats = [x.mean(-1), x.std(-1, unbiased=False)]
    for name in ("p10", "p90"):
        pos = _QUANTILES[name] * (t - 1)
        i = int(np.floor(pos))
        j = min(i + 1, t - 1)
        frac = float(pos - i)
        feats.append(srt[..., i] + frac * (srt[..., j] - srt[..., i]))
    return torch.stack(feats, dim=-1).reshape(x.shape[0], -1)


@register_model("weld_signal_stats")
class WeldSignalStats(nn.Module):
    """Per-channel summary statistics of the process window + a fixed linear layer (the fitted logistic regression).

    Args:
        num_classes: ``K``.
        channels: ``C`` channels of the signal input (the run's prepared channels).
        welds: ``W`` welds per sample.
        seq_len: ``T`` time steps (recorded for export; the statistics work at any ``T >= 2``).

    Forward:
        ``forward(image, spectra)``: ``image`` is ignored (may be ``None``); ``spectra`` ``[B, W, C, T]``
        (min-max normalised with the training statistics, as the weld pipeline prepares them);
        returns logits ``[B, K]``.

    Filled by :meth:`set_head` with the coefficients of :func:`~defectscope.models.linear_probe.fit_logistic`
    on :meth:`features`; never trained by gradient (every parameter has ``requires_grad=False``).
    """

    def __init__(self, num_classes: int, channels: int, welds: int = 1, seq_len: int = 560) -> None:
        super().__init__()
        self.num_classes, self.channels, self.welds, self.seq_len = int(num_classes), int(channels), int(welds), int(seq_len)
        self.head = nn.Linear(self.welds * self.channels * len(STATISTICS), self.num_classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        self.requires_grad_(False)

    def features(self, spectra: torch.Tensor) -> torch.Tensor:
        """``[B, W * C * 4]`` statistics of ``spectra [B, W, C, T]`` (:func:`signal_statistics`)."""
        if spectra.shape[1:3] != (self.welds, self.channels):
            raise ValueError(f"weld_signal_stats: expected signals [B, {self.welds}, {self.channels}, T], "
                             f"got {tuple(spectra.shape)}")
        return signal_statistics(spectra)

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> "WeldSignalStats":
        """Copy the fitted ``weight [K, F]`` and ``bias [K]`` into the linear layer.

        Raises:
            ValueError: shapes that do not match ``[num_classes, W * C * 4]`` / ``[num_classes]``.
        """
        set_linear(self.head, weight, bias, "weld_signal_stats")
        return self

    def forward(self, image: torch.Tensor | None, spectra: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(spectra))
