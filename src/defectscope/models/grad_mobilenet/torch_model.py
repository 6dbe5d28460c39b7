"""Grad-MobileNet (paper 001, section 4): the gradient of the loss with respect to the input.

A classifier (MobileNetV3 trunk by default) is trained on normal images only,
always toward the fixed target ``y = 0``, until it overfits (section 4.1). For
any image ``x`` the cross-entropy loss ``L(theta, y=0, model(x))`` is
differentiated with respect to ``x`` (eq. 2) and the per-pixel L2 norm over the
three colour channels (eq. 3) is the anomaly map. Together with the
"artificial landmark" (section 4.3: the share of grey levels 0..50 in the
image's histogram) it becomes a fixed-length feature vector
(:class:`GradientFeatureSpec`), scored by a one-class SVM (section 4.4.1,
:class:`OneClassScorer`) and clustered by t-SNE + K-means (section 4.4.2, see
:mod:`defectscope.evaluation.anomaly`).

The feature vector (exactly, in this order):

1. the pooled gradient-norm map: ``log10(mean of ||Grad||_2 over each cell + eps)``
   on a ``grid = (gh, gw)`` of equal cells (adaptive average pooling), ``gh * gw`` values;
2. its histogram: the share of pixels whose ``log10(||Grad||_2 + eps)`` falls in each
   of ``bins`` equal bins between the 0.5th and 99.9th percentiles of the fitting
   images' values (values outside go to the end bins), ``bins`` values summing to 1;
3. the artificial landmark: one value in [0, 1].

Grad-MobileNet needs a backward pass at inference, so it cannot be exported to
ONNX as a forward-only graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.models.backbones import create_backbone
from defectscope.models.training import to_float

#: added to ``||Grad||_2`` before the logarithm, so a zero gradient gives a finite feature
LOG_EPS = 1e-20


class GradMobileNet(nn.Module):
    """Backbone + global average pooling + bias-free linear head (paper 001, Fig. 2).

    The head has no bias so that the network cannot reach the fixed target by a
    constant alone: the logits have to come from the image's features.

    Args:
        backbone: registry name; the paper's trunk is ``mobilenetv3_large_100``
            (random init here unless ``weights`` names a local file).
        num_classes: outputs ``K >= 2`` of the head; training always uses class 0.
        pretrained / weights: see :func:`defectscope.models.create_backbone`.

    Forward:
        ``x``: ``[B, 3, H, W]`` RGB in [0, 1]; returns logits ``[B, K]``.

    Raises:
        ValueError: ``num_classes < 2`` (cross-entropy over one class is constant, its gradient zero).
    """

    def __init__(self, backbone: str = "mobilenetv3_large_100", num_classes: int = 2, pretrained: bool = False,
                 weights: str | None = None) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"grad_mobilenet: num_classes must be >= 2 (got {num_classes}); "
                             "a softmax over one class has a constant loss and a zero gradient")
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        self.head = nn.Linear(self.backbone.out_channels, num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).mean(dim=(2, 3)))


def input_gradient(model: nn.Module, x: torch.Tensor, target: int = 0) -> torch.Tensor:
    """Gradient of the cross-entropy toward the fixed ``target`` with respect to the input (eq. 2).

    The loss is summed over the batch, so every image gets the gradient of its own
    loss whatever the batch size. The model is used as it is (call ``eval()`` first
    so batch-norm uses its running statistics); its parameters get no gradient.

    Args:
        model: maps ``[B, 3, H, W]`` to logits ``[B, K]``.
        x: images ``[B, 3, H, W]`` (float, RGB in [0, 1]).
        target: the fixed class ``y`` of eq. 2 (0 in the paper).

    Returns:
        ``[B, 3, H, W]`` float32 gradient ``dL/dx``.

    Raises:
        ValueError: ``x`` is not ``[B, 3, H, W]`` or ``target`` is not a valid class.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"input_gradient: expected images [B, 3, H, W], got {tuple(x.shape)}")
    x = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x).float()
        if not 0 <= target < logits.shape[1]:
            raise ValueError(f"input_gradient: target {target} outside the model's {logits.shape[1]} classes")
        y = torch.full((x.shape[0],), target, dtype=torch.long, device=x.device)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:  # the output does not depend on the input at all
        grad = torch.zeros_like(x)
    return grad.detach()


