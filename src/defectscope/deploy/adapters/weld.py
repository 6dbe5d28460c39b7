"""Deploy adapter of the ``weld`` task (paper 000's image + signal fusion model and its baselines).

Exported graph, two inputs (only those the model reads: ``weld_vision`` takes ``image`` only, the
signal-only baselines ``spectra`` only):

- ``image`` float32 ``[B, W, 3, h, w]`` in [0, 1]: the ``W`` weld crops of the sample's first image,
  cut as :func:`defectscope.data.weld.prepare.crop_welds` cuts them at training (fixed horizontal
  bands; the first crop flipped vertically), resized to the payload's ``crop_size`` ``(h, w)``;
- ``spectra`` float32 ``[B, W, C_sel, T]``: the selected channels (Pearson selection, eq. 1, stored as
  ``selected_channels``) min-max normalised with the training statistics (``minmax_lo``/``minmax_hi``),
  ``T`` = the run's ``data.seq_len``;

-> ``logits`` ``[B, K]`` and ``probabilities`` ``[B, K]`` = ``softmax(logits / temperature)`` (the
temperature fitted on the validation part at training; 1 without one), the same probabilities as
``defectscope predict RUN`` (which applies the temperature to its softmax outputs).

Attention (``weld_fusion`` with a cross-attention fusion: ``v2s``, ``s2v``, ``bidirectional``): the
graph has extra outputs from the fusion's attention weights ``P = softmax(Q K^T / sqrt(d))`` (paper
000 eq. 5-8, averaged over the heads), over the ``h' x w'`` grid of vision tokens of each weld crop:

- ``v2s`` (image tokens query the spectral channel tokens; ``bidirectional`` shows this direction):
  ``attention_map`` ``[B, W, h', w']`` = per image position the largest weight it gives one spectral
  channel, ``max_c P[n, c]`` (``1/C_sel`` = no preference, 1 = all on one channel), and
  ``channel_attention`` ``[B, W, C_sel]`` = each channel's weight averaged over the positions (sums to 1);
- ``s2v`` (channels query the image): ``attention_map`` ``[B, W, h', w']`` = the share of attention
  each image position receives, averaged over the channel queries (sums to 1 per weld).

:meth:`WeldAdapter.postprocess` maps it back onto the request image (each weld's crop box, the first
crop's flip undone) as a heat map (``overlay_png``) scaled from the map's minimum (blue) to its maximum
(red) over the sample, and returns the numbers as ``attention``. Add/concat fusions and the baselines
have no cross-attention and answer without it.

Preprocessing (numpy, in :meth:`WeldAdapter.preprocess`) takes the raw request: an image ``uint8
[H, W_px, 3]`` and the raw signals ``[W, C_all, L]`` (``[C_all, L]`` for one weld per sample) with
all of the run's channels in the run's channel order (``info.extra["channels"]``). Series of another
length ``L`` are brought to ``T`` with the run's ``length_policy`` (linear interpolation over the whole
series, or the centred ``T`` steps), as the weld reader does for uniformly sampled series; the service
(exact shape check) takes ``spectra_shape = [W, C_all, T]`` (or ``[C_all, T]``), ``.npy`` (any ``W``) or
CSV (one weld: one row per channel).

Runs with a seam U-Net crop around the predicted seam: the crop boxes depend on the mask (data-
dependent slicing), so ONNX export refuses them; the run folder (PyTorch) runs the U-Net in
preprocessing exactly as the engine does. Cross-validation runs (K fold models averaged) are refused:
deploy one fold's run folder ``RUN/folds/<k>`` or train with ``eval.folds: 1``.

Decision: the arg-max class; with the payload's ``decision`` (OK class and threshold chosen on the
validation part for a target escape rate) also ``defect_score = 1 - p(OK class)`` and
``accept``/``reject``, as ``defectscope predict``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from defectscope.deploy.adapters._common import heat_overlay, png_base64, resize_map
from defectscope.deploy.adapters.base import DeployError, EvalSet, ModelInfo, file_sha256, register_adapter
from defectscope.deploy.adapters.classification import ClassificationAdapter
from defectscope.models.weld_fusion.inference import WeldInference, attention_kind

#: seam U-Nets of loaded run folders by checkpoint SHA-256 (preprocessing of PyTorch predictors only)
_UNETS: dict[str, nn.Module] = {}


#: the export-ready module lives with the method (one forward for the pipeline and every runtime)
WeldExport = WeldInference


def _recipe_data(payload: dict) -> dict:
    return dict((payload.get("recipe") or {}).get("data") or {})


def _crops(image: np.ndarray, mask: np.ndarray | None, extra: dict) -> np.ndarray:
    """``float32 [W, 3, h, w]`` in [0, 1]: the training's uint8 crops divided by 255."""
    from defectscope.data.weld.prepare import crop_welds

    image = image if image.flags.writeable else image.copy()  # torch.from_numpy warns on read-only arrays
    c = crop_welds(image, mask, int(extra["welds"]), tuple(extra["crop_size"]), bool(extra["segmented"]))
    return c.astype(np.float32) / np.float32(255.0)


