"""Deploy adapter of the ``anomaly`` task: PatchCore (exportable) and Grad-MobileNet (PyTorch only).

An anomaly run (``engine/anomaly.py``) stores Grad-MobileNet as its main model and, when the
recipe's peer is enabled, PatchCore beside it. Payload keys read here (nothing else):
``peer_kwargs``, ``peer_state_dict``, ``peer_threshold``, ``peer_image_size`` (PatchCore);
``model_kwargs``, ``state_dict``, ``image_size``, ``grad_config`` (``target``,
``landmark_low``/``landmark_high``, ``map_blur_sigma``), ``feature_spec``, ``ocsvm``
(Grad-MobileNet).

**PatchCore** (Roth et al., CVPR 2022), the default member when the run has it. Exported graph:
``image`` float32 ``[B, 3, H, W]`` RGB in [0, 1] (``H, W`` = ``peer_image_size``) ->

- ``anomaly_map`` ``[B, H, W]``: every patch's Euclidean distance to its nearest memory-bank row,
  upsampled bilinearly to the input and Gaussian-smoothed (sigma 4 px), as
  :meth:`PatchCore.forward`;
- ``image_score`` ``[B]``: the largest patch distance (inside ``score_border``).

The **nearest-neighbour search runs inside the graph**: the memory bank is a constant of the
graph and the distances are ``torch.cdist`` + ``min`` over the bank (exported as
``MatMul``/``ReduceMin``), one product for the whole batch. Decision: ``defective`` when
``image_score > peer_threshold`` (the calibration images' quantile).

**Grad-MobileNet** (paper 001): its anomaly map is the input gradient of the loss (eq. 2-3),
so inference needs a backward pass (autograd). An ONNX inference graph has no
gradient operator, so :meth:`AnomalyAdapter.onnx_unsupported` refuses its export; the PyTorch
predictor runs it (``load_predictor(RUN, member="grad_mobilenet")``, the only member of a run
without a peer): outputs ``anomaly_map`` (blurred gradient norm, ``[B, H, W]``) and
``image_score`` (the one-class SVM score, defective when > 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.deploy.adapters._common import (
    binary_auroc,
    heat_overlay,
    image_to_input,
    png_base64,
    read_split,
    resize_map,
    spread,
)
from defectscope.deploy.adapters.base import DeployError, EvalSet, ModelInfo, TaskAdapter, file_sha256, register_adapter

DECISION_CLASSES = ["normal", "defective"]
MEMBERS = ("patchcore", "grad_mobilenet")
GRAD_NOTE = ("Grad-MobileNet's anomaly map is the gradient of the loss with respect to the input (paper 001, "
             "eq. 2-3): inference needs a backward pass (autograd), which an ONNX inference graph cannot run; "
             "it stays on PyTorch (serve or load_predictor the run folder with member 'grad_mobilenet')")


def gaussian_blur_maps(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of ``[B, 1, H, W]`` maps as torchvision's ``gaussian_blur`` (which
    :class:`~defectscope.models.patchcore.PatchCore` and the anomaly engine use): kernel side
    ``k = 2 * round(4 sigma) + 1``, weights ``exp(-x^2 / (2 sigma^2))`` at ``x`` = ``k`` points from
    ``-(k-1)/2`` to ``(k-1)/2``, normalised; reflected borders. Done as two 1-D convolutions (the 2-D
    kernel is their outer product), which exports to ONNX where torchvision's ``expand`` of the
    kernel over the channels does not trace. Equal to torchvision up to float rounding.

    Raises:
        RuntimeError: a map side not larger than ``k // 2`` (reflection padding needs it).
    """
    if sigma <= 0:
        return maps
    k = int(2 * round(4 * sigma) + 1)
    x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    w = (w / w.sum()).to(maps.dtype)
    z = F.pad(maps, (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    return F.conv2d(F.conv2d(z, w.view(1, 1, k, 1)), w.view(1, 1, 1, k))


class PatchCoreExport(nn.Module):
    """PatchCore with the nearest-neighbour search in the graph: ``image [B, 3, H, W]`` ->
    ``(anomaly_map [B, H, W], image_score [B])``.

    Same function as :meth:`PatchCore.forward`, written without its chunked query loop (a loop
    over ``len(queries)`` would be unrolled for the traced batch size).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.pc = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pc = self.pc
        emb = pc.embed(image)
        b, d, h, w = emb.shape
        q = emb.permute(0, 2, 3, 1).reshape(-1, d)
        dist = torch.cdist(q, pc.memory_bank.float()).amin(dim=1).view(b, 1, h, w)
        m = pc.score_border
        inner = dist[:, :, m : h - m, m : w - m] if m and h > 2 * m and w > 2 * m else dist
        score = inner.flatten(1).amax(dim=1)
        maps = F.interpolate(dist, size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)
        return gaussian_blur_maps(maps, pc.blur_sigma)[:, 0], score


class GradMobileNetScorer(nn.Module):
    """Grad-MobileNet end to end (PyTorch only): ``image [B, 3, H, W]`` -> ``(anomaly_map [B, H, W],
    image_score [B])`` = blurred ``||dL/dx||`` (eq. 3) and the one-class SVM score of the feature.

    Runs its backward pass even when called under ``torch.inference_mode()`` (the predictor's),
    by leaving inference mode for the gradient.
    """

    def __init__(self, model: nn.Module, payload: dict) -> None:
        super().__init__()
        from defectscope.models.grad_mobilenet import GradientFeatureSpec, OneClassScorer

        self.model = model
        cfg = payload.get("grad_config") or {}
        self.target = int(cfg.get("target", 0))
        self.low, self.high = int(cfg.get("landmark_low", 0)), int(cfg.get("landmark_high", 50))
        self.sigma = float(cfg.get("map_blur_sigma", 4.0))
        fs = payload["feature_spec"]
        self.spec = GradientFeatureSpec(tuple(fs["grid"]), int(fs["bins"]), tuple(fs["hist_range"]))
        self.scorer = OneClassScorer.from_state_dict(payload["ocsvm"])

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from defectscope.models.grad_mobilenet import artificial_landmark, gradient_norm, input_gradient

        with torch.inference_mode(False):
            x = image.clone().float()  # a normal tensor: autograd refuses inference tensors
            gn = gradient_norm(input_gradient(self.model, x, self.target))
            lm = artificial_landmark(x, self.low, self.high)
            feats = self.spec(gn, lm).numpy()
            score = torch.from_numpy(self.scorer.score(feats).astype(np.float32))
            maps = gaussian_blur_maps(gn[:, None], self.sigma)[:, 0]
        return maps.detach().clone(), score


class AnomalyAdapter(TaskAdapter):
    """Anomaly maps and image scores: PatchCore (ONNX) or Grad-MobileNet (PyTorch), ``defective`` above threshold."""

    task = "anomaly"
    agreement_name = "same decision"

    def load_torch(self, run_dir: Path, member: str | None = None) -> tuple[nn.Module, ModelInfo]:
        """The run's PatchCore (``member=None`` picks it when the run has one) or Grad-MobileNet.

        Raises:
            DeployError: unknown member, or PatchCore asked of a run without it.
            RunError: unreadable checkpoint.
        """
        from defectscope.engine.run import RunError, RunFolder
        from defectscope.models import create_model

        rf = RunFolder(run_dir)
        payload = rf.load_model_payload()
        peer = payload.get("peer") if isinstance(payload.get("peer"), dict) else None
        if peer is None and payload.get("peer_kwargs"):  # checkpoints written before the pipeline
            peer = {"model_kwargs": payload["peer_kwargs"], "state_dict": payload["peer_state_dict"],
                    "threshold": payload["peer_threshold"], "image_size": payload.get("peer_image_size")}
        has_peer = peer is not None
        member = member or ("patchcore" if has_peer else "grad_mobilenet")
        if member not in MEMBERS:
            raise DeployError(f"{rf.model_path}: anomaly member '{member}' unknown; expected one of {list(MEMBERS)}")
        base = dict(task=self.task, class_names=list(DECISION_CLASSES), source=str(Path(run_dir).resolve()),
                    sha256=file_sha256(rf.model_path))
        if member == "patchcore":
            if not has_peer:
                raise DeployError(f"{rf.model_path}: the run has no PatchCore peer (payload 'peer' missing); "
                                  "use member 'grad_mobilenet'")
            kwargs = dict(peer["model_kwargs"])
            kwargs.pop("pretrained", None)
            try:
                pc = create_model("patchcore", **kwargs, pretrained=False)
                pc.load_state_dict(peer["state_dict"])
            except (KeyError, RuntimeError, TypeError, ValueError) as exc:
                raise RunError(f"{rf.model_path}: PatchCore peer cannot be rebuilt ({str(exc).splitlines()[0]})") from None
            h, w = (int(v) for v in (peer.get("image_size") or payload["image_size"]))
            thr = float(peer["threshold"])
            spec = pc.backbone.spec
            info = ModelInfo(model_name="patchcore", model_kwargs=kwargs, inputs={"image": [3, h, w]},
                             outputs=["anomaly_map", "image_score"], input_size=(h, w),
                             normalisation={"inside_model": True, "mean": list(spec.mean), "std": list(spec.std)},
                             thresholds={"image_score": thr},
                             extra={"member": "patchcore", "memory_bank": int(pc.memory_bank.shape[0]),
                                    "nearest_neighbour": "in the graph (cdist + min over the memory bank)",
                                    "map_scale": 2.0 * thr, "decision": "defective if image_score > threshold"},
                             **base)
            return PatchCoreExport(pc.eval()).eval(), info
        model, payload = rf.load_model()
        h, w = (int(v) for v in payload["image_size"])
        hi = payload["feature_spec"]["hist_range"][1]
        info = ModelInfo(model_name="grad_mobilenet", model_kwargs=payload["model_kwargs"], inputs={"image": [3, h, w]},
                         outputs=["anomaly_map", "image_score"], input_size=(h, w), normalisation={"inside_model": True},
                         thresholds={"image_score": 0.0},
                         extra={"member": "grad_mobilenet", "map_scale": float(10.0 ** float(hi)),
                                "decision": "defective if image_score > threshold (one-class SVM)"},
                         **base)
        return GradMobileNetScorer(model.eval(), payload).eval(), info

    def onnx_unsupported(self, info: ModelInfo) -> str | None:
        return GRAD_NOTE if info.model_name == "grad_mobilenet" else None

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) takes an image only; remove the spectra file")
        return {"image": image_to_input(image, info.input_size)}

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """Answer: ``class`` (``defective``/``normal``), ``score``, ``threshold``, ``map_max``, ``map_scale``
        (the value shown red), ``member``, ``overlay_png`` (the anomaly map, resized to the request image,
        as a jet heat map over it)."""
        amap = np.asarray(outputs["anomaly_map"], np.float32)
        score = float(np.asarray(outputs["image_score"]).reshape(()))
        thr = float(info.thresholds["image_score"])
        k = int(score > thr)
        scale = float(info.extra.get("map_scale") or max(float(amap.max()), 1e-12))
        overlay = None
        if image is not None:
            overlay = png_base64(heat_overlay(image, resize_map(amap, image.shape[:2]) / scale))
        return {"class": DECISION_CLASSES[k], "class_index": k, "score": score, "probabilities": {},
                "threshold": thr, "member": info.model_name, "map_max": float(amap.max()), "map_scale": scale,
                "overlay_png": overlay}

    map_kind = ("anomaly map: uint8 PNG at the image's size, value = round(255 * min(map / map_scale, 1)), map_scale "
                "the value the page shows red (PatchCore: 2 x the image-score threshold)")

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
        """The anomaly map resized to the image, ``uint8 [H, W]`` = ``round(255 * clip(map / map_scale, 0, 1))``."""
        amap = np.asarray(outputs["anomaly_map"], np.float32)
        scale = float(info.extra.get("map_scale") or max(float(amap.max()), 1e-12))
        return (np.clip(resize_map(amap, image.shape[:2]) / scale, 0, 1) * 255).round().astype(np.uint8)

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        """Images of ``RUN/split/<split>.txt`` (``test``: good and defective; ``fit``/``calibration``: good only;
        ``train`` falls back to ``fit`` for int8 calibration); targets ``[N]``, 1 = defective."""
        from defectscope.deploy.images import as_rgb_uint8

        if split == "train" and not (Path(run_dir) / "split" / "train.txt").is_file():
            split = "fit"
        items = spread(read_split(Path(run_dir), split, ("good", "defective")), limit)
        x = np.stack([image_to_input(as_rgb_uint8(f), info.input_size) for f, _ in items])
        return EvalSet({"image": x}, np.array([int(lab == "defective") for _, lab in items]), [f for f, _ in items])

    def score(self, info: ModelInfo, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple[str, float]:
        """``image AUROC %`` of the image scores (``nan`` with one kind of image only)."""
        auc = binary_auroc(targets, outputs["image_score"])
        return "image AUROC %", float("nan") if auc is None else auc * 100.0

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """``(max |difference| over the maps and scores, share of images with the same decision)``."""
        diff = max(float(np.abs(np.asarray(ref[k], np.float64) - np.asarray(got[k], np.float64)).max()) for k in ref)
        thr = float(info.thresholds["image_score"])
        same = (np.asarray(ref["image_score"]) > thr) == (np.asarray(got["image_score"]) > thr)
        return diff, float(same.mean())


register_adapter(AnomalyAdapter())
