"""Linear probe: multinomial logistic regression on the pooled features of a frozen backbone.

The simplest honest baseline on small data (issue 15: on 40 weld radiographs it scored 0.80
5-fold accuracy where our fine-tuned pipeline scored 0.50): features ``f = GAP(backbone(x))``
``[B, C]`` of the frozen ImageNet backbone (EfficientNet-Lite0 holds the only real weights here),
standardised, then scikit-learn's ``LogisticRegression`` (L2, ``lbfgs``, multinomial softmax):

    p(k | x) = softmax_k(W z + b),  z = (f - mu) / sigma

The standardisation is folded into the linear layer, ``W' = W / sigma``,
``b' = b - W (mu / sigma)``, so :class:`LinearProbeClassifier` is a plain ``backbone -> mean
pooling -> nn.Linear`` module: its coefficients are ordinary tensors in the state dict (no
pickled scikit-learn object in ``model.ckpt``), it maps images ``[B, 3, H, W]`` in [0, 1] to
logits ``[B, K]`` and exports / predicts like any classifier. For two classes scikit-learn fits
one logit ``z``; it is stored as the logits ``(-z/2, z/2)``, whose softmax is ``(1 - s(z), s(z))``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from defectscope.models.backbones import Backbone, create_backbone
from defectscope.models.registry import register_model
from defectscope.models.training import set_linear

#: Bias of a class absent from the training labels (its probability underflows to 0).
ABSENT_CLASS_BIAS = -1.0e4


def _as_backbone(backbone: str | Backbone, pretrained: bool, weights: str | None) -> Backbone:
    if isinstance(backbone, Backbone):
        return backbone
    return create_backbone(backbone, pretrained=pretrained, weights=weights)


@torch.no_grad()
def extract_features(backbone: Backbone, x: np.ndarray | torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Pooled features of a frozen backbone.

    Args:
        backbone: a :class:`~defectscope.models.backbones.Backbone` (put in eval mode here).
        x: uint8 images ``[N, 3, H, W]`` (0..255) or float images in [0, 1].
        batch_size: images per forward pass.

    Returns:
        float64 ``[N, C]``: global average of the last feature map (fp32 forward, eval mode).

    Raises:
        ValueError: ``x`` is not ``[N, 3, H, W]``.
    """
    x = torch.as_tensor(x)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"extract_features: expected images [N, 3, H, W], got {tuple(x.shape)}")
    backbone.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        xb = xb.float().div(255.0) if xb.dtype == torch.uint8 else xb.float()
        out.append(backbone(xb).float().mean(dim=(2, 3)).double())
    if not out:
        return np.zeros((0, backbone.out_channels))
    return torch.cat(out).numpy()


def fit_logistic(features: np.ndarray, labels: np.ndarray, num_classes: int | None = None, c: float = 1.0,
                 max_iter: int = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Standardise + ``LogisticRegression`` on ``features``, folded into one linear map.

    Args:
        features: ``[N, C]`` float.
        labels: ``[N]`` int class indices in ``0 .. num_classes-1``.
        num_classes: ``K`` (default: ``labels.max() + 1``); classes absent from ``labels`` get
            zero weights and bias :data:`ABSENT_CLASS_BIAS`.
        c: inverse L2 regularisation strength (scikit-learn's ``C``) on standardised features.
        max_iter: ``lbfgs`` iterations.

    Returns:
        ``(weight [K, C], bias [K])`` float64 with ``softmax(features @ weight.T + bias)`` equal to
        the fitted pipeline's ``predict_proba`` (columns in class-index order).

    Raises:
        ValueError: fewer than 2 distinct labels, a label outside ``0 .. K-1``, or shapes that disagree.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"fit_logistic: features {features.shape} and labels {labels.shape} disagree; "
                         "expected [N, C] and [N]")
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"fit_logistic: labels must lie in 0..{k - 1}, got {labels.min()}..{labels.max()}")
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError(f"fit_logistic: need at least 2 classes in the training labels, got {present.tolist()}")
    scaler = StandardScaler().fit(features)
    clf = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(features), labels)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: one logit z for classes_[1]
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
    w = coef / scaler.scale_[None, :]
    b = icpt - w @ scaler.mean_
    weight = np.zeros((k, features.shape[1]))
    bias = np.full(k, ABSENT_CLASS_BIAS)
    weight[clf.classes_] = w
    bias[clf.classes_] = b
    return weight, bias