def gradient_norm(grad: torch.Tensor) -> torch.Tensor:
    """Per-pixel L2 norm over the colour channels (eq. 3): ``sqrt(g1^2 + g2^2 + g3^2)``.

    Args:
        grad: ``[B, C, H, W]`` input gradient.

    Returns:
        ``[B, H, W]`` non-negative anomaly map (units of loss per unit of [0, 1] intensity).
    """
    if grad.ndim != 4:
        raise ValueError(f"gradient_norm: expected [B, C, H, W], got {tuple(grad.shape)}")
    return torch.linalg.vector_norm(grad, ord=2, dim=1)


def artificial_landmark(x: torch.Tensor, low: int = 0, high: int = 50) -> torch.Tensor:
    """Share of pixels whose grey level lies in ``[low, high]`` (paper 001, section 4.3).

    Grey level = ``round(255 * mean over RGB)`` (the images here are grey repeated on
    three channels, so this is the original 8-bit grey value).

    Args:
        x: ``[B, 3, H, W]`` in [0, 1].
        low, high: inclusive grey-level range (0..50 in the paper).

    Returns:
        ``[B]`` float in [0, 1].
    """
    if x.ndim != 4:
        raise ValueError(f"artificial_landmark: expected [B, C, H, W], got {tuple(x.shape)}")
    grey = torch.round(x.float().mean(dim=1) * 255.0)
    return ((grey >= low) & (grey <= high)).float().mean(dim=(1, 2))


