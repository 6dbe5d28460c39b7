"""Deploy adapter of the ``anomaly`` task: a thin layer over the run's anomaly model.

The module that ``predict`` and ``evaluate`` run (:meth:`AnomalyAdapter.write_predictions`,
:meth:`AnomalyAdapter.evaluate`), served, exported and benchmarked is the run's :class:`~defectscope.models.anomaly.AnomalyModel`
itself, rebuilt by the task's one loader (:func:`defectscope.engine.anomaly.load_anomaly_run`): its eval
forward maps ``image`` float32 ``[B, 3, H, W]`` RGB in [0, 1] (``H, W`` = the run's ``image_size``) to

- ``pred_score`` ``[B]``: the image anomaly score (defective when above the run's ``threshold``);
- ``anomaly_map`` ``[B, H, W]``: per-pixel anomaly at the input's size (stitched from tiles when the
  model is tiled).

PatchCore's nearest-neighbour search and PaDiM's Mahalanobis distances are part of that forward, so
the ONNX graph is the graph the run scored with. Grad-MobileNet needs the input gradient (a backward
pass), which an ONNX inference graph cannot run: :meth:`AnomalyAdapter.onnx_unsupported` refuses its
export with the model's own note, and it runs on PyTorch (serve / inspect / predict of the run folder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


class AnomalyAdapter(TaskAdapter):
    """Anomaly maps and image scores: PatchCore (ONNX) or Grad-MobileNet (PyTorch), ``defective`` above threshold."""

    task = "anomaly"
    agreement_name = "same decision"

    def load_torch(self, run_dir: Path, member: str | None = None) -> tuple[nn.Module, ModelInfo]:
        """The run's anomaly model (the one loader) and its description.

        Args:
            member: accepted only as the run's own model name (a run holds one anomaly model).

        Raises:
            DeployError: ``member`` names another model.
            RunError: missing, unreadable or outdated checkpoint.
        """
        from defectscope.engine.anomaly import load_anomaly_run
        from defectscope.engine.run import RunFolder

        run = load_anomaly_run(run_dir)
        m = run.model
        if member is not None and member != m.name:
            raise DeployError(f"{RunFolder(run_dir).model_path}: the run holds anomaly model '{m.name}', not '{member}'")
        h, w = run.image_size
        thr = float(run.threshold)
        info = ModelInfo(model_name=m.name, model_kwargs=dict(m.args), inputs={"image": [3, h, w]},
                         outputs=["pred_score", "anomaly_map"], input_size=(h, w),
                         normalisation={"inside_model": True}, thresholds={"pred_score": thr},
                         task=self.task, class_names=list(DECISION_CLASSES), source=str(Path(run_dir).resolve()),
                         sha256=file_sha256(RunFolder(run_dir).model_path),
                         extra={"map_scale": 2.0 * thr if thr > 0 else None, "exportable": bool(m.exportable),
                                "decision": "defective if pred_score > threshold",
                                **({"memory_bank": int(m.memory_bank.shape[0])} if hasattr(m, "memory_bank") else {})})
        return m.eval(), info

    def onnx_unsupported(self, info: ModelInfo) -> str | None:
        from defectscope.models.anomaly import anomaly_model_class

        cls = anomaly_model_class(info.model_name)
        return None if cls.exportable else (cls.export_note or f"{info.model_name} is PyTorch only")

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) takes an image only; remove the spectra file")
        return {"image": image_to_input(image, info.input_size)}

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """Answer: ``class`` (``defective``/``normal``), ``score``, ``threshold``, ``map_max``, ``map_scale``
        (the value shown red), ``member``, ``overlay_png`` (the anomaly map, resized to the request image,
        as a jet heat map over it)."""
        amap = np.asarray(outputs["anomaly_map"], np.float32)
        score = float(np.asarray(outputs["pred_score"]).reshape(()))
        thr = float(info.thresholds["pred_score"])
        k = int(score > thr)
        unit, scale = _display(info, amap)
        overlay = None
        if image is not None:
            overlay = png_base64(heat_overlay(image, unit(resize_map(amap, image.shape[:2]))))
        return {"class": DECISION_CLASSES[k], "class_index": k, "score": score, "probabilities": {},
                "threshold": thr, "member": info.model_name, "map_max": float(amap.max()), "map_scale": scale,
                "overlay_png": overlay}

    map_kind = ("anomaly map: uint8 PNG at the image's size, value = round(255 * min(map / map_scale, 1)) (a model "
                "whose threshold is 0, Grad-MobileNet's log-gradient map: the map's own min..max), map_scale "
                "the value the page shows red (PatchCore: 2 x the image-score threshold)")

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
        """The anomaly map resized to the image, ``uint8 [H, W]`` = ``round(255 * clip(map / map_scale, 0, 1))``."""
        amap = np.asarray(outputs["anomaly_map"], np.float32)
        unit, _ = _display(info, amap)
        return (np.clip(unit(resize_map(amap, image.shape[:2])), 0, 1) * 255).round().astype(np.uint8)

    # ---------------------------------------------------------------- files: ``defectscope predict`` / ``evaluate``

    default_predict_out = "preds.csv"

    def write_predictions(self, predictor, files: list[Path], results: list, skipped: list[tuple[Path, str]],
                          out: Path, **options) -> dict:
        """CSV ``out``: ``file, score, decision, threshold, map, error``, one row per file (skipped files: empty
        fields and the error). ``score`` is the model's ``pred_score``, ``decision`` ``defective`` when above
        ``threshold`` else ``normal``; ``map`` names the PNG written to ``<out stem>_maps/<image stem>.png``:
        the anomaly map resized (bilinear) to the image's own size as a jet heat map over the image
        (the answer's ``overlay_png``, scaled as :attr:`map_kind` says).

        Returns:
            ``{"maps": the maps folder}``.
        """
        import base64
        import csv
        import io

        from defectscope.utils.io import write_bytes, write_text

        out = Path(out)
        map_dir = out.parent / f"{out.stem}_maps"
        thr = float(predictor.info.thresholds["pred_score"])
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "score", "decision", "threshold", "map", "error"])
        for f, r in zip(files, results):
            png = map_dir / f"{Path(f).stem}.png"
            write_bytes(png, base64.b64decode(r.answer["overlay_png"]))
            w.writerow([str(f), f"{r.score:.6f}", r.label, f"{thr:.6f}", str(png), ""])
        for f, err in skipped:
            w.writerow([str(f), "", "", "", "", err])
        write_text(out, buf.getvalue())
        return {"maps": str(map_dir)}

    def evaluate(self, predictor, data: Path, out: Path, batch_size: int = 4) -> dict:
        """Score every image of a labelled folder at the model's input size: a KolektorSDD-layout folder
        (``manifest.csv``, ``images/``, ``masks/``: every row) or an MVTec AD category folder (its ``test/``
        images; good ones without a mask). Metrics (:func:`~defectscope.evaluation.anomaly.anomaly_metrics`):
        image AUROC, AP, F1-max, F1 / precision / recall at the run's threshold, and pixel AUROC and AUPRO
        (FPR limit 0.3) of the maps against the masks (every ``pixel_stride``-th pixel) when every defective
        image has a mask. Writes ``out/metrics.json`` and ``out/report.html``.

        Raises:
            DatasetError: neither layout, or a bad manifest / missing image or mask (named).
        """
        from defectscope.data.images import DatasetError, load_stack
        from defectscope.data.kolektor import read_kolektor_manifest
        from defectscope.data.mvtec import has_pixel_masks, load_item_mask, read_mvtec
        from defectscope.engine.run import RunFolder
        from defectscope.evaluation.anomaly import anomaly_metrics, pixel_stride
        from defectscope.evaluation.anomaly_report import write_anomaly_report

        info = predictor.info
        data = Path(data)
        if (data / "manifest.csv").is_file():
            items, layout = read_kolektor_manifest(data), "KolektorSDD manifest"
        elif (data / "test").is_dir():
            items, layout = [it for it in read_mvtec(data) if it.split == "test"], "MVTec AD test/"
        else:
            raise DatasetError(f"{data}: expected a KolektorSDD-layout folder (manifest.csv, images/, masks/) or an "
                               "MVTec AD category folder (test/<defect>/, ground_truth/<defect>/)")
        if not items:
            raise DatasetError(f"{data}: no image to evaluate ({layout})")
        size = tuple(info.input_size)
        st = pixel_stride(size)
        x = load_stack([it.image for it in items], size)
        y = np.array([int(it.defective) for it in items])
        with_masks = has_pixel_masks(items)
        masks = np.stack([load_item_mask(it, size) for it in items])
        scores, maps = [], []
        for i in range(0, len(x), batch_size):
            o = predictor.run({"image": x[i : i + batch_size].astype(np.float32) / np.float32(255.0)})
            scores.append(np.asarray(o["pred_score"], np.float64).reshape(-1))
            maps.append(np.asarray(o["anomaly_map"], np.float32)[:, ::st, ::st].copy())
        score, amap = np.concatenate(scores), np.concatenate(maps)
        thr = float(info.thresholds["pred_score"])
        decision = score > thr
        metrics = anomaly_metrics(y, score, decision, amap if with_masks else None,
                                  masks[:, ::st, ::st] if with_masks else None)
        metrics["pixel_stride"] = int(st)
        ev = RunFolder(out).create()
        ev.write_metrics({"task": info.task, "run": info.source, "backend": predictor.backend, "data": str(data),
                          "model": info.model_name, "test": metrics})
        idx = np.arange(len(items))
        write_anomaly_report(ev, f"defectscope evaluate: {Path(info.source).name} on {data.name}",
                             {"run": info.source, "backend": predictor.backend, "model": info.model_name,
                              "data": f"{data} ({layout})", "images": f"{len(items)} ({int(y.sum())} defective)",
                              "input size (H x W)": f"{size[0]} x {size[1]}", "threshold": thr},
                             metrics, y, x, masks, [it.id for it in items], idx,
                             {"score": score, "decision": decision, "maps": amap, "stride": st}, thr, info.model_name)
        return metrics

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
        auc = binary_auroc(targets, outputs["pred_score"])
        return "image AUROC %", float("nan") if auc is None else auc * 100.0

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """``(max |difference| over the maps and scores, share of images with the same decision)``."""
        diff = max(float(np.abs(np.asarray(ref[k], np.float64) - np.asarray(got[k], np.float64)).max()) for k in ref)
        thr = float(info.thresholds["pred_score"])
        same = (np.asarray(ref["pred_score"]) > thr) == (np.asarray(got["pred_score"]) > thr)
        return diff, float(same.mean())


def _display(info: ModelInfo, amap: np.ndarray):
    """How a map becomes [0, 1] for display: ``map / map_scale`` (2 x the threshold), or, for a model without a
    positive threshold (Grad-MobileNet: one-class SVM at 0, a log10 map), the map's own min..max."""
    scale = info.extra.get("map_scale")
    if scale:
        return (lambda m: m / float(scale)), float(scale)
    lo, hi = float(amap.min()), float(amap.max())
    return (lambda m: (m - lo) / max(hi - lo, 1e-12)), hi


register_adapter(AnomalyAdapter())
