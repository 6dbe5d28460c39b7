"""The anomaly-model contract: one torch module per unsupervised method, registered by name.

Every unsupervised model (``models/<method>/torch_model.py``) subclasses :class:`AnomalyModel`:

- **eval forward**: images ``[B, 3, H, W]`` (RGB in [0, 1], ``H, W`` = the run's input size) ->
  :class:`AnomalyOutput` ``(pred_score [B], anomaly_map [B, H, W])`` (the shape of anomalib's
  ``InferenceBatch``): higher = more anomalous; the map is at the input's own size;
- **fit**: :meth:`AnomalyModel.fit` from normal images only (uint8 ``[N, 3, H, W]``), by the model
  itself (memory bank, Gaussians, network training ...);
- **saved as tensors**: ``state_dict()`` (fitted statistics are buffers whose shapes are set on
  loading, see :meth:`AnomalyModel._load_from_state_dict`) + :attr:`AnomalyModel.args` (plain
  JSON-like constructor arguments): ``create_model(name, **args)`` + ``load_state_dict`` rebuilds it;
- **exported by the same graph**: :meth:`forward` is what ONNX traces (``exportable = False`` with
  :attr:`AnomalyModel.export_note` for a model that needs autograd at inference, e.g. Grad-MobileNet).

**Full resolution by tiles** (``tile`` / ``tile_stride`` in the model's recipe block): the input is
cut into overlapping ``tile`` windows at ``tile_stride`` (the last window flush with the far edge),
every window is scored by :meth:`AnomalyModel.score_tiles`, the maps are stitched back (overlaps
averaged) at the input's own size and the image score is the largest window score. Without
``tile`` the model sees the whole input at once (fully convolutional features at the input's
resolution). Tile positions depend only on the input size, so the exported graph (fixed input
size) runs the same windows.

Registry: :func:`register_anomaly_model` adds a class to both :data:`ANOMALY_MODELS` (the anomaly
task's choice by ``model.name``, each with its recipe schema ``Args``) and the general model
registry (``create_model``).
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defectscope.config import StrictModel
from defectscope.errors import UnknownNameError
from defectscope.models.registry import register_model


class AnomalyOutput(NamedTuple):
    """Named outputs of every anomaly model's eval forward (ONNX output names are the field names).

    Attributes:
        pred_score: ``[B]`` float32 image anomaly score (higher = more anomalous).
        anomaly_map: ``[B, H, W]`` float32 per-pixel anomaly, at the input's size.
    """

    pred_score: torch.Tensor
    anomaly_map: torch.Tensor


#: output names, in the order of :class:`AnomalyOutput`
OUTPUT_NAMES = list(AnomalyOutput._fields)


class AnomalyArgs(StrictModel):
    """Recipe block ``model`` of the anomaly task, common part (every model's ``Args`` extends it).

    Attributes:
        name: a registered anomaly model (:data:`ANOMALY_MODELS`).
        tile: ``[h, w]`` window scored at a time (``None``: the whole input at once).
        tile_stride: ``[sh, sw]`` step between windows (``None``: ``tile``, no overlap); smaller than
            ``tile`` gives overlapping windows whose maps are averaged.
        batch_size: images per forward pass when scoring (not a model argument).
        threshold_quantile: decision threshold = this quantile of the calibration images' scores
            (1.0 = their maximum; not a model argument).
    """

    name: str
    tile: tuple[int, int] | None = None
    tile_stride: tuple[int, int] | None = None
    batch_size: int = Field(4, ge=1)
    threshold_quantile: float = Field(1.0, gt=0, le=1)

    #: fields that steer the task, not the module
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("name", "batch_size", "threshold_quantile")

    def module_args(self) -> dict:
        """Constructor arguments of the module (plain JSON-like values)."""
        return self.model_dump(mode="json", exclude=set(self.TASK_FIELDS))


class FeatureAnomalyArgs(AnomalyArgs):
    """:class:`AnomalyArgs` + the frozen feature extractor (:class:`StageFeatures`) that PatchCore, PaDiM
    and the student-teacher's teacher read: a registry ``backbone`` (EfficientNet-Lite0: the ImageNet
    weights reachable here), ``pretrained`` / a local ``weights`` file, and the backbone stages ``layers``."""

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: str | None = None
    layers: list[int] = [2, 4]


class AnomalyModel(nn.Module):
    """Base of every anomaly model (see the module docstring for the contract).

    Subclasses set :attr:`name`, :attr:`Args`, list their data-shaped buffers in
    :attr:`fitted_buffers`, and implement :meth:`score_tiles` and :meth:`fit`.

    Args:
        tile, tile_stride: see :class:`AnomalyArgs`.

    Raises:
        ValueError: a stride larger than the tile, or non-positive sizes.
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type[AnomalyArgs]] = AnomalyArgs
    exportable: ClassVar[bool] = True
    export_note: ClassVar[str | None] = None
    #: buffers whose shape depends on the fitting data (resized from the state dict on loading)
    fitted_buffers: ClassVar[tuple[str, ...]] = ()
    #: a fixed decision threshold of the model's score (``None``: the calibration quantile)
    fixed_threshold: ClassVar[float | None] = None

    def __init__(self, tile: tuple[int, int] | list[int] | None = None,
                 tile_stride: tuple[int, int] | list[int] | None = None) -> None:
        super().__init__()
        self.tile = tuple(int(v) for v in tile) if tile else None
        self.tile_stride = tuple(int(v) for v in (tile_stride or tile)) if tile else None
        if self.tile and (min(self.tile) < 1 or min(self.tile_stride) < 1
                          or any(s > t for s, t in zip(self.tile_stride, self.tile))):
            raise ValueError(f"{self.name}: tile {self.tile} / tile_stride {self.tile_stride}: need 1 <= stride <= tile")
        self.args: dict[str, Any] = {"tile": list(self.tile) if self.tile else None,
                                     "tile_stride": list(self.tile_stride) if self.tile else None}

    # ------------------------------------------------------------ to implement

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:  # pragma: no cover - interface
        """Score images or windows ``[B, 3, h, w]`` in [0, 1] -> ``(pred_score [B], anomaly_map [B, h, w])``."""
        raise NotImplementedError

    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, **context: Any) -> dict:  # pragma: no cover
        """Fit from normal uint8 images ``x_fit [N, 3, H, W]`` (``x_cal``: held-out normal images, for
        models that fit a second stage on unseen data); returns facts for ``metrics.json``."""
        raise NotImplementedError

    # ------------------------------------------------------------ the contract

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        """``x [B, 3, H, W]`` in [0, 1] -> :class:`AnomalyOutput` at the input's size (tiled when ``tile`` is set)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected images [B, 3, H, W], got {tuple(x.shape)}")
        if self.tile is None:
            return self.score_tiles(x)
        return self._tiled(x)

    def _tiled(self, x: torch.Tensor) -> AnomalyOutput:
        b, _, h, w = x.shape
        th, tw = min(self.tile[0], h), min(self.tile[1], w)
        ys, xs = window_starts(h, th, self.tile_stride[0]), window_starts(w, tw, self.tile_stride[1])
        wins = torch.cat([x[:, :, y : y + th, c : c + tw] for y in ys for c in xs])  # [T * B, 3, th, tw]
        out = self.score_tiles(wins)
        n = len(ys) * len(xs)
        scores = out.pred_score.view(n, b).amax(dim=0)
        maps = out.anomaly_map.view(n, b, th, tw)
        acc = x.new_zeros(b, h, w)
        cnt = x.new_zeros(1, h, w)
        k = 0
        for y in ys:
            for c in xs:
                acc = acc + F.pad(maps[k], (c, w - c - tw, y, h - y - th))
                cnt = cnt + F.pad(torch.ones(1, th, tw, dtype=x.dtype, device=x.device), (c, w - c - tw, y, h - y - th))
                k += 1
        return AnomalyOutput(scores, acc / cnt)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # fitted buffers take the saved shape (a memory bank's rows, the positions of a Gaussian grid ...)
        for name in self.fitted_buffers:
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], torch.Tensor):
                setattr(self, name, torch.empty_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 4) -> AnomalyOutput:
        """Score uint8 images ``[N, 3, H, W]`` in batches with :meth:`forward` (eval mode); numpy-free tensors out."""
        self.eval()
        scores, maps = [], []
        for i in range(0, len(x), batch_size):
            out = self(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])).float() / 255.0)
            scores.append(out.pred_score.float())
            maps.append(out.anomaly_map.float())
        if not scores:
            return AnomalyOutput(torch.zeros(0), torch.zeros(0, *x.shape[-2:]))
        return AnomalyOutput(torch.cat(scores), torch.cat(maps))


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` pixels at ``stride`` covering ``size``, the last one flush with the end.

    Example: ``window_starts(10, 4, 3) == [0, 3, 6]``; ``window_starts(11, 4, 3) == [0, 3, 6, 7]``.
    """
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