def prepare_signals(info: ModelInfo, spectra: np.ndarray) -> np.ndarray:
    """Raw signals ``[W, C_all, L]`` (or ``[C_all, L]`` with one weld) -> ``float32 [W, C_sel, T]``:
    length brought to ``T`` (``length_policy``), channels selected, min-max normalised (training statistics).

    Raises:
        DeployError: wrong number of dimensions, welds or channels (expected shape named), non-finite
            values, or a series too short to crop.
    """
    from defectscope.data.weld.channels import minmax_normalise
    from defectscope.data.weld.format import resample_series

    e = info.extra
    w, c_all, t = int(e["welds"]), len(e["channels"]), int(e["seq_len"])
    x = np.asarray(spectra, dtype=np.float32)
    if x.ndim == 2 and w == 1:
        x = x[None]
    if x.ndim != 3 or x.shape[:2] != (w, c_all):
        raise DeployError(f"spectra of shape {list(x.shape)}: model '{info.model_name}' expects {list(e['spectra_shape'][:-1])} "
                          f"+ [time steps] (welds x channels x samples, the run's {c_all} channels in its order: "
                          f"{', '.join(ch['name'] for ch in e['channels'][:4])}, ...)")
    if not np.isfinite(x).all():
        raise DeployError("spectra contain NaN or infinite values")
    if x.shape[2] != t:
        try:
            x = np.stack([resample_series(s, t, e.get("length_policy", "resample")) for s in x])
        except ValueError as exc:
            raise DeployError(f"spectra of {x.shape[2]} time steps: {exc}") from None
    return minmax_normalise(x[:, e["selected_channels"]], e["minmax_lo"], e["minmax_hi"])


