"""Deploy adapter of the ``segmentation`` task (U-Net, :mod:`defectscope.models.unet`).

Exported graph: ``image`` float32 ``[B, 3, H, W]`` RGB in [0, 1] (``H, W`` = the payload's
``input_size``; the encoder's normalisation is inside the model) ->

- ``mask_probabilities`` ``[B, K, H, W]``: sigmoid of the logits (KolektorSDD: ``K = 1``); with
  the payload's ``tta`` the mean over the image and its horizontal, vertical and double flips,
  each flipped back (4 forward passes inside the graph), as the engine's ``predict_mask_probs``;
- ``image_score`` ``[B]``: the payload's ``image_score`` rule computed in the graph, equal to
  :func:`defectscope.evaluation.segmentation.image_scores`: ``max`` (largest pixel probability),
  ``blur_max`` (largest value after a Gaussian blur, sigma 2 px, truncated at 4 sigma,
  edge pixels repeated: scipy's ``gaussian_filter(mode="nearest")`` as two 1-D convolutions) or
  ``top_mean`` (mean of the top 0.1 % pixel probabilities, maximum over classes).

Decision: ``defective`` when ``image_score >= threshold`` (the payload's pixel threshold, so
with ``max`` an image is defective exactly when its mask is non-empty), else ``good``. The
answer's mask is the probability map upsampled bilinearly to the request image's own size and
thresholded (as ``defectscope predict``), as a Kaggle run-length string (:mod:`defectscope.data.rle`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectscope.deploy.adapters._common import (
    binary_auroc,
    image_to_input,
    mask_overlay,
    png_base64,
    read_split,
    resize_map,
    spread,
)
from defectscope.deploy.adapters.base import DeployError, EvalSet, ModelInfo, TaskAdapter, file_sha256, register_adapter
from defectscope.evaluation.segmentation import IMAGE_SCORE_METHODS

#: ``image_scores`` defaults (evaluation/segmentation.py): blur sigma in map pixels, top-mean share
BLUR_SIGMA = 2.0
BLUR_TRUNCATE = 4.0
TOP_FRACTION = 0.001
DECISION_CLASSES = ["good", "defective"]


def gaussian_kernel1d(sigma: float, truncate: float = BLUR_TRUNCATE) -> torch.Tensor:
    """scipy's 1-D Gaussian weights ``exp(-x^2 / (2 sigma^2))``, normalised, ``x`` in
    ``[-r, r]`` with ``r = int(truncate * sigma + 0.5)`` (``scipy.ndimage.gaussian_filter``); ``[2r + 1]``."""
    r = int(truncate * sigma + 0.5)
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * x**2 / sigma**2)
    return (w / w.sum()).float()


class SegmentationExport(nn.Module):
    """U-Net -> ``(mask_probabilities [B, K, H, W], image_score [B])`` (see the module docstring).

    Args:
        model: the trained U-Net, images ``[B, 3, H, W]`` in [0, 1] -> logits ``[B, K, H, W]``.
        tta: average over the four flips.
        image_score: ``max``, ``blur_max`` or ``top_mean``.
        size: ``(H, W)`` of the input (fixes ``k`` of ``top_mean``).

    Raises:
        DeployError: unknown ``image_score`` rule.
    """

    def __init__(self, model: nn.Module, tta: bool, image_score: str, size: tuple[int, int]) -> None:
        super().__init__()
        if image_score not in IMAGE_SCORE_METHODS:
            raise DeployError(f"image_score rule {image_score!r} unknown; expected one of {IMAGE_SCORE_METHODS}")
        self.model, self.tta, self.rule = model, bool(tta), image_score
        self.register_buffer("kernel", gaussian_kernel1d(BLUR_SIGMA), persistent=False)
        self.top_k = max(1, int(round(TOP_FRACTION * size[0] * size[1])))

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        flips = ((), (3,), (2,), (2, 3)) if self.tta else ((),)
        total = None
        for dims in flips:
            p = torch.sigmoid(self.model(x.flip(dims) if dims else x).float())
            p = p.flip(dims) if dims else p
            total = p if total is None else total + p
        return total / len(flips)

    def blur(self, p: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur of ``[B, K, H, W]`` with repeated edge pixels (scipy ``mode="nearest"``)."""
        b, k, h, w = p.shape
        r = (self.kernel.numel() - 1) // 2
        z = p.reshape(b * k, 1, h, w)
        z = F.conv2d(F.pad(z, (0, 0, r, r), mode="replicate"), self.kernel.view(1, 1, -1, 1))
        z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="replicate"), self.kernel.view(1, 1, 1, -1))
        return z.reshape(b, k, h, w)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.probabilities(image)
        if self.rule == "top_mean":
            score = p.flatten(2).topk(self.top_k, dim=2).values.mean(dim=2).amax(dim=1)
        else:
            q = self.blur(p) if self.rule == "blur_max" else p
            score = q.flatten(1).amax(dim=1)
        return p, score


