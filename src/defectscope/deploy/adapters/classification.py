"""Deploy adapter of the ``classification`` task (models ``multiscale`` and ``classifier``).

Exported graph: ``image`` float32 ``[B, 3, H, W]`` RGB in [0, 1] (``H, W`` = the run's
``image_size``; normalisation is inside the model) -> ``logits`` ``[B, K]`` and
``probabilities`` ``[B, K]`` (softmax). The decision is the arg-max class; no threshold.
"""

from __future__ import annotations

from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

from defectscope.data.images import resize_uint8
from defectscope.deploy.adapters.base import DeployError, EvalSet, ModelInfo, TaskAdapter, file_sha256, register_adapter
from defectscope.deploy.images import as_rgb_uint8

if TYPE_CHECKING:  # torch only where a PyTorch model is built (load_torch); ONNX answers need none
    from torch import nn


def __getattr__(name: str):
    if name == "ClassifierWithProbabilities":  # lives in classification_export (imports torch)
        from defectscope.deploy.adapters.classification_export import ClassifierWithProbabilities

        return ClassifierWithProbabilities
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_to_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``uint8 [H, W, 3]`` -> ``float32 [3, h, w]`` in [0, 1], resized bilinearly like training."""
    return resize_uint8(image, size).transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)


def resolve_listed(path: Path, run_dir: Path, lst: Path, line: int) -> Path:
    """A file of a split list: absolute, or relative to the training's working directory.

    Relative entries are tried against the current directory, then against each parent of
    the run folder (``/work/runs/X`` finds ``../shared/...`` as ``/work/shared/...``).

    Raises:
        DeployError: not found anywhere (the message lists where it looked).
    """
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path] + [a / path for a in Path(run_dir).resolve().parents]
    for c in candidates:
        if c.is_file():
            return c
    raise DeployError(f"{lst}:{line}: listed file {path} not found (tried {', '.join(str(c) for c in candidates[:3])}, ...); "
                      "run from the directory the run was trained in")


class ClassificationAdapter(TaskAdapter):
    """Image classification: arg-max class and per-class probabilities."""

    task = "classification"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        from defectscope.deploy.adapters.classification_export import ClassifierWithProbabilities
        model, payload, model_path = self.load_run(run_dir)
        size = int(payload["image_size"])
        backbone = getattr(model, "backbone", None)
        norm = {"inside_model": True}
        if backbone is not None and hasattr(backbone, "spec"):
            norm.update(mean=list(backbone.spec.mean), std=list(backbone.spec.std))
        drift = payload.get("drift_reference")
        with_features = drift is not None and backbone is not None
        thresholds = {"temperature": float(payload["temperature"])} if "temperature" in payload else {}
        if payload.get("decision"):
            thresholds["decision"] = payload["decision"]
        info = ModelInfo(
            task=self.task, model_name=payload["model_name"], model_kwargs=payload["model_kwargs"],
            inputs={"image": [3, size, size]},
            outputs=["logits", "probabilities"] + (["features"] if with_features else []), input_size=(size, size),
            normalisation=norm, class_names=list(payload["class_names"]), thresholds=thresholds,
            extra={"drift_reference": drift} if with_features else {},
            source=str(Path(run_dir).resolve()), sha256=file_sha256(model_path),
        )
        return ClassifierWithProbabilities(model, thresholds.get("temperature", 1.0), with_features).eval(), info

    def read_size(self, predictor) -> tuple[int, int]:
        """Classification resizes every image to the model's input: read files at that size."""
        return tuple(int(v) for v in predictor.info.input_size)

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) takes an image only; remove the spectra file")
        return {"image": _image_to_input(image, info.input_size)}

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        p = np.asarray(outputs["probabilities"], dtype=np.float64)
        k = int(p.argmax())
        ans = {"class": info.class_names[k], "class_index": k, "score": float(p[k]),
               "probabilities": {n: float(v) for n, v in zip(info.class_names, p)}, "overlay_png": None}
        dec = info.thresholds.get("decision") if isinstance(info.thresholds, dict) else None
        if dec and dec.get("ok_class") in info.class_names:
            defect = 1.0 - float(p[info.class_names.index(dec["ok_class"])])
            ans.update(defect_score=defect, decision="reject" if defect >= dec["threshold"] else "accept",
                       decision_threshold=dec["threshold"], target_escape_rate=dec["target_escape_rate"])
        return ans

    def write_predictions(self, predictor, files: list[Path], results: list, skipped: list[tuple[Path, str]],
                          out: Path, **options) -> dict:
        """CSV ``file, class, prob_<name>..., [defect_score, decision,] error``: one row per file; skipped
        files have an empty class and the error. Probabilities are temperature-scaled when the run was
        calibrated; ``decision`` (``accept`` / ``reject``) uses the run's stored threshold when it has an OK class."""
        import csv
        import io

        from defectscope.utils.io import write_text

        info = predictor.info
        names = list(info.class_names)
        dec = info.thresholds.get("decision") if isinstance(info.thresholds, dict) else None
        extra = ["defect_score", "decision"] if dec and dec.get("ok_class") in names else []
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "class", *[f"prob_{n}" for n in names], *extra, "error"])
        for f, r in zip(files, results):
            more = [f"{r.defect_score:.6f}", r.decision] if extra else []
            w.writerow([str(f), r.label, *[f"{r.scores[n]:.6f}" for n in names], *more, ""])
        for f, err in skipped:
            w.writerow([str(f), "", *[""] * len(names), *[""] * len(extra), err])
        write_text(out, buf.getvalue())
        return {}

    def evaluate(self, predictor, data: Path, out: Path) -> dict:
        """Every labelled image of ``data`` (class-per-folder or NEU-style names, the model's classes):
        classification metrics of the model's (temperature-scaled) probabilities, ``out/metrics.json``
        and ``out/report.html`` (per-class table, confusion matrix, ROC curves).

        Raises:
            DatasetError: a folder without the model's classes; ImageReadError: an unreadable image (named).
        """
        from defectscope.data.images import discover_labelled_images
        from defectscope.engine.run import RunFolder
        from defectscope.evaluation.classification import classification_metrics
        from defectscope.evaluation.classification_report import write_classification_report

        info = predictor.info
        items, class_names, layout = discover_labelled_images(data, "auto", list(info.class_names))
        y = np.array([it.label for it in items])
        probs = predictor.outputs([it.path for it in items])["probabilities"]
        metrics = classification_metrics(y, probs, class_names)
        ev = RunFolder(out).create()
        ev.write_metrics({"task": info.task, "run": info.source, "backend": predictor.backend, "data": str(data),
                          "layout": layout, "test": metrics})
        write_classification_report(ev, f"defectscope evaluate: {Path(info.source).name} on {Path(data).name}", metrics, y,
                                    probs, class_names, {"run": info.source, "backend": predictor.backend, "data": str(data),
                                                         "images": len(y)})
        return metrics

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        lst = Path(run_dir) / "split" / f"{split}.txt"
        if not lst.is_file():
            raise DeployError(f"{lst}: not found; the run has no held-out split list")
        files, labels = [], []
        index = {c: i for i, c in enumerate(info.class_names)}
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            if not line.strip():
                continue
            path, _, label = line.rpartition(",")
            if label not in index:
                raise DeployError(f"{lst}:{n}: class '{label}' is not among the model's classes {info.class_names}")
            files.append(resolve_listed(Path(path), Path(run_dir), lst, n))
            labels.append(index[label])
        if limit and limit < len(files):
            # every k-th file keeps the class mix of the (class-sorted) list
            keep = np.linspace(0, len(files) - 1, limit).round().astype(int)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        x = np.stack([_image_to_input(as_rgb_uint8(f), info.input_size) for f in files])
        return EvalSet({"image": x}, np.asarray(labels, dtype=np.int64), files)

    def score(self, info: ModelInfo, outputs: dict[str, np.ndarray], targets: np.ndarray) -> tuple[str, float]:
        pred = np.asarray(outputs["probabilities"]).argmax(1)
        return "accuracy %", float((pred == targets).mean() * 100.0)

    def compare(self, info: ModelInfo, ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[float, float | None]:
        """Max |difference| of the probabilities ``[N, K]`` and the share of images with the same top-1 class."""
        a, b = np.asarray(ref["probabilities"], np.float64), np.asarray(got["probabilities"], np.float64)
        return float(np.abs(a - b).max()), float((a.argmax(1) == b.argmax(1)).mean())


register_adapter(ClassificationAdapter())