class WeldAdapter(ClassificationAdapter):
    """Weld classification from weld crops and process signals: class, probabilities, accept/reject.

    Answers, scores and runtime comparison are the classification ones (arg-max class,
    probabilities, ``defect_score`` / ``decision`` with the run's rule); only loading, inputs and
    the held-out set differ.
    """

    task = "weld"

    def load_torch(self, run_dir: Path) -> tuple[nn.Module, ModelInfo]:
        from defectscope.engine.run import RunFolder
        from defectscope.models import create_model
        from defectscope.models.weld_fusion.torch_model import MODALITIES

        rf = RunFolder(run_dir)
        if not rf.model_path.is_file() and (Path(run_dir) / "crossval.json").is_file():
            raise DeployError(f"{run_dir}: a cross-validation run without a refit model (no model.ckpt); "
                              f"deploy one fold's run folder {Path(run_dir) / 'folds' / '1'} or train with eval.folds: 1")
        model, payload = rf.load_model()
        for key in ("selected_channels", "minmax_lo", "minmax_hi", "welds_per_sample", "crop_size", "class_names"):
            if key not in payload:
                raise DeployError(f"{rf.model_path}: payload has no '{key}'; not a weld checkpoint of this version")
        data = _recipe_data(payload)
        names = tuple(MODALITIES.get(payload["model_name"], ("image", "spectra")))
        w = int(payload["welds_per_sample"])
        h_c, w_c = (int(v) for v in payload["crop_size"])
        t = int(payload["model_kwargs"].get("seq_len", data.get("seq_len", 560)))
        channels = payload.get("channels") or [{"name": f"{float(v):g} nm", "unit": "counts", "wavelength_nm": float(v)}
                                               for v in payload["wavelengths_nm"]]
        sel = [int(i) for i in payload["selected_channels"]]
        sha = file_sha256(rf.model_path)
        shapes = {"image": [w, 3, h_c, w_c], "spectra": [w, len(sel), t]}
        thresholds = {"temperature": float(payload["temperature"])} if "temperature" in payload else {}
        if payload.get("decision"):
            thresholds["decision"] = payload["decision"]
        unet = None
        if payload.get("unet_state_dict") is not None:
            try:
                unet = create_model("weld_seam_unet", **payload["unet_kwargs"])
                unet.load_state_dict(payload["unet_state_dict"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise DeployError(f"{rf.model_path}: cannot rebuild the seam U-Net ({str(exc).splitlines()[0]})") from None
            _UNETS[sha] = unet.float().eval()
        model = model.float().eval()
        kind = attention_kind(model, payload["model_name"])
        outputs, attention = ["logits", "probabilities"], None
        if kind:
            with torch.no_grad():  # one forward pass on zeros gives the vision token grid (h', w')
                model.forward_with_attention(torch.zeros(1, *shapes["image"]), torch.zeros(1, *shapes["spectra"]))
            outputs += ["attention_map"] + (["channel_attention"] if kind == "v2s" else [])
            attention = {"kind": kind, "grid": [int(g) for g in model.grid],
                         "map": ("max over the spectral channels of the heads' mean weight per image position" if kind == "v2s"
                                 else "mean over the channel queries of the heads' mean weight per image position")}
        info = ModelInfo(
            task=self.task, model_name=payload["model_name"], model_kwargs=payload["model_kwargs"],
            inputs={k: shapes[k] for k in names}, outputs=outputs, input_size=(h_c, w_c),
            input_format="image: float32 [W, 3, h, w] weld crops, RGB in [0, 1], the first flipped vertically; "
                         "spectra: float32 [W, C_sel, T] selected channels, min-max normalised",
            normalisation={"inside_model": True, "spectra": "min-max with the training statistics, in preprocessing"},
            class_names=list(payload["class_names"]), thresholds=thresholds,
            extra={"spectra_shape": ([w, len(channels), t] if w > 1 else [len(channels), t]) if "spectra" in names else None,
                   "channels": [{k: c.get(k) for k in ("name", "unit", "wavelength_nm")} for c in channels],
                   "spectral_channels": [{"index": i, "name": channels[i].get("name"),
                                          "wavelength_nm": channels[i].get("wavelength_nm")} for i in sel],
                   "spectra_normalisation": {"kind": "minmax", "lo": [float(v) for v in payload["minmax_lo"]],
                                             "hi": [float(v) for v in payload["minmax_hi"]]},
                   "selected_channels": sel, "minmax_lo": [float(v) for v in payload["minmax_lo"]],
                   "minmax_hi": [float(v) for v in payload["minmax_hi"]], "welds": w, "crop_size": [h_c, w_c],
                   "seq_len": t, "length_policy": data.get("length_policy", "resample"),
                   "segmented": bool(data.get("segmented", True)), "seg_size": int(data.get("seg_size", 128)),
                   "seam_unet": unet is not None, "attention": attention},
            source=str(Path(run_dir).resolve()), sha256=sha,
        )
        return WeldExport(model, names, thresholds.get("temperature", 1.0), kind).eval(), info

    def onnx_unsupported(self, info: ModelInfo) -> str | None:
        if info.extra.get("seam_unet"):
            return ("the run crops each weld around the seam its U-Net predicts, and those crop boxes depend on the "
                    "mask (data-dependent slicing the graph cannot express with fixed shapes); train with "
                    "segmentation.enabled=false (fixed bands) for an ONNX model")
        return None

    def _mask(self, info: ModelInfo, image: np.ndarray) -> np.ndarray | None:
        if not info.extra.get("seam_unet"):
            return None
        unet = _UNETS.get(info.sha256)
        if unet is None:
            raise DeployError(f"model '{info.model_name}' from {info.source} needs its seam U-Net for cropping; "
                              "load the run folder (PyTorch), not an exported file")
        from defectscope.models.weld_fusion.lightning_model import predict_masks

        return predict_masks(unet, [image], int(info.extra["seg_size"]))[0]

    def preprocess(self, info: ModelInfo, image: np.ndarray, spectra: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{"image": float32 [W, 3, h, w], "spectra": float32 [W, C_sel, T]}`` (those the model reads)
        from the image ``uint8 [H, W_px, 3]`` and raw signals ``[W, C_all, L]`` (see the module docstring).

        Raises:
            DeployError: spectra missing for a model that reads them, given to one that does not, or of
                the wrong shape.
        """
        out: dict[str, np.ndarray] = {}
        if "spectra" in info.inputs:
            if spectra is None:
                raise DeployError(f"model '{info.model_name}' ({info.task}) needs the weld signals: an array of shape "
                                  f"{info.extra['spectra_shape']} (welds x channels x samples) per image")
            out["spectra"] = prepare_signals(info, spectra)
        elif spectra is not None:
            raise DeployError(f"model '{info.model_name}' ({info.task}) reads the weld image only; remove the spectra")
        if "image" in info.inputs:
            out["image"] = _crops(image, self._mask(info, image), info.extra)
        return out

    def postprocess(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray | None = None) -> dict:
        """The classification answer (class, probabilities, decision) and, for models with attention
        outputs, ``attention`` (``kind``, ``grid``, ``map_min``/``map_max`` (the values shown blue/red),
        ``weld_peak``: each weld's map maximum, and for ``v2s`` ``channels``: mean weight per selected
        channel name, averaged over the welds, and ``top_channel``) and ``overlay_png``: the image with
        the map blended over each weld's crop box (seam U-Net runs: the boxes of the predicted seam,
        whose mask is computed again here)."""
        ans = super().postprocess(info, outputs, image)
        att = info.extra.get("attention")
        if not att or "attention_map" not in outputs:
            return ans
        amap = np.asarray(outputs["attention_map"], dtype=np.float32)  # [W, h', w']
        lo, hi = float(amap.min()), float(amap.max())
        summary: dict = {"kind": att["kind"], "grid": list(att["grid"]), "map_min": lo, "map_max": hi,
                         "weld_peak": [float(v) for v in amap.reshape(amap.shape[0], -1).max(1)]}
        if "channel_attention" in outputs:
            ch = np.asarray(outputs["channel_attention"], dtype=np.float64).mean(0)  # [C_sel]
            names = [c.get("name") or f"channel {c['index']}" for c in info.extra["spectral_channels"]]
            summary["channels"] = {n: float(v) for n, v in zip(names, ch)}
            summary["top_channel"] = names[int(ch.argmax())]
        ans["attention"] = summary
        if image is not None:
            ans["overlay_png"] = png_base64(self.attention_overlay(info, amap, image))
        return ans

    map_kind = "attention overlay: RGB PNG, the image with the cross-attention map over the weld boxes (models with attention)"

    def map_image(self, info: ModelInfo, outputs: dict[str, np.ndarray], image: np.ndarray) -> np.ndarray | None:
        """:meth:`attention_overlay` of the sample's ``attention_map``; ``None`` for models without one."""
        if "attention_map" not in outputs:
            return None
        return self.attention_overlay(info, np.asarray(outputs["attention_map"], np.float32), image)

    def attention_overlay(self, info: ModelInfo, amap: np.ndarray, image: np.ndarray) -> np.ndarray:
        """``uint8 [H, W_px, 3]``: the image with ``amap`` ``[W, h', w']`` (scaled min..max of the sample to
        blue..red, ``jet``) blended over each weld's crop box; pixels outside the boxes unchanged."""
        from defectscope.data.weld.prepare import weld_boxes

        lo, hi = float(amap.min()), float(amap.max())
        norm = (amap - lo) / (hi - lo) if hi > lo else np.zeros_like(amap)
        out = np.array(image, dtype=np.uint8, copy=True)
        boxes = weld_boxes(image.shape, self._mask(info, image), int(info.extra["welds"]), tuple(info.extra["crop_size"]))
        for k, (y0, y1, x0, x1, _) in enumerate(boxes):
            if y1 <= y0 or x1 <= x0:
                continue
            m = (norm[k][::-1] if k == 0 else norm[k]).copy()  # the first crop was flipped vertically (copy: positive strides)
            out[y0:y1, x0:x1] = heat_overlay(out[y0:y1, x0:x1], resize_map(m, (y1 - y0, x1 - x0)))
        return out

    def _read(self, info: ModelInfo, folder: Path, labelled: bool):
        """``(dataset, raw signals [N, W, C_run, T])`` of a weld folder read as the run reads it."""
        from defectscope.data.weld.format import read_for_run

        e = info.extra
        return read_for_run(folder, e["channels"], int(e["welds"]), int(e["seq_len"]), e.get("length_policy", "resample"),
                            list(info.class_names) if labelled else None)

    def predict_files(self, predictor, inputs: list[Path], out: Path, batch_size: int = 16, **options) -> dict:
        """Classify every sample of one or more weld data folders (labels optional) and write ``out`` as CSV:
        ``folder, id, class, prob_<name>..., [defect_score, decision]`` (one row per sample; the decision
        columns when the run stored an operating point with an OK class).

        The folders' channels are matched to the run's by wavelength (all channels have one) or by name,
        in any order.

        Raises:
            WeldDataError: a folder is not in the format, or its channels (names, units) or welds differ
                from the run's. FileNotFoundError: an input is not a folder.
        """
        import csv
        import io

        from defectscope.utils.io import write_text

        self.check_predict_options(options)
        info = predictor.info
        names = list(info.class_names)
        dec = info.thresholds.get("decision") or {}
        ok = dec.get("ok_class") if dec.get("ok_class") in names else None
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["folder", "id", "class", *[f"prob_{n}" for n in names], *(["defect_score", "decision"] if ok else [])])
        count = 0
        for folder in map(Path, inputs):
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: not a weld data folder (expected a folder with manifest.json)")
            ds, spectra = self._read(info, folder, labelled=False)
            results = predictor.predict([s.image for s in ds.samples], list(spectra), batch_size=batch_size)
            for s, r in zip(ds.samples, results):
                more = [f"{r.defect_score:.6f}", r.decision] if ok else []
                w.writerow([str(folder), s.id, r.label, *[f"{r.scores[n]:.6f}" for n in names], *more])
                count += 1
        write_text(out, buf.getvalue())
        return {"predicted": count, "skipped": [], "out": str(out)}

    def evaluate(self, predictor, data: Path, out: Path) -> dict:
        """A labelled weld folder: the Table-4 classification metrics of the model's (temperature-scaled)
        probabilities, ``seam_dice`` of the seam U-Net's masks against the true masks (``None`` without
        either), ``out/metrics.json`` and ``out/report.html``.

        Raises:
            WeldDataError: the folder is not in the format, or its classes, channels or welds differ from the run's.
        """
        from defectscope.engine.run import RunFolder
        from defectscope.evaluation.classification import classification_metrics
        from defectscope.evaluation.plots import plot_confusion_matrix
        from defectscope.evaluation.report import Report
        from defectscope.evaluation.weld_plots import TABLE4_COLUMNS, percent_strings, seam_dice, table4_rows

        info = predictor.info
        ds, spectra = self._read(info, Path(data), labelled=True)
        images = [s.image for s in ds.samples]
        probs = predictor.outputs(images, list(spectra))["probabilities"]
        names = list(info.class_names)
        metrics = classification_metrics(ds.labels, probs, names)
        masks = [self._mask(info, im) for im in images] if info.extra.get("seam_unet") else None
        metrics["seam_dice"] = None if masks is None else seam_dice(masks, [s.mask for s in ds.samples])
        ev = RunFolder(out).create()
        ev.write_metrics({"task": info.task, "run": info.source, "backend": predictor.backend, "data": str(data),
                          "synthetic": ds.synthetic, "test": metrics})
        rep = Report(f"defectscope evaluate: {Path(info.source).name} on {Path(data).name}", synthetic=ds.synthetic)
        rep.table("Per class (Table 4 layout)", percent_strings(table4_rows(metrics)), TABLE4_COLUMNS)
        plot_confusion_matrix(metrics["confusion_matrix"], names, ev.plots / "confusion_matrix.png")
        rep.image("plots/confusion_matrix.png", "Confusion matrix")
        rep.write(ev.report_path)
        return metrics

    def eval_set(self, run_dir: Path, info: ModelInfo, limit: int | None = None, split: str = "test") -> EvalSet:
        """Samples of ``RUN/split/<split>.txt`` (``sample id,class`` lines) read from the run's weld folder
        (``data.root``, or ``RUN/data`` for simulated runs) as the engine reads them; ``files`` are
        ``<folder>/<sample id>``; targets the class indices ``[N]``.

        Raises:
            DeployError: list or data folder missing, an id not in the folder, a class not the model's.
        """
        from defectscope.data.weld.format import WeldDataError, read_weld_dataset
        from defectscope.deploy.adapters._common import spread
        from defectscope.engine.run import RunFolder

        lst = Path(run_dir) / "split" / f"{split}.txt"
        if not lst.is_file():
            raise DeployError(f"{lst}: not found; the run has no '{split}' split list")
        items = [line.rsplit(",", 1) for line in lst.read_text().splitlines() if line.strip()]
        for n, it in enumerate(items, 1):
            if len(it) != 2 or it[1] not in info.class_names:
                raise DeployError(f"{lst}:{n}: expected 'sample id,class' with a class among {info.class_names}")
        items = spread(items, limit)
        data = _recipe_data(RunFolder(run_dir).load_model_payload())
        root = Path(data["root"]) if data.get("root") else Path(run_dir) / "data"
        try:
            ds = read_weld_dataset(root, int(info.extra["seq_len"]), info.extra.get("length_policy", "resample"),
                                   require_labels=False, load_masks=False)
        except (WeldDataError, OSError) as exc:
            raise DeployError(f"{root}: the run's weld data cannot be read ({exc})") from None
        by_id = {s.id: s for s in ds.samples}
        missing = [i for i, _ in items if i not in by_id]
        if missing:
            raise DeployError(f"{lst}: samples {missing[:5]} are not in {root}/manifest.json")
        per = [self.preprocess(info, by_id[i].image, by_id[i].spectra) for i, _ in items]
        x = {k: np.stack([p[k] for p in per]) for k in info.inputs}
        y = np.array([info.class_names.index(c) for _, c in items], dtype=np.int64)
        return EvalSet(x, y, [root / i for i, _ in items])


register_adapter(WeldAdapter())

__all__ = ["WeldAdapter", "WeldExport", "attention_kind", "prepare_signals"]