@register_model("linear_probe")
class LinearProbeClassifier(nn.Module):
    """Frozen backbone + global average pooling + a fixed linear layer (the fitted logistic regression).

    Args:
        backbone: registry name (see :func:`defectscope.models.list_backbones`) or a built
            :class:`~defectscope.models.backbones.Backbone` (shared across folds, no reload).
        num_classes: ``K``.
        weight: ``[K, C]`` coefficients from :func:`fit_logistic` (``None``: zeros, to be filled by
            ``load_state_dict`` from ``model.ckpt``).
        bias: ``[K]`` intercepts (``None``: zeros).
        pretrained / weights: backbone weights, see :func:`defectscope.models.create_backbone`.
        image_size: nominal input side in pixels (recorded for export).

    Forward:
        ``x``: ``[B, 3, H, W]`` in [0, 1]; returns logits ``[B, K]`` (softmax = the probe's probabilities).

    The module is never trained by gradient: every parameter has ``requires_grad=False`` and
    :meth:`train` keeps it in eval mode (batch-norm statistics stay those of ImageNet).

    Raises:
        ValueError: ``weight`` / ``bias`` shapes that do not match ``[num_classes, C]`` / ``[num_classes]``.
    """

    def __init__(self, backbone: str | Backbone, num_classes: int, weight: torch.Tensor | np.ndarray | None = None,
                 bias: torch.Tensor | np.ndarray | None = None, pretrained: bool = False, weights: str | None = None,
                 image_size: int = 224) -> None:
        super().__init__()
        self.backbone = _as_backbone(backbone, pretrained, weights)
        self.backbone_name = self.backbone.spec.name
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.head = nn.Linear(self.backbone.out_channels, self.num_classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            if weight is not None:
                w = torch.as_tensor(np.asarray(weight), dtype=torch.float32)
                if tuple(w.shape) != tuple(self.head.weight.shape):
                    raise ValueError(f"linear_probe: weight has shape {tuple(w.shape)}, expected "
                                     f"{tuple(self.head.weight.shape)} (num_classes x backbone channels)")
                self.head.weight.copy_(w)
            if bias is not None:
                b = torch.as_tensor(np.asarray(bias), dtype=torch.float32)
                if tuple(b.shape) != (self.num_classes,):
                    raise ValueError(f"linear_probe: bias has shape {tuple(b.shape)}, expected ({self.num_classes},)")
                self.head.bias.copy_(b)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LinearProbeClassifier":
        """Stays in eval mode whatever ``mode`` is (a frozen probe has nothing to train)."""
        return super().train(False)

    def model_kwargs(self) -> dict:
        """Arguments for :func:`defectscope.models.create_model` that rebuild this module (weights from the state dict)."""
        return {"backbone": self.backbone_name, "num_classes": self.num_classes, "image_size": self.image_size}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, C]`` (fp32)."""
        return self.backbone(x).float().mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def train_linear_probe(x_train: np.ndarray, y_train: np.ndarray, num_classes: int | None = None,
                       backbone: str | Backbone = "efficientnet_lite0", pretrained: bool = True,
                       weights: str | None = None, c: float = 1.0, batch_size: int = 32) -> LinearProbeClassifier:
    """Fit the probe on uint8 images ``x_train [N, 3, H, W]`` with labels ``y_train [N]``.

    Returns:
        :class:`LinearProbeClassifier` (eval mode, frozen) with the fitted coefficients.

    Raises:
        ValueError: see :func:`fit_logistic`. WeightsUnavailableError: ``pretrained=True`` for a
        backbone without real weights here.
    """
    bb = _as_backbone(backbone, pretrained, weights)
    feats = extract_features(bb, x_train, batch_size)
    w, b = fit_logistic(feats, y_train, num_classes, c)
    return LinearProbeClassifier(bb, w.shape[0], w, b, image_size=int(np.asarray(x_train).shape[-1]))


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, num_classes: int | None = None,
                     backbone: str | Backbone = "efficientnet_lite0", pretrained: bool = True,
                     weights: str | None = None, c: float = 1.0, batch_size: int = 32) -> np.ndarray:
    """The linear-probe reference: fit on ``(x_train, y_train)``, return the class probabilities of ``x_test``.

    Args:
        x_train: uint8 ``[N, 3, H, W]``; y_train: ``[N]`` int labels.
        x_test: uint8 ``[M, 3, H, W]`` (same size as the model's input).
        num_classes: ``K`` (default ``y_train.max() + 1``).
        backbone: name or built backbone (frozen; EfficientNet-Lite0 ImageNet by default).
        c: inverse L2 strength of the logistic regression on standardised features.

    Returns:
        float64 ``[M, K]`` probabilities (rows sum to 1).
    """
    bb = _as_backbone(backbone, pretrained, weights)
    w, b = fit_logistic(extract_features(bb, x_train, batch_size), y_train, num_classes, c)
    z = extract_features(bb, x_test, batch_size) @ w.T + b
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


@register_model("weld_image_probe")
class WeldImageProbe(nn.Module):
    """The image-only reference of the ``weld`` task: a linear probe on the weld crops.

    Features: the frozen backbone's global-average-pooled features of each of the ``W`` weld crops,
    concatenated ``[B, W * C]``; logits = the fitted logistic regression (:func:`fit_logistic`)
    folded into ``nn.Linear``, as :class:`LinearProbeClassifier`.

    Args:
        num_classes: ``K``; welds: ``W`` crops per sample.
        backbone / pretrained / weights: the frozen backbone (see :func:`defectscope.models.create_backbone`);
            ``model.ckpt`` stores its weights in the state dict, so rebuilding uses ``pretrained=False``.

    Forward:
        ``forward(image, spectra=None)``: ``image`` ``[B, W, 3, h, w]`` in [0, 1]; ``spectra`` ignored;
        returns logits ``[B, K]``.
    """

    def __init__(self, num_classes: int, welds: int = 1, backbone: str | Backbone = "efficientnet_lite0",
                 pretrained: bool = False, weights: str | None = None) -> None:
        super().__init__()
        self.backbone = _as_backbone(backbone, pretrained, weights)
        self.backbone_name = self.backbone.spec.name
        self.num_classes, self.welds = int(num_classes), int(welds)
        self.head = nn.Linear(self.welds * self.backbone.out_channels, self.num_classes)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "WeldImageProbe":
        """Stays in eval mode (a frozen probe has nothing to train)."""
        return super().train(False)

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, W * C]`` pooled features of the crops ``[B, W, 3, h, w]`` in [0, 1] (fp32)."""
        b, w = image.shape[:2]
        f = self.backbone(image.reshape(b * w, *image.shape[2:]).float()).float().mean(dim=(2, 3))
        return f.reshape(b, -1)

    def set_head(self, weight: np.ndarray, bias: np.ndarray) -> "WeldImageProbe":
        """Copy the fitted ``weight [K, W * C]`` and ``bias [K]``.

        Raises:
            ValueError: shapes that do not match.
        """
        set_linear(self.head, weight, bias, "weld_image_probe")
        return self

    def forward(self, image: torch.Tensor, spectra: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(image))