def gaussian_blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of maps ``[B, 1, H, W]`` (``sigma`` in pixels; 0 = unchanged).

    Kernel side ``k = 2 * round(4 sigma) + 1`` (torchvision's), weights ``exp(-x^2 / (2 sigma^2))``
    normalised, reflected borders; done as two 1-D convolutions so it exports to ONNX. Sides not
    larger than ``k // 2`` fall back to replicated borders.
    """
    if sigma <= 0:
        return maps
    k = int(2 * round(4 * sigma) + 1)
    x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).to(maps.dtype)
    mode = "reflect" if min(maps.shape[-2:]) > k // 2 else "replicate"
    z = F.pad(maps, (k // 2, k // 2, k // 2, k // 2), mode=mode)
    return F.conv2d(F.conv2d(z, w.view(1, 1, k, 1)), w.view(1, 1, 1, k))


def inner_cells(h: int, w: int, border: int) -> tuple[slice, slice]:
    """Row and column slices of an ``h x w`` grid leaving out ``border`` cells at each edge (all cells if too small)."""
    if border and h > 2 * border and w > 2 * border:
        return slice(border, h - border), slice(border, w - border)
    return slice(None), slice(None)


def inner_max(dist: torch.Tensor, border: int) -> torch.Tensor:
    """Largest value of ``dist [B, 1, h, w]`` leaving out ``border`` cells at each edge (all cells if too small) -> ``[B]``."""
    rows, cols = inner_cells(dist.shape[-2], dist.shape[-1], border)
    return dist[:, :, rows, cols].flatten(1).amax(dim=1)


def upsample_map(dist: torch.Tensor, size: tuple[int, int], sigma: float) -> torch.Tensor:
    """Patch-score grid ``[B, 1, h, w]`` -> smoothed map ``[B, H, W]`` (bilinear, then Gaussian ``sigma`` px)."""
    maps = F.interpolate(dist, size=tuple(size), mode="bilinear", align_corners=False)
    return gaussian_blur_maps(maps, sigma)[:, 0]


# ---------------------------------------------------------------- registry

#: name -> anomaly model class (its ``Args`` is the recipe schema of ``model``)
ANOMALY_MODELS: dict[str, type[AnomalyModel]] = {}


def register_anomaly_model(cls: type[AnomalyModel]) -> type[AnomalyModel]:
    """Class decorator: register an :class:`AnomalyModel` subclass under ``cls.name`` (also in ``create_model``).

    Raises:
        ValueError: no name, or a name registered twice.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}: an anomaly model needs a class attribute 'name'")
    if cls.name in ANOMALY_MODELS:
        raise ValueError(f"anomaly model '{cls.name}' registered twice")
    ANOMALY_MODELS[cls.name] = cls
    register_model(cls.name)(cls)
    return cls


