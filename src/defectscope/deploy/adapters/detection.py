"""Deploy adapter of the ``detection`` task (box models of :mod:`defectscope.models.box_heads`).

**Where the decoding and the NMS run**: the ONNX graph (and the PyTorch export module) ends
*before* any data-dependent selection; thresholding, top-k, non-maximum suppression and the
final cut run in NumPy after the runtime (:func:`fcos_select`, :func:`nms`), identically for
the PyTorch and the ONNX Runtime backends. The graph therefore has a fixed output shape
and needs no ``NonMaxSuppression`` operator.

Exported graph: ``image`` float32 ``[B, 3, S, S]`` RGB in [0, 1] (``S`` = the payload's
``image_size``) ->

- ``boxes`` ``[B, N, 4]``: normalised ``xmin, ymin, xmax, ymax`` in [0, 1];
- ``class_scores`` ``[B, N, L]``.

``fcos_lite`` (torchvision FCOS, Tian et al. 2019): ``N`` = every location of the 5 pyramid
levels (anchors are constants of the graph, computed for the padded input), boxes decoded by
torchvision's ``BoxLinearCoder`` and clipped to the image, ``class_scores`` =
``sqrt(sigmoid(class logit) * sigmoid(centre-ness))`` over torchvision's ``C + 1`` labels
(column 0 is torchvision's background label). NumPy then does exactly what
``FCOS.postprocess_detections`` does: per level, candidates with score > ``score_thresh``
(0.05), the top ``topk_candidates`` (1000) of them, then class-wise NMS at the model's
``nms_thresh`` over all levels, the first ``detections_per_img`` (100) kept; labels are shifted
to 0-based (background-label detections dropped).

``slot_detector`` (paper 002): ``N`` = the ``K`` slots, ``boxes`` = ``cxcywh -> xyxy``
clipped to [0, 1], ``class_scores`` = softmax over the defect classes (the "no defect" logit
of ``mode="slots"`` takes part in the softmax but is not returned). NumPy takes the best class
per slot (:meth:`SlotDetector.postprocess`); slots need no NMS.

The answer keeps the detections with score >= the run's ``score_threshold``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import nn

from defectscope.deploy.adapters._common import draw_boxes, image_to_input, png_base64, read_split, spread
from defectscope.deploy.adapters.base import DeployError, EvalSet, ModelInfo, TaskAdapter, file_sha256, register_adapter
from defectscope.models.box_heads.inference import (  # noqa: F401 (re-exported)
    FCOSInference,
    SlotInference,
    box_inference,
    box_iou,
    fcos_select,
    nms,
    select_detections,
    slot_select,
)


#: the export-ready modules and the selection live with the method (one forward for every caller)
FCOSExport, SlotExport = FCOSInference, SlotInference


class DetectionAdapter(TaskAdapter):
    """Defect boxes: the graph gives boxes and per-class scores, NumPy selects (see the module docstring)."""

    task = "detection"
    agreement_name = "same boxes"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        model, payload, model_path = self.load_run(run_dir, ("class_names", "image_size", "score_threshold"))
        size = int(payload["image_size"])
        name = payload["model_name"]
        try:
            module, settings = box_inference(model, size)
        except ValueError:
            raise DeployError(f"{model_path}: detection model '{name}' has no deploy decoder "
                              "(known: fcos_lite, slot_detector)") from None
        extra = {k: v for k, v in settings.items() if k != "nms_iou"}
        thresholds = {"score": float(payload["score_threshold"])}
        if "nms_iou" in settings:
            thresholds["nms_iou"] = settings["nms_iou"]
        if name == "fcos_lite":
            det = model.det
            norm = {"inside_model": True, "mean": list(det.transform.image_mean), "std": list(det.transform.image_std)}
        else:
            spec = model.backbone.spec
            norm = {"inside_model": True, "mean": list(spec.mean), "std": list(spec.std)}
        info = ModelInfo(
            task=self.task, model_name=name, model_kwargs=payload["model_kwargs"], inputs={"image": [3, size, size]},
            outputs=["boxes", "class_scores"], input_size=(size, size), normalisation=norm,
            class_names=list(payload["class_names"]), thresholds=thresholds,
            extra={**extra, "nms": "numpy after the runtime" if name == "fcos_lite" else "none (slots)",
                   "box_format": "normalised xmin, ymin, xmax, ymax"},
            source=str(Path(run_dir).resolve()), sha256=file_sha256(model_path),
        )
        return module.eval(), info

    def detections(self, info: ModelInfo, boxes: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
        """All detections of one image (normalised ``boxes [M, 4]``, ``scores``, 0-based ``labels``),
        before the run's score threshold: :func:`fcos_select` or :func:`slot_select`."""
        return select_detections({**info.extra, "nms_iou": info.thresholds.get("nms_iou")}, boxes, scores)

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) takes an image only; remove the spectra file")
        return {"image": image_to_input(image, info.input_size)}

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """Answer: ``boxes`` (score >= the run's ``score_threshold``, best first: ``class``,
        ``class_index``, ``score``, ``box`` = ``[xmin, ymin, xmax, ymax]`` pixels of the request image,
        ``box_normalised``), ``class``/``score`` of the best box (``None``/0 without one),
        ``overlay_png`` (boxes and labels drawn on the image)."""
        d = self.detections(info, outputs["boxes"], outputs["class_scores"])
        keep = d["scores"] >= info.thresholds["score"]
        h, w = image.shape[:2] if image is not None else info.input_size
        scale = np.array([w, h, w, h], np.float64)
        norm = d["boxes"][keep].astype(np.float64)
        px = norm * scale
        labels = [int(v) for v in d["labels"][keep]]
        scores = d["scores"][keep]
        names = info.class_names
        found = [{"class": names[k], "class_index": k, "score": float(s), "box": [round(float(v), 2) for v in b],
                  "box_normalised": [float(v) for v in nb]} for k, s, b, nb in zip(labels, scores, px, norm)]
        overlay = png_base64(draw_boxes(image, px, labels, names, scores)) if image is not None else None
        return {"class": found[0]["class"] if found else None, "class_index": found[0]["class_index"] if found else None,
                "score": found[0]["score"] if found else 0.0, "probabilities": {}, "boxes": found,
                "score_threshold": info.thresholds["score"], "overlay_png": overlay}

    map_kind = "boxes overlay: RGB PNG, the image with the kept boxes (score >= score_threshold) and labels drawn"

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray:
        """The image with the answer's boxes drawn, ``uint8 [H, W, 3]`` (the page's overlay)."""
        d = self.detections(info, outputs["boxes"], outputs["class_scores"])
        keep = d["scores"] >= info.thresholds["score"]
        h, w = image.shape[:2]
        px = d["boxes"][keep].astype(np.float64) * np.array([w, h, w, h], np.float64)
        return draw_boxes(image, px, [int(v) for v in d["labels"][keep]], info.class_names, d["scores"][keep])

    predict_options = ("save_images",)
    default_predict_out = "boxes.json"

    def pixel_detections(self, info: ModelInfo, boxes: np.ndarray, scores: np.ndarray, width: int, height: int
                         ) -> dict[str, np.ndarray]:
        """:meth:`detections` of one image in its own pixels (float64 ``boxes [M, 4]`` xyxy, ``scores``, ``labels``)."""
        d = self.detections(info, boxes, scores)
        scale = np.array([width, height, width, height], np.float64)
        return {"boxes": d["boxes"].astype(np.float64).reshape(-1, 4) * scale,
                "scores": np.asarray(d["scores"], np.float64).reshape(-1), "labels": np.asarray(d["labels"]).reshape(-1)}

    def write_predictions(self, predictor, files: list[Path], results: list, skipped: list[tuple[Path, str]],
                          out: Path, save_images: bool = False, **options) -> dict:
        """COCO JSON ``out``: ``images`` (full paths, own sizes), ``categories`` and ``annotations`` with
        ``bbox`` = ``[x, y, w, h]`` pixels of the image's own size and a ``score``, the detections with
        ``score >= score_threshold`` (the run's); ``info`` lists skipped files. With ``save_images``, the
        images with the boxes drawn (the answers' overlays) go to ``<out without suffix>_images/``."""
        import base64

        from defectscope.data.boxes import ImageBoxes, write_coco
        from defectscope.utils.io import atomic_path

        info = predictor.info
        records = []
        for f, r in zip(files, results):
            h, w = r.image_size
            rec = ImageBoxes(Path(f).resolve(), w, h, np.array([b.xyxy for b in r.boxes], np.float64).reshape(-1, 4),
                             [b.label for b in r.boxes])
            rec.scores = np.array([b.score for b in r.boxes], np.float64)
            records.append(rec)
        desc = {"description": f"defectscope predict with {info.source}", "score_threshold": info.thresholds["score"],
                "skipped": [{"file": str(f), "error": e} for f, e in skipped]}
        write_coco(out, records, list(info.class_names), info=desc)
        if save_images:
            folder = Path(out).with_suffix("")
            folder = folder.parent / f"{folder.name}_images"
            folder.mkdir(parents=True, exist_ok=True)
            for rec, r in zip(records, results):
                with atomic_path(folder / f"{Path(rec.image).stem}.png") as tmp:
                    Path(tmp).write_bytes(base64.b64decode(r.answer["overlay_png"]))
        return {"boxes": int(sum(len(r.labels) for r in records))}

    def evaluate(self, predictor, data: Path, out: Path) -> dict:
        """Every annotated image of ``data`` (VOC folder or COCO ``.json``): COCO mAP and the box metrics of
        :func:`~defectscope.evaluation.detection.detection_metrics` over the model's detections (all scores;
        ``score_threshold`` for the box errors), ``out/metrics.json`` and ``out/report.html``.

        Raises:
            BoxFormatError: bad or no annotations (named); ImageReadError: an unreadable image.
        """
        import time

        from defectscope.data.boxes import BoxFormatError, image_class, load_record_images, read_boxes
        from defectscope.engine.run import RunFolder
        from defectscope.evaluation.detection import detection_metrics
        from defectscope.evaluation.detection_report import write_detection_report

        info = predictor.info
        names = list(info.class_names)
        records, _ = read_boxes(data, names)
        if not records:
            raise BoxFormatError(f"{data}: no annotated images")
        x = load_record_images(records, int(info.input_size[0]))
        start = time.perf_counter()
        outs = predictor.run_batches({"image": x.astype(np.float32) / np.float32(255.0)})
        preds = [self.pixel_detections(info, b, s, r.width, r.height)
                 for b, s, r in zip(outs["boxes"], outs["class_scores"], records)]
        ips = len(records) / max(1e-9, time.perf_counter() - start)
        targets = [{"boxes": r.boxes, "labels": np.array([names.index(n) for n in r.labels], dtype=np.int64)} for r in records]
        thr = float(info.thresholds["score"])
        metrics = detection_metrics(preds, targets, [(r.width, r.height) for r in records],
                                    [image_class(r, names) for r in records], names, thr)
        ev = RunFolder(out).create()
        ev.write_metrics({"task": info.task, "run": info.source, "backend": predictor.backend, "data": str(data),
                          "images_per_second": round(ips, 1), "test": metrics})
        write_detection_report(ev, f"defectscope evaluate: {Path(info.source).name} on {Path(data).name}", metrics,
                               {"run": info.source, "backend": predictor.backend, "data": str(data), "images": len(records)},
                               records, preds, targets, names, thr)
        return metrics

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        """Images of ``RUN/split/<split>.txt`` (``path,image class``); targets: the image class index ``[N]``."""
        from defectscope.deploy.images import as_rgb_uint8

        items = spread(read_split(Path(run_dir), split, tuple(info.class_names)), limit)
        x = np.stack([image_to_input(as_rgb_uint8(f), info.input_size) for f, _ in items])
        return EvalSet({"image": x}, np.array([info.class_names.index(lab) for _, lab in items]), [f for f, _ in items])

    def score(self, info: ModelInfo, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple[str, float]:
        """``top-box class %``: share of images whose best detection (any score) has the image's class (NEU-DET:
        one defect class per image); an image without detections counts as wrong."""
        hits = 0
        for i, t in enumerate(targets):
            d = self.detections(info, outputs["boxes"][i], outputs["class_scores"][i])
            hits += int(len(d["labels"]) > 0 and int(d["labels"][0]) == int(t))
        return "top-box class %", 100.0 * hits / max(1, len(targets))

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """``(largest score difference of matched detections, share of images with the same boxes)``.

        Same boxes: the detections with score >= the run's threshold agree one to one in order, same
        class, IoU >= 0.99 (a detection within 1e-3 of the threshold on one side may be missing on the other)."""
        worst, same = 0.0, 0
        n = len(ref["boxes"])
        for i in range(n):
            a = self.detections(info, ref["boxes"][i], ref["class_scores"][i])
            b = self.detections(info, got["boxes"][i], got["class_scores"][i])
            ok, diff = match_detections(a, b, info.thresholds["score"])
            same += int(ok)
            worst = max(worst, diff)
        return worst, same / max(1, n)


def match_detections(a: dict, b: dict, threshold: float, min_iou: float = 0.99, margin: float = 1e-3,
                     coord_tol: float = 1e-4) -> tuple[bool, float]:
    """Whether two detection sets above ``threshold`` are the same boxes, and their largest score difference.

    Detections whose score lies within ``margin`` of ``threshold`` may be present on one side only. The
    others are paired greedily (best IoU first) with a box of the same class that has IoU >= ``min_iou``
    or every coordinate within ``coord_tol`` (normalised units): the second rule covers the degenerate
    zero-width or zero-height boxes an under-trained FCOS predicts, whose IoU is undefined (0 / 0).

    Args:
        a, b: ``{"boxes" [N, 4] normalised xyxy, "scores" [N], "labels" [N]}``.

    Returns:
        ``(every confident detection paired, max |score difference| over the pairs)``.
    """
    def confident(d, lo):
        k = np.asarray(d["scores"]) >= lo
        return np.asarray(d["boxes"]).reshape(-1, 4)[k], np.asarray(d["scores"])[k], np.asarray(d["labels"])[k]

    ba, sa, la = confident(a, threshold + margin)
    bb, sb, lb = confident(b, threshold - margin)
    worst, used = 0.0, np.zeros(len(bb), bool)
    if len(ba) and len(bb):
        iou = box_iou(ba, bb)
        close = np.abs(ba[:, None, :].astype(np.float64) - bb[None, :, :]).max(-1) <= coord_tol
        fit = ((iou >= min_iou) | close) & (la[:, None] == lb[None, :])
        quality = np.where(close, 2.0, iou)
    else:
        fit = quality = np.zeros((len(ba), len(bb)))
    for i in range(len(ba)):
        cand = np.flatnonzero(~used & fit[i].astype(bool))
        if not len(cand):
            return False, float("inf")
        j = cand[np.argmax(quality[i, cand])]
        used[j] = True
        worst = max(worst, abs(float(sa[i]) - float(sb[j])))
    extra = ~used & (sb >= threshold + margin)
    return (not extra.any()), worst


register_adapter(DetectionAdapter())