@dataclass
class GradientFeatureSpec:
    """How a gradient-norm map and a landmark become one feature vector (see the module docstring).

    Attributes:
        grid: ``(gh, gw)`` cells of the pooled map.
        bins: number of histogram bins.
        hist_range: ``(lo, hi)`` in ``log10`` units; set by :meth:`fit_range` from the
            fitting images (``None`` until then).
    """

    grid: tuple[int, int] = (10, 4)
    bins: int = 16
    hist_range: tuple[float, float] | None = field(default=None)

    @property
    def dim(self) -> int:
        """Feature length ``gh * gw + bins + 1``."""
        return self.grid[0] * self.grid[1] + self.bins + 1

    def fit_range(self, gnorm: torch.Tensor) -> "GradientFeatureSpec":
        """Set ``hist_range`` to the 0.5th..99.9th percentile of ``log10(gnorm + eps)`` of fitting maps ``[N, H, W]``.

        A degenerate range (all values equal, e.g. zero gradients) is widened by 0.5 on each side.
        """
        logs = torch.log10(gnorm.float().flatten() + LOG_EPS)
        if logs.numel() > 2_000_000:  # quantile() has a size limit; a strided sample is enough
            logs = logs[:: logs.numel() // 2_000_000 + 1]
        lo, hi = torch.quantile(logs, torch.tensor([0.005, 0.999])).tolist()
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        self.hist_range = (float(lo), float(hi))
        return self

    def fit_range_log(self, log_gn: torch.Tensor) -> "GradientFeatureSpec":
        """:meth:`fit_range` from ``log10 ||Grad||`` maps ``[N, H, W]`` (:func:`log10_gradient_norm`)."""
        logs = log_gn.double().flatten()
        if logs.numel() > 2_000_000:
            logs = logs[:: logs.numel() // 2_000_000 + 1]
        lo, hi = torch.quantile(logs, torch.tensor([0.005, 0.999], dtype=torch.float64)).tolist()
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        self.hist_range = (float(lo), float(hi))
        return self

    def __call__(self, gnorm: torch.Tensor, landmark: torch.Tensor) -> torch.Tensor:
        return gradient_features(gnorm, landmark, self)


def gradient_features(gnorm: torch.Tensor, landmark: torch.Tensor, spec: GradientFeatureSpec) -> torch.Tensor:
    """Fixed-length feature of each image: pooled log map, log histogram, landmark.

    Args:
        gnorm: ``[B, H, W]`` gradient-norm maps (eq. 3), ``H >= gh`` and ``W >= gw``.
        landmark: ``[B]`` artificial landmarks.
        spec: the layout; its ``hist_range`` must be set (:meth:`GradientFeatureSpec.fit_range`).

    Returns:
        ``[B, gh * gw + bins + 1]`` float32, finite for any finite non-negative input.

    Raises:
        ValueError: ``hist_range`` not set, or shapes that do not fit.
    """
    if spec.hist_range is None:
        raise ValueError("gradient_features: spec.hist_range is not set; call spec.fit_range(fitting maps) first")
    if gnorm.ndim != 3 or landmark.shape != (gnorm.shape[0],):
        raise ValueError(f"gradient_features: expected gnorm [B, H, W] and landmark [B], got "
                         f"{tuple(gnorm.shape)} and {tuple(landmark.shape)}")
    g = gnorm.float()
    pooled = F.adaptive_avg_pool2d(g[:, None], spec.grid).flatten(1)
    pooled = torch.log10(pooled + LOG_EPS)
    lo, hi = spec.hist_range
    logs = torch.log10(g.flatten(1) + LOG_EPS)
    idx = ((logs - lo) / (hi - lo) * spec.bins).floor().clamp_(0, spec.bins - 1).long()
    hist = torch.zeros(g.shape[0], spec.bins).scatter_add_(1, idx, torch.ones_like(logs))
    hist = hist / logs.shape[1]
    return torch.cat([pooled, hist, landmark.float()[:, None]], dim=1)


class OneClassScorer:
    """Standardisation + an RBF one-class SVM fitted on normal features (section 4.4.1).

    Fitting uses scikit-learn (``StandardScaler`` then ``OneClassSVM(kernel="rbf")``, libsvm).
    The fitted boundary is then kept as plain tensors (:meth:`state_dict`) and scored from them
    (:meth:`score`), both right after fitting and after reloading (:meth:`from_state`): a
    checkpoint holds no sklearn object and loads with ``torch.load(weights_only=True)``, and
    reloaded scores are identical to the run's. The decision function is libsvm's
    (Schoelkopf et al., Neural Computation 13, 2001)::

        z = (f - mean) / scale
        decision(f) = sum_i alpha_i * exp(-gamma * ||z - sv_i||^2) + intercept      (intercept = -rho)

    Args:
        nu: upper bound on the share of training points outside the boundary.
        gamma: RBF kernel width (``"scale"``: ``1 / (F * var(z))`` of the standardised
            fitting features, as scikit-learn; or a float).

    ``score(F)`` is the anomaly score (``-decision``, higher = more anomalous, > 0 outside the
    boundary: the decision threshold is 0); ``predict(F)`` is ``True`` for defective.
    """

    #: keys of :meth:`state_dict`
    STATE_KEYS = ("mean", "scale", "support_vectors", "dual_coef", "intercept", "gamma", "nu")

    def __init__(self, nu: float = 0.1, gamma: str | float = "scale") -> None:
        self.nu, self.gamma = nu, gamma
        self.state: dict | None = None

    def fit(self, features: np.ndarray) -> "OneClassScorer":
        """Fit on normal features ``[N, F]``.

        Raises:
            ValueError: fewer than 2 rows or non-finite values.
        """
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import OneClassSVM

        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"OneClassScorer.fit: need a [N >= 2, F] array, got shape {features.shape}")
        if not np.isfinite(features).all():
            raise ValueError("OneClassScorer.fit: features contain NaN or inf")
        pipe = make_pipeline(StandardScaler(), OneClassSVM(kernel="rbf", nu=self.nu, gamma=self.gamma)).fit(features)
        scaler, svm = pipe[0], pipe[1]
        self.state = {
            "mean": torch.from_numpy(np.array(scaler.mean_, dtype=np.float64)),
            "scale": torch.from_numpy(np.array(scaler.scale_, dtype=np.float64)),
            "support_vectors": torch.from_numpy(np.array(svm.support_vectors_, dtype=np.float64)),
            "dual_coef": torch.from_numpy(np.array(svm.dual_coef_[0], dtype=np.float64)),
            "intercept": float(svm.intercept_[0]),
            "gamma": float(svm._gamma),  # the resolved width ("scale" -> a number); sklearn keeps it here
            "nu": float(self.nu),
        }
        return self

    def state_dict(self) -> dict:
        """The fitted boundary as tensors and floats (``float64``): :attr:`STATE_KEYS`.

        ``mean, scale [F]``, ``support_vectors [S, F]`` (standardised), ``dual_coef [S]``,
        ``intercept``, ``gamma``, ``nu``.

        Raises:
            ValueError: not fitted.
        """
        if self.state is None:
            raise ValueError("OneClassScorer: not fitted; call fit(features) first")
        return dict(self.state)

    @classmethod
    def from_state(cls, state: dict, source: str = "checkpoint") -> "OneClassScorer":
        """Rebuild a fitted scorer from :meth:`state_dict` (no pickle, no sklearn object).

        Raises:
            ValueError: a key is missing or the shapes do not fit (the message names ``source``).
        """
        missing = [k for k in cls.STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"{source}: one-class SVM state lacks {', '.join(missing)}")
        s = {k: (torch.as_tensor(state[k], dtype=torch.float64) if k in ("mean", "scale", "support_vectors", "dual_coef")
                 else float(state[k])) for k in cls.STATE_KEYS}
        f = s["mean"].shape[0]
        if s["scale"].shape != (f,) or s["support_vectors"].ndim != 2 or s["support_vectors"].shape[1] != f \
                or s["dual_coef"].shape != (s["support_vectors"].shape[0],):
            raise ValueError(f"{source}: one-class SVM state has inconsistent shapes (mean {tuple(s['mean'].shape)}, "
                             f"support_vectors {tuple(s['support_vectors'].shape)}, dual_coef {tuple(s['dual_coef'].shape)})")
        out = cls(s["nu"], s["gamma"])
        out.state = s
        return out

    def score(self, features: np.ndarray) -> np.ndarray:
        """Anomaly scores ``[N]`` float64 of features ``[N, F]`` (``-decision``; > 0 outside the learnt boundary).

        Raises:
            ValueError: not fitted, or ``F`` differs from the fitted features.
        """
        from sklearn.metrics.pairwise import rbf_kernel

        s = self.state_dict()
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != s["mean"].shape[0]:
            raise ValueError(f"OneClassScorer.score: expected [N, {s['mean'].shape[0]}] features, got {f.shape}")
        z = (f - s["mean"].numpy()) / s["scale"].numpy()
        k = rbf_kernel(z, s["support_vectors"].numpy(), gamma=s["gamma"])
        return -(k @ s["dual_coef"].numpy() + s["intercept"])

    @classmethod
    def from_state_dict(cls, state: dict, source: str = "checkpoint") -> "OneClassScorer":
        """Same as :meth:`from_state` (the name ``load_state_dict``-style callers use).

        Raises:
            ValueError: a key is missing or the shapes do not fit.
        """
        return cls.from_state(state, source)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """``[N]`` bool, ``True`` = defective (outside the boundary)."""
        return self.score(features) > 0


def blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``[N, H, W]`` maps (``sigma`` in pixels; 0 = unchanged), as every anomaly model's map."""
    from defectscope.models.anomaly import gaussian_blur_maps

    return gaussian_blur_maps(maps[:, None], sigma)[:, 0]


def log10_gradient_norm(model: nn.Module, x: torch.Tensor, target: int = 0) -> torch.Tensor:
    """``log10 ||dL/dx||_2`` per pixel (eq. 2-3), computed in log space so that it never underflows.

    An overfit network gives its normal images a logit margin of thousands (about 10^4 on
    KolektorSDD after 5 epochs): ``p_other = exp(-margin)`` and with it the loss gradient are 0 in
    any floating-point format, and eq. 2 read literally gives all-zero maps. The cross-entropy's
    gradient is ``dL/dx = sum_{k != t} p_k d(z_k - z_t)/dx``; with ``p_k = p_max r_k`` (``r_k <= 1``)
    it is ``p_max * d(sum_k r_k (z_k - z_t))/dx``, so

        log10 ||dL/dx|| = log10 p_max + log10 ||d(sum_k r_k (z_k - z_t))/dx||

    with ``log p_max`` from ``log_softmax`` in float64 and one backward pass of the bracket (no
    underflow). Exactly eq. 2-3, as a logarithm.

    Args:
        model: maps ``[B, 3, H, W]`` to logits ``[B, K]`` (eval mode); x: ``[B, 3, H, W]`` in [0, 1].
        target: the fixed class ``y`` of eq. 2.

    Returns:
        ``[B, H, W]`` float64 (``log10(0)`` floored at ``log10 p_max - 300``).

    Raises:
        ValueError: bad shape or target.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"log10_gradient_norm: expected images [B, 3, H, W], got {tuple(x.shape)}")
    x = x.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x).float()
        k = z.shape[1]
        if not 0 <= target < k:
            raise ValueError(f"log10_gradient_norm: target {target} outside the model's {k} classes")
        others = [i for i in range(k) if i != target]
        lp = F.log_softmax(z.detach().double(), dim=1)[:, others]  # [B, K-1]
        lmax = lp.max(dim=1).values
        r = torch.exp(lp - lmax[:, None]).float()
        bracket = (r * (z[:, others] - z[:, target : target + 1])).sum()
        (g,) = torch.autograd.grad(bracket, x, allow_unused=True)
    if g is None:
        g = torch.zeros_like(x)
    norm = torch.linalg.vector_norm(g.detach().double(), ord=2, dim=1)
    return lmax[:, None, None] / math.log(10.0) + torch.log10(norm + 1e-300)


def log_gradient_features(log_gn: torch.Tensor, landmark: torch.Tensor, spec: GradientFeatureSpec) -> torch.Tensor:
    """The feature of :func:`gradient_features` from ``log10 ||Grad||`` maps ``[B, H, W]`` (no ``eps`` floor needed).

    Pooled cells: ``log10(mean of ||Grad|| over the cell)`` computed as ``max + log10(mean 10^(L - max))``;
    histogram of ``L`` over ``spec.hist_range`` (set by :meth:`GradientFeatureSpec.fit_range_log`); landmark.

    Returns:
        ``[B, gh * gw + bins + 1]`` float64.

    Raises:
        ValueError: ``hist_range`` not set or shapes that do not fit.
    """
    if spec.hist_range is None:
        raise ValueError("log_gradient_features: spec.hist_range is not set; call spec.fit_range_log first")
    if log_gn.ndim != 3 or landmark.shape != (log_gn.shape[0],):
        raise ValueError(f"log_gradient_features: expected [B, H, W] and [B], got {tuple(log_gn.shape)}, "
                         f"{tuple(landmark.shape)}")
    L = log_gn.double()
    top = L.flatten(1).amax(dim=1)[:, None, None]
    pooled = F.adaptive_avg_pool2d(torch.pow(10.0, L - top)[:, None], spec.grid)[:, 0]
    pooled = (top + torch.log10(pooled + 1e-300)).flatten(1)
    lo, hi = spec.hist_range
    idx = ((L.flatten(1) - lo) / (hi - lo) * spec.bins).floor().clamp_(0, spec.bins - 1).long()
    hist = torch.zeros(L.shape[0], spec.bins, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    hist = hist / idx.shape[1]
    return torch.cat([pooled, hist, landmark.double()[:, None]], dim=1)


def log_gradient_maps(model: nn.Module, x: np.ndarray, target: int = 0, landmark_low: int = 0, landmark_high: int = 50,
                      batch_size: int = 8, progress: bool = False,
                      label: str = "gradients") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`log10_gradient_norm` and the landmark of uint8 images ``[N, 3, H, W]``, ``batch_size`` per backward pass.

    Returns:
        ``(log10 ||Grad|| [N, H, W] float64, landmark [N], log10 of the softmax probability of the non-target classes [N])``.
    """
    model.eval()
    out, lm, lpo = [], [], []
    steps = range(0, len(x), batch_size)
    if progress:
        from rich.progress import track

        steps = track(steps, description=label, transient=True)
    for i in steps:
        xb = to_float(torch.from_numpy(x[i : i + batch_size]))
        out.append(log10_gradient_norm(model, xb, target))
        lm.append(artificial_landmark(xb, landmark_low, landmark_high))
        with torch.no_grad():
            lp = F.log_softmax(model(xb).double(), dim=1)
            lpo.append(torch.logsumexp(torch.cat([lp[:, :target], lp[:, target + 1 :]], 1), dim=1) / math.log(10.0))
    return torch.cat(out), torch.cat(lm), torch.cat(lpo)


# ---------------------------------------------------------------- the anomaly-model contract

from pydantic import Field  # noqa: E402

from defectscope.models.anomaly import AnomalyArgs, AnomalyModel, AnomalyOutput, register_anomaly_model  # noqa: E402

EXPORT_NOTE = ("Grad-MobileNet's anomaly map is the gradient of the loss with respect to the input (paper 001, "
               "eq. 2-3): inference needs a backward pass (autograd), which an ONNX inference graph cannot run; "
               "it runs on PyTorch only (predict, serve and inspect of the run folder)")


class GradMobileNetArgs(AnomalyArgs):
    """Recipe block ``model`` for ``name: grad_mobilenet`` (paper 001, section 4; see :class:`GradMobileNetDetector`).

    Attributes:
        backbone: trunk; ``mobilenetv3_large_100`` as in the paper (random init here).
        pretrained / weights: ImageNet weights (only EfficientNet-Lite here) / a local file.
        num_classes: head outputs ``K`` (training always targets class ``target``).
        target: the fixed ``y`` of eq. 2 (0).
        grid, bins: layout of the feature (:class:`GradientFeatureSpec`).
        landmark_low, landmark_high: grey-level range of the artificial landmark (0..50).
        nu, gamma: one-class SVM settings.
        ocsvm_fit_on: ``calibration`` (unseen normal images), ``fit`` (the training images, as in
            the paper) or ``both``.
        map_blur_sigma: Gaussian smoothing (input pixels) of the gradient-norm map used as anomaly map.
        grad_batch_size: images per backward pass when computing gradients during fitting.
    """

    name: str = "grad_mobilenet"
    backbone: str = "mobilenetv3_large_100"
    pretrained: bool = False
    weights: str | None = None
    num_classes: int = Field(2, ge=2)
    target: int = Field(0, ge=0)
    grid: tuple[int, int] = (10, 4)
    bins: int = Field(16, ge=2)
    landmark_low: int = Field(0, ge=0, le=255)
    landmark_high: int = Field(50, ge=0, le=255)
    nu: float = Field(0.1, gt=0, le=1)
    gamma: str | float = "scale"
    ocsvm_fit_on: str = Field("calibration", pattern="^(calibration|fit|both)$")
    map_blur_sigma: float = Field(4.0, ge=0)
    grad_batch_size: int = Field(8, ge=1)


@register_anomaly_model
class GradMobileNetDetector(AnomalyModel):
    """Grad-MobileNet end to end on the contract: ``[B, 3, H, W]`` -> (one-class SVM score, blurred ``log10 ||dL/dx||``).

    The gradient is computed in log space (:func:`log10_gradient_norm`): the overfit network's margins
    make ``||dL/dx||`` itself underflow to 0; the map is its base-10 logarithm (same order of pixels).

    Holds the overfit network (:class:`GradMobileNet`), the fitted feature layout (``hist_range``)
    and the one-class SVM as tensors (standardisation, support vectors, dual coefficients, intercept,
    resolved RBF width), scored by libsvm's decision function written in torch (float64):
    ``score = -(sum_i alpha_i exp(-gamma ||z - sv_i||^2) + intercept)``, ``z = (f - mean) / scale``;
    defective when the score > 0 (:attr:`fixed_threshold`).

    The forward runs a backward pass (eq. 2) even under ``torch.no_grad`` / ``inference_mode``
    (it leaves them for the gradient), so it is PyTorch only (:attr:`export_note`).

    Args: see :class:`GradMobileNetArgs` (tiling is refused: the feature describes a whole image).
    """

    name = "grad_mobilenet"
    Args = GradMobileNetArgs
    exportable = False
    export_note = EXPORT_NOTE
    fixed_threshold = 0.0
    fitted_buffers = ("svm_mean", "svm_scale", "svm_support", "svm_dual")

    def __init__(self, backbone: str = "mobilenetv3_large_100", pretrained: bool = False, weights: str | None = None,
                 num_classes: int = 2, target: int = 0, grid: tuple[int, int] | list[int] = (10, 4), bins: int = 16,
                 landmark_low: int = 0, landmark_high: int = 50, nu: float = 0.1, gamma: str | float = "scale",
                 ocsvm_fit_on: str = "calibration", map_blur_sigma: float = 4.0, grad_batch_size: int = 8,
                 tile: list[int] | None = None, tile_stride: list[int] | None = None) -> None:
        if tile:
            raise ValueError("grad_mobilenet: tiling is not supported (its feature describes a whole image)")
        super().__init__(None, None)
        self.net = GradMobileNet(backbone, num_classes, pretrained, weights)
        self.target, self.grid, self.bins = int(target), tuple(int(v) for v in grid), int(bins)
        self.landmark_low, self.landmark_high = int(landmark_low), int(landmark_high)
        self.nu, self.gamma, self.ocsvm_fit_on = float(nu), gamma, ocsvm_fit_on
        self.map_blur_sigma, self.grad_batch_size = float(map_blur_sigma), int(grad_batch_size)
        for name in ("svm_mean", "svm_scale", "svm_dual"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))
        self.register_buffer("svm_support", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("svm_intercept", torch.zeros((), dtype=torch.float64))
        self.register_buffer("svm_gamma", torch.zeros((), dtype=torch.float64))
        self.register_buffer("hist_range", torch.zeros(2, dtype=torch.float64))
        self.args.update(backbone=backbone, pretrained=bool(pretrained), weights=weights, num_classes=int(num_classes),
                         target=self.target, grid=list(self.grid), bins=self.bins, landmark_low=self.landmark_low,
                         landmark_high=self.landmark_high, nu=self.nu, gamma=gamma, ocsvm_fit_on=ocsvm_fit_on,
                         map_blur_sigma=self.map_blur_sigma, grad_batch_size=self.grad_batch_size)
        self.args.pop("tile"), self.args.pop("tile_stride")
        self.eval()

    @property
    def spec(self) -> GradientFeatureSpec:
        """The fitted feature layout."""
        lo, hi = (float(v) for v in self.hist_range)
        return GradientFeatureSpec(self.grid, self.bins, (lo, hi))

    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, train=None, progress: bool = False,
            **context) -> dict:
        """Train the network toward ``y = target`` on ``x_fit`` (uint8 normal images) with ``train(net, x_fit) ->
        info`` (the engine's Lightning loop), then fit the feature range on ``x_fit`` and the one-class SVM on
        ``ocsvm_fit_on`` (``x_cal``: held-out normal images; falls back to ``fit`` with fewer than 2).

        Returns:
            the training info plus ``feature``, ``ocsvm`` and ``p_target_fit_mean``.

        Raises:
            ValueError: no ``train`` callable.
        """
        if train is None:
            raise ValueError("grad_mobilenet: fit needs train(net, x_fit) (the engine's training loop)")
        info = dict(train(self.net, x_fit) or {})
        self.net.to(memory_format=torch.contiguous_format).float().eval()
        self.eval()
        lg_fit, lm_fit, lpo_fit = log_gradient_maps(self.net, x_fit, self.target, self.landmark_low,
                                                    self.landmark_high, self.grad_batch_size, progress, "gradients (fit)")
        spec = GradientFeatureSpec(self.grid, self.bins).fit_range_log(lg_fit)
        self.hist_range = torch.tensor(spec.hist_range, dtype=torch.float64)
        feats = {"fit": log_gradient_features(lg_fit, lm_fit, spec).numpy()}
        del lg_fit
        if x_cal is not None and len(x_cal):
            lg, lm, _ = log_gradient_maps(self.net, x_cal, self.target, self.landmark_low, self.landmark_high,
                                          self.grad_batch_size)
            feats["calibration"] = log_gradient_features(lg, lm, spec).numpy()
        fit_on = self.ocsvm_fit_on
        if fit_on != "fit" and len(feats.get("calibration", ())) < 2:
            fit_on = "fit"  # an SVM needs two rows
        rows = {"fit": feats["fit"], "calibration": feats.get("calibration"),
                "both": np.concatenate([feats["fit"], feats.get("calibration", feats["fit"][:0])])}[fit_on]
        st = OneClassScorer(self.nu, self.gamma).fit(rows).state_dict()
        self.svm_mean, self.svm_scale = st["mean"].clone(), st["scale"].clone()
        self.svm_support, self.svm_dual = st["support_vectors"].clone(), st["dual_coef"].clone()
        self.svm_intercept = torch.tensor(st["intercept"], dtype=torch.float64)
        self.svm_gamma = torch.tensor(st["gamma"], dtype=torch.float64)
        info.update(weights=self.net.backbone.weights_source, log10_p_other_fit_median=float(lpo_fit.median()),
                    feature={"dim": spec.dim, "grid": list(spec.grid), "bins": spec.bins,
                             "hist_range": list(spec.hist_range)},
                    ocsvm={"nu": self.nu, "gamma": self.gamma, "gamma_value": st["gamma"], "fit_on": fit_on,
                           "n_fit": int(len(rows)), "support_vectors": int(st["support_vectors"].shape[0])})
        return info

    def svm_score(self, features: torch.Tensor) -> torch.Tensor:
        """One-class SVM anomaly score ``[B]`` (float64, > 0 outside the boundary) of features ``[B, F]``."""
        z = (features.double() - self.svm_mean) / self.svm_scale
        sv = self.svm_support
        d2 = (z * z).sum(1, keepdim=True) - 2 * z @ sv.T + (sv * sv).sum(1)
        return -(torch.exp(-self.svm_gamma * d2.clamp_min(0)) @ self.svm_dual + self.svm_intercept)

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().float()  # a normal tensor: autograd refuses inference tensors
            lg = log10_gradient_norm(self.net, xg, self.target)
            lm = artificial_landmark(xg, self.landmark_low, self.landmark_high)
            score = self.svm_score(log_gradient_features(lg, lm, self.spec)).float()
            maps = blur_maps(lg.float(), self.map_blur_sigma)
        return AnomalyOutput(score.detach().clone(), maps.detach().clone())