def _ensure_loaded() -> None:
    import defectscope.models.grad_mobilenet  # noqa: F401
    import defectscope.models.padim  # noqa: F401
    import defectscope.models.patchcore  # noqa: F401
    import defectscope.models.student_teacher  # noqa: F401
    import defectscope.models.ensemble  # noqa: F401


def anomaly_model_class(name: str) -> type[AnomalyModel]:
    """The registered class of ``name``.

    Raises:
        UnknownNameError: not registered (the message lists the known names).
    """
    _ensure_loaded()
    if name not in ANOMALY_MODELS:
        raise UnknownNameError(f"unknown anomaly model '{name}'; known: {', '.join(sorted(ANOMALY_MODELS))}")
    return ANOMALY_MODELS[name]


def list_anomaly_models() -> list[str]:
    """Registered anomaly model names, sorted."""
    _ensure_loaded()
    return sorted(ANOMALY_MODELS)


def load_anomaly_model(payload: dict, source: str = "checkpoint") -> AnomalyModel:
    """The one loader: an anomaly checkpoint payload -> the fitted module in eval mode.

    ``payload``: ``model_name`` (registered anomaly model), ``model_kwargs`` (its :attr:`AnomalyModel.args`),
    ``state_dict`` (tensors). Backbone weights come from the state dict (``pretrained`` is forced off).

    Raises:
        ValueError: not an anomaly model, arguments that do not build it, or weights that do not fit
            (the message names ``source``).
    """
    name = payload.get("model_name")
    try:
        cls = anomaly_model_class(str(name))
    except UnknownNameError as exc:
        raise ValueError(f"{source}: {exc}") from None
    kwargs = dict(payload.get("model_kwargs") or {})
    if "pretrained" in kwargs:
        kwargs["pretrained"] = False
    try:
        from defectscope.models.registry import check_model_kwargs

        check_model_kwargs(cls.name, kwargs)  # impossible stored arguments are named before anything is built
        model = cls(**kwargs)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ValueError(f"{source}: anomaly model '{name}' cannot be rebuilt ({str(exc).splitlines()[0]})") from None
    return model.eval()


