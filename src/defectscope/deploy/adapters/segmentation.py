"""Deploy adapter of the ``segmentation`` task (U-Net, :mod:`defectscope.models.unet`).

Exported graph: ``image`` float32 ``[B, 3, H, W]`` RGB in [0, 1] (``H, W`` = the payload's
``input_size``; the encoder's normalisation is inside the model) ->

- ``mask_probabilities`` ``[B, K, H, W]``: sigmoid of the logits (KolektorSDD: ``K = 1``); with
  the payload's ``tta`` the mean over the image and its horizontal, vertical and double flips,
  each flipped back (4 forward passes inside the graph), as :class:`~defectscope.models.unet.inference.UNetInference` (the one forward of the method);
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
from defectscope.models.unet.inference import UNetInference, gaussian_kernel1d  # noqa: F401 (re-exported)

DECISION_CLASSES = ["good", "defective"]
#: the export-ready module is the method's inference module (one forward for training-time test
#: predictions, ``predict``, ``evaluate``, ``serve``, ``inspect`` and the ONNX graph)
SegmentationExport = UNetInference


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

    predict_options = ("save_images",)
    default_predict_out = "masks.csv"

    def predict_files(self, predictor, inputs: list[Path], out: Path, batch_size: int = 16, **options) -> dict:
        """Segment image files; see :meth:`write_predictions`.

        Raises:
            ValueError: two inputs share a file name (``ImageId`` must be unique).
        """
        from defectscope.data.images import expand_inputs

        names = [f.name for f in expand_inputs(inputs)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"input file names must be unique (they become ImageId); repeated: {dup[:5]}")
        return super().predict_files(predictor, inputs, out, batch_size, **options)

    def write_predictions(self, predictor, files: list[Path], results: list, skipped: list[tuple[Path, str]],
                          out: Path, save_images: bool = False, **options) -> dict:
        """The run-length CSV ``out`` (``ImageId,ClassId,EncodedPixels``): the mask probabilities upsampled
        bilinearly to each image's own size and thresholded; every (image, class) gets a row (empty
        ``EncodedPixels`` for no defect). ``save_images`` also writes 0/255 PNG masks to
        ``<out stem>_masks/<image stem>.png`` (``_class<k>`` suffix when K > 1)."""
        from PIL import Image

        from defectscope.data.rle import masks_to_records, write_rle_csv
        from defectscope.utils.io import atomic_path

        out = Path(out)
        mask_dir = out.parent / f"{out.stem}_masks"
        records, scores = [], {}
        for f, r in zip(files, results):
            masks = r.mask.astype(np.uint8)
            scores[f.name] = r.score
            records += masks_to_records(f.name, masks, include_empty=True)
            if save_images:
                for k in range(masks.shape[0]):
                    name = f"{f.stem}.png" if masks.shape[0] == 1 else f"{f.stem}_class{k + 1}.png"
                    with atomic_path(mask_dir / name) as tmp:
                        Image.fromarray(masks[k] * 255).save(tmp, format="PNG")
        write_rle_csv(out, records)
        return {"scores": scores, "mask_dir": str(mask_dir) if save_images else None}

    def evaluate(self, predictor, data: Path, out: Path) -> dict:
        """Every image of a KolektorSDD-layout folder (``manifest.csv``, images/, masks/), at the model's
        input size: :func:`~defectscope.evaluation.segmentation.segmentation_metrics` of the model's mask
        probabilities, ``out/metrics.json`` and ``out/report.html``.

        Raises:
            DatasetError: missing manifest, column or file (named).
        """
        from defectscope.data.masks import load_masked_stack, read_manifest
        from defectscope.engine.run import RunFolder
        from defectscope.evaluation.segmentation import segmentation_metrics
        from defectscope.evaluation.segmentation_report import write_segmentation_report

        info = predictor.info
        items = read_manifest(data)
        x, y = load_masked_stack(items, tuple(info.input_size))
        probs = predictor.run_batches({"image": x.astype(np.float32) / np.float32(255.0)}, 8)["mask_probabilities"]
        thr = float(info.thresholds["pixel"])
        metrics = segmentation_metrics(probs, y, thr, score_method=info.extra.get("image_score", "max"))
        test = {k: v for k, v in metrics.items() if k not in ("image_scores", "per_image_dice")}
        ev = RunFolder(out).create()
        ev.write_metrics({"task": info.task, "run": info.source, "backend": predictor.backend, "data": str(data),
                          "test": test})
        write_segmentation_report(ev, f"defectscope evaluate: {Path(info.source).name} on {Path(data).name}", metrics, x, y,
                                  probs, [it.id for it in items], metrics["image_scores"], metrics["per_image_dice"],
                                  {"run": info.source, "backend": predictor.backend, "data": str(data), "images": len(items)},
                                  thr)
        return test

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