def _load_masks(files: list[Path], size: tuple[int, int]) -> np.ndarray | None:
    """True masks ``uint8 [N, 1, H, W]`` of KolektorSDD-layout images, found through each image's
    ``<root>/manifest.csv`` (``root`` = the image's folder's parent); ``None`` if any is not found."""
    from defectscope.data.images import DatasetError, ImageReadError
    from defectscope.data.masks import load_mask, read_manifest, resize_mask

    by_root: dict[Path, dict[Path, Path]] = {}
    out = []
    for f in files:
        root = f.resolve().parent.parent
        if root not in by_root:
            try:
                by_root[root] = {it.image.resolve(): it.mask for it in read_manifest(root, splits=None)}
            except (DatasetError, OSError):
                by_root[root] = {}
        mask = by_root[root].get(f.resolve())
        if mask is None:
            return None
        try:
            out.append(resize_mask(load_mask(mask), size)[None])
        except ImageReadError:
            return None
    return np.stack(out).astype(np.uint8)


class SegmentationAdapter(TaskAdapter):
    """U-Net defect masks: mask probabilities, image score, ``defective``/``good`` by threshold."""

    task = "segmentation"
    agreement_name = "mask Dice"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        model, payload, model_path = self.load_run(run_dir, ("input_size", "threshold"))
        h, w = (int(v) for v in payload["input_size"])
        tta, rule = bool(payload.get("tta", False)), str(payload.get("image_score", "max"))
        k = int(payload["model_kwargs"].get("num_classes", 1))
        norm = {"inside_model": True}
        if hasattr(model, "mean"):
            norm.update(mean=[float(v) for v in model.mean.flatten()], std=[float(v) for v in model.std.flatten()])
        thr = float(payload["threshold"])
        info = ModelInfo(
            task=self.task, model_name=payload["model_name"], model_kwargs=payload["model_kwargs"],
            inputs={"image": [3, h, w]}, outputs=["mask_probabilities", "image_score"], input_size=(h, w),
            normalisation=norm, class_names=list(DECISION_CLASSES), thresholds={"pixel": thr, "image_score": thr},
            extra={"mask_classes": list(payload.get("class_names") or ["defect"] * k), "tta": tta, "image_score": rule},
            source=str(Path(run_dir).resolve()), sha256=file_sha256(model_path),
        )
        return SegmentationExport(model, tta, rule, (h, w)).eval(), info

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) takes an image only; remove the spectra file")
        return {"image": image_to_input(image, info.input_size)}

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """Answer: ``class`` (``defective``/``good``), ``score`` (image score), ``threshold``,
        ``image_score_rule``, ``masks`` (one per mask class: ``{"class", "rle", "size": [H, W],
        "pixels"}``, RLE in Kaggle order: column-major, 1-indexed ``start length`` pairs) at the
        request image's size, ``defect_pixels``, and ``overlay_png`` (mask tinted over the image)."""
        from defectscope.data.rle import rle_encode

        probs = np.asarray(outputs["mask_probabilities"], np.float32)  # [K, h, w]
        score = float(np.asarray(outputs["image_score"]).reshape(()))
        thr = float(info.thresholds["pixel"])
        size = image.shape[:2] if image is not None else tuple(info.input_size)
        masks = np.stack([resize_map(p, size) >= thr for p in probs])
        names = info.extra.get("mask_classes") or ["defect"] * len(masks)
        k = int(score >= thr)
        union = masks.any(axis=0)
        overlay = None
        if image is not None:
            overlay = png_base64(mask_overlay(image, union))
        return {"class": DECISION_CLASSES[k], "class_index": k, "score": score, "probabilities": {},
                "threshold": thr, "image_score_rule": info.extra.get("image_score", "max"),
                "defect_pixels": int(union.sum()), "defect_area_share": float(union.mean()),
                "masks": [{"class": n, "size": [int(size[0]), int(size[1])], "pixels": int(m.sum()), "rle": rle_encode(m)}
                          for n, m in zip(names, masks)],
                "rle_format": "Kaggle/Severstal: column-major, 1-indexed 'start length' pairs",
                "overlay_png": overlay}

    map_kind = "mask: uint8 PNG at the image's size, 255 = defect (any mask class, probability >= the pixel threshold), 0 = not"

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
        """The union of the class masks ``uint8 [H, W]`` (255 / 0) at the image's size, as the answer's RLE masks."""
        probs = np.asarray(outputs["mask_probabilities"], np.float32)
        thr = float(info.thresholds["pixel"])
        union = np.stack([resize_map(p, image.shape[:2]) >= thr for p in probs]).any(axis=0)
        return union.astype(np.uint8) * np.uint8(255)

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        """Images of ``RUN/split/<split>.txt`` (``path,good|defective`` lines); targets are the true
        masks ``uint8 [N, K, H, W]`` at the model's size when every image's mask is found through its
        ``manifest.csv``, else the image labels ``[N]`` (1 = defective)."""
        items = spread(read_split(Path(run_dir), split, ("good", "defective")), limit)
        files = [f for f, _ in items]
        from defectscope.deploy.images import as_rgb_uint8

        x = np.stack([image_to_input(as_rgb_uint8(f), info.input_size) for f in files])
        masks = _load_masks(files, tuple(info.input_size))
        targets = masks if masks is not None else np.array([int(lab == "defective") for _, lab in items])
        return EvalSet({"image": x}, targets, files)

    def score(self, info: ModelInfo, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple[str, float]:
        """``Dice %`` (mean over images, Kaggle convention: empty on empty = 1) when ``targets`` are masks,
        else ``image AUROC %`` of the image scores (``nan`` with one kind of image only)."""
        if targets.ndim == 4:
            from defectscope.evaluation.segmentation import dice_per_image

            pred = np.asarray(outputs["mask_probabilities"]) >= float(info.thresholds["pixel"])
            return "Dice %", float(dice_per_image(pred, targets).mean() * 100.0)
        auc = binary_auroc(targets, outputs["image_score"])
        return "image AUROC %", float("nan") if auc is None else auc * 100.0

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """``(max |image score difference|, Dice of the two runtimes' thresholded masks)``; the Dice pools
        every pixel of the set (1.0 when both are empty)."""
        return mask_agreement(ref, got, float(info.thresholds["pixel"]))


def mask_agreement(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], threshold: float) -> tuple[float, float]:
    """``(max |image_score difference|, pooled Dice of the masks at threshold)`` of two runtimes' outputs."""
    diff = float(np.abs(np.asarray(ref["image_score"], np.float64) - np.asarray(got["image_score"], np.float64)).max())
    a = np.asarray(ref["mask_probabilities"]) >= threshold
    b = np.asarray(got["mask_probabilities"]) >= threshold
    total = int(a.sum()) + int(b.sum())
    dice = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
    return diff, dice


register_adapter(SegmentationAdapter())

__all__ = ["SegmentationAdapter", "SegmentationExport", "gaussian_kernel1d", "mask_agreement"]