class StageFeatures(nn.Module):
    """Locally aware patch features of a pretrained CNN's stages (PatchCore sec. 3.1, PaDiM sec. 3.1).

    The outputs of the chosen ``blocks`` stages of a timm EfficientNet/MobileNet-style backbone,
    each averaged over a ``neighbourhood x neighbourhood`` window (stride 1), the coarser ones
    upsampled (bilinear) to the first chosen stage's grid, concatenated.

    Args:
        backbone: registry name (only ``efficientnet_lite0/1/2`` carry real ImageNet weights here).
        layers: stage indices (EfficientNet-Lite0: stage 1 stride 4 / 24 ch, 2 stride 8 / 40 ch,
            3 stride 16 / 80 ch, 4 stride 16 / 112 ch).
        pretrained / weights: see :func:`defectscope.models.create_backbone` (never a silent random init).
        neighbourhood: local averaging window (PatchCore's ``p``; 1 = none).

    Forward: ``[B, 3, H, W]`` in [0, 1] -> ``[B, D, H / s, W / s]`` (``s`` = the first stage's stride).

    Raises:
        ValueError: a backbone without ``blocks`` stages, or a layer index out of range.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", layers: tuple[int, ...] | list[int] = (2, 4),
                 pretrained: bool = True, weights: str | None = None, neighbourhood: int = 3) -> None:
        super().__init__()
        from defectscope.models.backbones import create_backbone

        self.backbone = create_backbone(backbone, pretrained=pretrained, weights=weights)
        body = self.backbone.body
        if not hasattr(body, "blocks"):
            raise ValueError(f"backbone '{backbone}' has no 'blocks' stages; use an EfficientNet/MobileNet")
        self.layers = tuple(sorted(int(i) for i in layers))
        if not self.layers or self.layers[-1] >= len(body.blocks) or self.layers[0] < 0:
            raise ValueError(f"layers {list(layers)} outside the backbone's {len(body.blocks)} stages")
        self.neighbourhood = int(neighbourhood)
        self.body = body
        self.eval()

    @property
    def weights_source(self) -> str:
        """Where the backbone weights came from (for reports)."""
        return str(self.backbone.weights_source)

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Raw outputs of the chosen stages of ``x [B, 3, H, W]`` in [0, 1]."""
        bb, body = self.backbone, self.body
        h = body.bn1(body.conv_stem((x - bb.mean) / bb.std))
        maps = []
        for i, block in enumerate(body.blocks):
            h = block(h)
            if i in self.layers:
                maps.append(h)
            if i >= self.layers[-1]:
                break
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = self.stage_maps(x.float())
        p = self.neighbourhood
        if p > 1:
            maps = [F.avg_pool2d(m, p, stride=1, padding=p // 2, count_include_pad=False) for m in maps]
        size = maps[0].shape[-2:]
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                for m in maps]
        return torch.cat(maps, dim=1)

    @property
    def dim(self) -> int:
        """Feature length ``D``."""
        with torch.no_grad():
            return int(self(torch.zeros(1, 3, 64, 64)).shape[1])
