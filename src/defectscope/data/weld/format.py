"""The defectscope multimodal weld format: ``manifest.json`` + ``.npy`` spectra + PNG images.

Layout of a data folder (all paths in the manifest are relative to it)::

    manifest.json
    images/S0001.png          # one image per sample (grey or RGB), holding 1..W welds
    masks/S0001.png           # optional seam mask: 0 = background, >0 = weld seam
    spectra/S0001_w1.npy      # per weld: float array [C, T_raw] (channels x time steps)
    spectra/S0001_w2.npy

``manifest.json``::

    {"format": "defectscope-weld/1",
     "classes": ["baseline", "low_power", ...],          # the label vocabulary, in index order
     "welds_per_sample": 2,                               # W: every sample has exactly W welds
     "wavelengths_nm": [317, 355, ..., 1872],             # C channel centre wavelengths
     "sample_rate_hz": 10000,                             # default for every weld
     "samples": [{"id": "S0001", "label": "baseline", "image": "images/S0001.png",
                  "mask": "masks/S0001.png",               # optional
                  "welds": [{"spectra": "spectra/S0001_w1.npy"},
                            {"spectra": "spectra/S0001_w2.npy", "sample_rate_hz": 10000}]}]}

Geometry convention (as the coupons of paper 000, Fig. 4/6): the welds run left to right and are
stacked top to bottom; weld ``k`` lies in the ``k``-th of ``W`` equal horizontal bands of the image.
A weld may override ``wavelengths_nm`` (it must then equal the dataset's) and ``sample_rate_hz``.

Why JSON + NPY + PNG rather than HDF5: every part opens with standard tools (a text editor, an
image viewer, ``numpy.load``), a spectrometer export can be converted sample by sample without a
container library (``h5py`` is not a dependency here), files can be added or replaced one at a time
and diffed under version control, and a broken sample is named by its own file. HDF5 would pay off
only for sets far larger than the paper's 603 samples.

The reader validates everything (:class:`WeldDataError` names the sample id and the field) and
brings every series to a common length ``T`` (paper 000: 560, section 4.1.1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from defectscope.errors import DefectscopeError
from defectscope.utils.io import atomic_path, write_json

FORMAT = "defectscope-weld/1"


class WeldDataError(DefectscopeError, ValueError):
    """A weld data folder is malformed; the message names the file or sample id and the field."""


@dataclass
class WeldSample:
    """One sample (one coupon image with ``W`` welds) as read.

    Attributes:
        id: sample id from the manifest.
        label: class name; ``label_index`` its index in the dataset's classes.
        image: uint8 ``[H, W_px, 3]`` (grey images are repeated to 3 channels).
        mask: uint8 ``[H, W_px]`` in {0, 1} (seam pixels), or ``None`` when the manifest has none.
        spectra: float32 ``[W, C, T]`` (welds, channels, time steps), resampled/cropped to ``T``.
        raw_lengths: time steps per weld before resampling.
        sample_rates_hz: per weld, the rate of the raw series (Hz).
    """

    id: str
    label: str
    label_index: int
    image: np.ndarray
    mask: np.ndarray | None
    spectra: np.ndarray
    raw_lengths: list[int] = field(default_factory=list)
    sample_rates_hz: list[float] = field(default_factory=list)


@dataclass
class WeldDataset:
    """A whole folder: samples plus the dataset-level metadata of the manifest."""

    root: Path
    classes: list[str]
    welds_per_sample: int
    wavelengths_nm: list[float]
    sample_rate_hz: float
    samples: list[WeldSample]
    synthetic: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def labels(self) -> np.ndarray:
        """Class indices ``[N]``."""
        return np.array([s.label_index for s in self.samples], dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        """``True`` when every sample has a seam mask."""
        return bool(self.samples) and all(s.mask is not None for s in self.samples)


def resample_series(x: np.ndarray, length: int, policy: Literal["resample", "crop"] = "resample") -> np.ndarray:
    """Bring a series ``[C, T_raw]`` to ``[C, length]``.

    ``resample``: linear interpolation over the whole series (the weld's duration maps onto
    ``length`` steps); ``crop``: the centred ``length`` steps (requires ``T_raw >= length``).

    Raises:
        ValueError: ``crop`` of a series shorter than ``length``.
    """
    c, t = x.shape
    if t == length:
        return x.astype(np.float32, copy=False)
    if policy == "crop":
        if t < length:
            raise ValueError(f"series of {t} steps is shorter than T={length}; cannot crop")
        start = (t - length) // 2
        return x[:, start : start + length].astype(np.float32, copy=False)
    src = np.linspace(0.0, 1.0, t)
    dst = np.linspace(0.0, 1.0, length)
    return np.stack([np.interp(dst, src, row) for row in x]).astype(np.float32)


def _err(sample: str, fld: str, msg: str) -> WeldDataError:
    return WeldDataError(f"sample '{sample}', field '{fld}': {msg}")


def _load_image(path: Path, sid: str, fld: str) -> np.ndarray:
    if not path.is_file():
        raise _err(sid, fld, f"file {path} not found")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.array(im.convert("RGB") if fld == "image" else im.convert("L"))
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _err(sid, fld, f"{path} is not a readable image ({exc})") from exc
    return arr


def _check_manifest_types(man: dict, mpath: Path) -> None:
    """Type checks of the manifest's JSON before it is used: lists where lists belong, finite
    positive numbers, text for file names. Raises :class:`WeldDataError` naming file and field."""
    import math

    def number(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def bad(fld: str, expected: str, got: object) -> WeldDataError:
        return WeldDataError(f"{mpath}: field '{fld}' must be {expected}, got {json.dumps(got)[:80]}")

    if not isinstance(man["classes"], list) or not all(isinstance(c, str) for c in man["classes"]):
        raise bad("classes", "a list of class names", man["classes"])
    if not isinstance(man["welds_per_sample"], int) or isinstance(man["welds_per_sample"], bool):
        raise bad("welds_per_sample", "an integer", man["welds_per_sample"])
    if not isinstance(man["wavelengths_nm"], list) or not all(number(w) for w in man["wavelengths_nm"]):
        raise bad("wavelengths_nm", "a list of finite numbers", man["wavelengths_nm"])
    if not number(man["sample_rate_hz"]) or man["sample_rate_hz"] <= 0:
        raise bad("sample_rate_hz", "a finite number > 0", man["sample_rate_hz"])
    if not isinstance(man["samples"], list):
        raise bad("samples", "a list of sample objects", man["samples"])
    for i, entry in enumerate(man["samples"]):
        if not isinstance(entry, dict):
            raise bad(f"samples[{i}]", "an object", entry)
        for fld in ("image", "mask", "label"):
            if entry.get(fld) is not None and not isinstance(entry[fld], str):
                raise bad(f"samples[{i}].{fld}", "text", entry[fld])
        if not isinstance(entry.get("id", ""), (str, int)) or isinstance(entry.get("id"), bool):
            raise bad(f"samples[{i}].id", "text or an integer", entry["id"])
        if not isinstance(entry.get("welds", []), list):
            raise bad(f"samples[{i}].welds", "a list of weld objects", entry["welds"])
        for k, weld in enumerate(entry.get("welds", [])):
            where = f"samples[{i}].welds[{k}]"
            if not isinstance(weld, dict):
                raise bad(where, "an object", weld)
            if "spectra" in weld and not isinstance(weld["spectra"], str):
                raise bad(f"{where}.spectra", "a file name", weld["spectra"])
            if "sample_rate_hz" in weld and (not number(weld["sample_rate_hz"]) or weld["sample_rate_hz"] <= 0):
                raise bad(f"{where}.sample_rate_hz", "a finite number > 0", weld["sample_rate_hz"])
            if "wavelengths_nm" in weld and (not isinstance(weld["wavelengths_nm"], list)
                                             or not all(number(w) for w in weld["wavelengths_nm"])):
                raise bad(f"{where}.wavelengths_nm", "a list of finite numbers", weld["wavelengths_nm"])


def read_weld_dataset(root: str | Path, length: int = 560, policy: Literal["resample", "crop"] = "resample",
                      min_length: int = 64, classes: Sequence[str] | None = None, load_masks: bool = True,
                      require_labels: bool = True) -> WeldDataset:
    """Read and validate a weld data folder.

    Args:
        root: folder with ``manifest.json``.
        length: ``T``, time steps every series is brought to (paper 000: 560).
        policy: ``resample`` (linear interpolation) or ``crop`` (centred window).
        min_length: series with fewer raw time steps are rejected.
        classes: expected class vocabulary (e.g. a trained model's); the manifest's must equal it.
        load_masks: read the masks named in the manifest.
        require_labels: every sample must have a label (``False`` for prediction folders:
            a missing label becomes ``""`` with index ``-1``).

    Returns:
        :class:`WeldDataset` with spectra ``[W, C, length]`` per sample.

    Raises:
        WeldDataError: missing/invalid manifest; per sample: missing image or spectra file, unknown
            label, weld count != ``welds_per_sample``, channel count != number of wavelengths,
            NaN/inf values, a series shorter than ``min_length`` (or than ``length`` under ``crop``),
            a mask whose size differs from its image. The message names sample id and field.
    """
    root = Path(root)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise WeldDataError(f"{mpath}: not found; a weld data folder needs a manifest.json (see docs/weld.md)")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeldDataError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(man, dict):
        raise WeldDataError(f"{mpath}: expected a JSON object at the top level, got {type(man).__name__}")
    for key in ("classes", "welds_per_sample", "wavelengths_nm", "sample_rate_hz", "samples"):
        if key not in man:
            raise WeldDataError(f"{mpath}: missing top-level field '{key}'")
    _check_manifest_types(man, mpath)
    if man.get("format", FORMAT) != FORMAT:
        raise WeldDataError(f"{mpath}: field 'format' is {man['format']!r}, expected {FORMAT!r}")
    vocab = [str(c) for c in man["classes"]]
    if classes is not None and list(classes) != vocab:
        raise WeldDataError(f"{mpath}: field 'classes' {vocab} differs from the expected {list(classes)}")
    n_welds = int(man["welds_per_sample"])
    wavelengths = [float(w) for w in man["wavelengths_nm"]]
    default_rate = float(man["sample_rate_hz"])
    if n_welds < 1 or not wavelengths or default_rate <= 0:
        raise WeldDataError(f"{mpath}: welds_per_sample >= 1, a non-empty wavelengths_nm and sample_rate_hz > 0 are required")
    samples: list[WeldSample] = []
    seen: set[str] = set()
    for i, entry in enumerate(man["samples"]):
        sid = str(entry.get("id", f"#{i}"))
        if sid in seen:
            raise _err(sid, "id", "duplicate sample id")
        seen.add(sid)
        label = entry.get("label")
        if label is None or label == "":
            if require_labels:
                raise _err(sid, "label", "missing")
            label, label_index = "", -1
        elif label not in vocab:
            raise _err(sid, "label", f"unknown label {label!r}; known: {vocab}")
        else:
            label_index = vocab.index(label)
        if "image" not in entry:
            raise _err(sid, "image", "missing")
        image = _load_image(root / entry["image"], sid, "image")
        mask = None
        if load_masks and entry.get("mask"):
            mask = (_load_image(root / entry["mask"], sid, "mask") > 0).astype(np.uint8)
            if mask.shape != image.shape[:2]:
                raise _err(sid, "mask", f"size {mask.shape} differs from the image's {image.shape[:2]}")
        welds = entry.get("welds", [])
        if len(welds) != n_welds:
            raise _err(sid, "welds", f"has {len(welds)} weld(s), the manifest declares welds_per_sample={n_welds}")
        series, raw_lengths, rates = [], [], []
        for k, weld in enumerate(welds):
            fld = f"welds[{k}].spectra"
            if "spectra" not in weld:
                raise _err(sid, fld, "missing")
            spath = root / weld["spectra"]
            if not spath.is_file():
                raise _err(sid, fld, f"file {spath} not found")
            try:
                arr = np.load(spath, allow_pickle=False)
            except Exception as exc:
                raise _err(sid, fld, f"{spath} is not a readable .npy array ({exc})") from exc
            wl = [float(w) for w in weld.get("wavelengths_nm", wavelengths)]
            if wl != wavelengths:
                raise _err(sid, f"welds[{k}].wavelengths_nm", "differs from the dataset's wavelengths_nm")
            if arr.ndim != 2:
                raise _err(sid, fld, f"expected a 2-D array [C, T], got shape {arr.shape}")
            if arr.shape[0] != len(wavelengths):
                raise _err(sid, fld, f"has {arr.shape[0]} channels but {len(wavelengths)} wavelengths are declared "
                           f"(array shape {arr.shape}, expected [C={len(wavelengths)}, T])")
            if not np.issubdtype(arr.dtype, np.number):
                raise _err(sid, fld, f"dtype {arr.dtype} is not numeric")
            arr = arr.astype(np.float64)
            if not np.isfinite(arr).all():
                bad = np.argwhere(~np.isfinite(arr))[0]
                kind = "NaN" if np.isnan(arr[tuple(bad)]) else "inf"
                raise _err(sid, fld, f"contains {kind} (first at channel {bad[0]}, time step {bad[1]})")
            t_raw = arr.shape[1]
            if t_raw < min_length or (policy == "crop" and t_raw < length):
                need = length if policy == "crop" else min_length
                raise _err(sid, fld, f"series has {t_raw} time steps, at least {need} are needed")
            rate = float(weld.get("sample_rate_hz", default_rate))
            if rate <= 0:
                raise _err(sid, f"welds[{k}].sample_rate_hz", f"must be > 0, got {rate}")
            series.append(resample_series(arr, length, policy))
            raw_lengths.append(int(t_raw))
            rates.append(rate)
        samples.append(WeldSample(sid, label, label_index, image, mask, np.stack(series).astype(np.float32),
                                  raw_lengths, rates))
    if not samples:
        raise WeldDataError(f"{mpath}: field 'samples' is empty")
    return WeldDataset(root, vocab, n_welds, wavelengths, default_rate, samples, bool(man.get("synthetic", False)),
                       {k: v for k, v in man.items() if k not in ("samples",)})


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)


def write_weld_dataset(root: str | Path, samples: Sequence[dict], classes: Sequence[str], wavelengths_nm: Sequence[float],
                       sample_rate_hz: float, welds_per_sample: int = 2, synthetic: bool = False,
                       extra: dict | None = None) -> Path:
    """Write samples in the format above (files first, the manifest last, each atomically).

    Args:
        root: output folder (created).
        samples: dicts with ``id``, ``label``, ``image`` (uint8 ``[H, W]`` or ``[H, W, 3]``),
            optional ``mask`` (uint8 ``[H, W]``, >0 = seam), ``spectra`` (list of ``W`` float arrays
            ``[C, T_raw]``) and optional ``sample_rates_hz`` (list of ``W``).
        classes, wavelengths_nm, sample_rate_hz, welds_per_sample: the manifest's fields.
        synthetic: marks the set as simulated (reports built on it say so).
        extra: more top-level manifest fields (e.g. the simulator's parameters).

    Returns:
        Path of ``manifest.json``.

    Raises:
        ValueError: a sample's spectra count differs from ``welds_per_sample``.
    """
    root = Path(root)
    entries = []
    for s in samples:
        sid = s["id"]
        if len(s["spectra"]) != welds_per_sample:
            raise ValueError(f"sample '{sid}': {len(s['spectra'])} spectra for welds_per_sample={welds_per_sample}")
        entry: dict = {"id": sid, "label": s["label"], "image": f"images/{sid}.png"}
        _save_png(root / entry["image"], s["image"])
        if s.get("mask") is not None:
            entry["mask"] = f"masks/{sid}.png"
            _save_png(root / entry["mask"], (np.asarray(s["mask"]) > 0).astype(np.uint8) * 255)
        welds = []
        for k, arr in enumerate(s["spectra"]):
            rel = f"spectra/{sid}_w{k + 1}.npy"
            _save_npy(root / rel, np.asarray(arr, dtype=np.float32))
            w = {"spectra": rel}
            if s.get("sample_rates_hz"):
                w["sample_rate_hz"] = float(s["sample_rates_hz"][k])
            welds.append(w)
        entry["welds"] = welds
        entries.append(entry)
    manifest = {"format": FORMAT, "synthetic": synthetic, "classes": list(classes),
                "welds_per_sample": welds_per_sample, "wavelengths_nm": [float(w) for w in wavelengths_nm],
                "sample_rate_hz": float(sample_rate_hz), **(extra or {}), "samples": entries}
    return write_json(root / "manifest.json", manifest)
