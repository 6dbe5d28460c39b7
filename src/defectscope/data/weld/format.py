"""The defectscope multimodal weld format: ``manifest.json`` + ``.npy`` series + PNG images.

Two versions are read; :func:`write_weld_dataset` writes version 2 (version 1 on request).

**Version 2** (``defectscope-weld/2``): named process channels of any kind, several images per
sample, per-weld time stamps. Layout (all paths in the manifest are relative to the folder)::

    manifest.json
    images/S0001.png              # one view: images/<id>.png; several: images/<id>_v1.png, _v2.png ...
    masks/S0001.png               # optional seam mask per view: 0 = background, >0 = weld seam
    signals/S0001_w1.npy          # per weld: float array [C, T_raw] (channels x time steps)
    signals/S0001_w1_time.npy     # optional per weld: float64 [T_raw] time stamps in seconds, increasing

``manifest.json``::

    {"format": "defectscope-weld/2",
     "classes": ["ok", "porosity"],                       # the label vocabulary, in index order
     "welds_per_sample": 1,                                # W (default 1)
     "channels": [{"name": "current", "unit": "A", "group": "electrical"},
                  {"name": "VIS 317", "unit": "counts", "wavelength_nm": 317}],
     "sample_rate_hz": 10000,                              # optional: rate of welds without time stamps
     "resampling": {"method": "linear", ...},              # optional; only "linear" (numpy.interp) exists
     "min_length": 40,                                     # optional: shortest accepted raw series (default 64)
     "group_field": "batch",                               # optional: what the samples' "group" means
     "samples": [{"id": "S0001", "label": "ok",
                  "images": [{"path": "images/S0001_v1.png", "view": "top", "mask": "masks/S0001_v1.png"},
                             {"path": "images/S0001_v2.png", "view": "side"}],
                  "metadata": {"material": "AlMg3", "joint": "lap"},   # optional, JSON scalars
                  "group": "B2",                                       # optional, for grouped CV
                  "welds": [{"signals": "signals/S0001_w1.npy", "time_s": "signals/S0001_w1_time.npy",
                             "start": "2025-03-04T10:15:02.125"}]}]}  # "start" optional, informative

A channel's ``group`` defaults to ``VIS`` / ``NIR`` from its wavelength (split at 1000 nm, as the two
spectrometers of paper 000) and to ``other`` without one (:func:`defectscope.data.weld.channels.channel_group`).
A sample may give ``"image"`` / ``"mask"`` (one view) instead of ``"images"``.

**Version 1** (``defectscope-weld/1``, read unchanged): ``wavelengths_nm`` instead of ``channels``,
one ``image`` (+ optional ``mask``) per sample, welds ``{"spectra": ..., "sample_rate_hz": ...}`` at a
fixed rate; its channels are read as ``{"name": "<w> nm", "unit": "counts", "wavelength_nm": w}``.

Geometry convention (as the coupons of paper 000, Fig. 4/6): the welds run left to right and are
stacked top to bottom; weld ``k`` lies in the ``k``-th of ``W`` equal horizontal bands of the image.

Why JSON + NPY + PNG rather than HDF5: every part opens with standard tools (a text editor, an
image viewer, ``numpy.load``), an export can be converted sample by sample without a container
library (``h5py`` is not a dependency here), files can be added or replaced one at a time and diffed
under version control, and a broken sample is named by its own file. HDF5 would pay off only for
sets far larger than the paper's 603 samples.

The reader validates everything (:class:`WeldDataError` names the sample id and the field) and
brings every series to a common length ``T`` (paper 000: 560, section 4.1.1). Series with time stamps
are resampled by time: linear interpolation (``numpy.interp``) onto ``T`` equally spaced instants from
the weld's first to its last time stamp; series without are assumed uniform (fixed rate).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from PIL import Image

from defectscope.data.images import check_pixels
from defectscope.data.weld.channels import channel_group
from defectscope.errors import DefectscopeError
from defectscope.utils.io import atomic_path, write_json

FORMAT_V1 = "defectscope-weld/1"
FORMAT_V2 = "defectscope-weld/2"
#: the version :func:`write_weld_dataset` writes by default
FORMAT = FORMAT_V2
#: default shortest raw series (time steps) the reader accepts when the manifest names none
DEFAULT_MIN_LENGTH = 64
#: how series are brought to ``T`` steps; stored in v2 manifests and in :attr:`WeldDataset.resampling`
RESAMPLING = {"method": "linear", "function": "numpy.interp",
              "grid": "T equally spaced instants from each weld's first to its last time stamp "
                      "(welds without time stamps: equally spaced raw samples)"}
_CHANNEL_KEYS = {"name", "unit", "wavelength_nm", "group", "description"}


class WeldDataError(DefectscopeError, ValueError):
    """A weld data folder is malformed; the message names the file or sample id and the field."""


@dataclass
class WeldSample:
    """One sample (one coupon with ``W`` welds, one or more images of it) as read.

    Attributes:
        id: sample id from the manifest.
        label: class name; ``label_index`` its index in the dataset's classes (``""`` / ``-1`` when
            unlabelled and ``require_labels=False``).
        image: uint8 ``[H, W_px, 3]``, the first view (grey images are repeated to 3 channels).
        mask: uint8 ``[H, W_px]`` in {0, 1} (seam pixels) of the first view, or ``None``.
        spectra: float32 ``[W, C, T]`` (welds, channels, time steps), resampled/cropped to ``T``; all
            process channels in the order of :attr:`WeldDataset.channels` (the name is kept from
            version 1, where every channel was a spectrometer line; :attr:`signals` is an alias).
        raw_lengths: time steps per weld before resampling.
        sample_rates_hz: per weld, the rate of the raw series (Hz); with time stamps the mean rate
            ``(T_raw - 1) / duration``.
        views: every image of the sample, uint8 ``[H_v, W_v, 3]`` each (``views[0] is image``).
        view_names: one name per view (v1 and unnamed views: ``"image"``, ``"view2"``, ...).
        view_masks: per view, uint8 ``[H_v, W_v]`` in {0, 1} or ``None`` (``view_masks[0] is mask``).
        durations_s: per weld, seconds from the first to the last raw time step.
        metadata: per-sample metadata from the manifest (e.g. material, joint type); ``{}`` if none.
        group: the sample's group id (e.g. batch or part) for grouped cross-validation, or ``None``.
    """

    id: str
    label: str
    label_index: int
    image: np.ndarray
    mask: np.ndarray | None
    spectra: np.ndarray
    raw_lengths: list[int] = field(default_factory=list)
    sample_rates_hz: list[float] = field(default_factory=list)
    views: list[np.ndarray] = field(default_factory=list)
    view_names: list[str] = field(default_factory=list)
    view_masks: list[np.ndarray | None] = field(default_factory=list)
    durations_s: list[float] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    group: str | None = None

    @property
    def signals(self) -> np.ndarray:
        """Alias of :attr:`spectra`: float32 ``[W, C, T]``."""
        return self.spectra


@dataclass
class WeldDataset:
    """A whole folder: samples plus the dataset-level metadata of the manifest.

    Attributes:
        root: the folder.
        classes: label vocabulary in index order.
        welds_per_sample: ``W``.
        wavelengths_nm: ``[C]`` channel wavelengths (nm) when EVERY channel has one (spectrometer
            data: all v1 folders, the simulator's v2 folders); ``None`` as soon as one channel has
            none (e.g. current, voltage, audio). Use :attr:`channel_names` / :attr:`channel_groups`
            for labels and channel selection then.
        sample_rate_hz: the manifest's default rate (Hz) for welds without time stamps; ``None`` when
            a v2 manifest gives none (every weld then has its own time stamps).
        samples: the samples, in manifest order.
        synthetic: the set is simulated.
        extra: the manifest's top-level fields except ``samples``.
        channels: ``[C]`` dicts ``{"name", "unit", "wavelength_nm" (float or None), "group"}``, the
            group filled in (explicit, else VIS/NIR from the wavelength, else ``"other"``).
        format_version: 1 or 2.
        resampling: how series were brought to ``length`` steps (:data:`RESAMPLING` plus ``length``
            and ``policy``).
        group_field: what the samples' ``group`` means (e.g. ``"batch"``), or ``None``.
    """

    root: Path
    classes: list[str]
    welds_per_sample: int
    wavelengths_nm: list[float] | None
    sample_rate_hz: float | None
    samples: list[WeldSample]
    synthetic: bool = False
    extra: dict = field(default_factory=dict)
    channels: list[dict] = field(default_factory=list)
    format_version: int = 2
    resampling: dict = field(default_factory=dict)
    group_field: str | None = None

    @property
    def labels(self) -> np.ndarray:
        """Class indices ``[N]``."""
        return np.array([s.label_index for s in self.samples], dtype=np.int64)

    @property
    def has_masks(self) -> bool:
        """``True`` when every sample has a seam mask (of its first view)."""
        return bool(self.samples) and all(s.mask is not None for s in self.samples)

    @property
    def channel_names(self) -> list[str]:
        """``[C]`` channel names."""
        return [c["name"] for c in self.channels]

    @property
    def channel_units(self) -> list[str]:
        """``[C]`` channel units."""
        return [c["unit"] for c in self.channels]

    @property
    def channel_groups(self) -> list[str]:
        """``[C]`` group of each channel (``VIS``, ``NIR``, ``electrical``, ``acoustic``, ``other``...)."""
        return [c["group"] for c in self.channels]

    @property
    def channel_labels(self) -> list[str]:
        """``[C]`` short labels for plots: ``"317 nm"`` with a wavelength, else ``"current (A)"``."""
        out = []
        for c in self.channels:
            w = c.get("wavelength_nm")
            out.append(f"{w:.0f} nm" if w is not None else (f"{c['name']} ({c['unit']})" if c["unit"] else c["name"]))
        return out

    @property
    def groups(self) -> list[str | None]:
        """``[N]`` group id of every sample (``None`` where the manifest gives none)."""
        return [s.group for s in self.samples]

    @property
    def has_groups(self) -> bool:
        """``True`` when every sample has a group id (grouped cross-validation is possible)."""
        return bool(self.samples) and all(s.group is not None for s in self.samples)

    @property
    def metadata(self) -> list[dict]:
        """``[N]`` per-sample metadata dicts."""
        return [s.metadata for s in self.samples]

    @property
    def views_per_sample(self) -> list[int]:
        """``[N]`` number of images of every sample."""
        return [len(s.views) for s in self.samples]


def resample_series(x: np.ndarray, length: int, policy: Literal["resample", "crop"] = "resample") -> np.ndarray:
    """Bring a uniformly sampled series ``[C, T_raw]`` to ``[C, length]``.

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


def resample_by_time(x: np.ndarray, time_s: np.ndarray, length: int,
                     policy: Literal["resample", "crop"] = "resample") -> np.ndarray:
    """Bring an irregularly sampled series ``[C, T_raw]`` with time stamps ``[T_raw]`` (s) to ``[C, length]``.

    ``resample``: linear interpolation (``numpy.interp``) onto ``length`` equally spaced instants from
    ``time_s[0]`` to ``time_s[-1]``. ``crop``: first onto ``T_raw`` equally spaced instants over the
    same span (the mean raw rate), then the centred ``length`` steps.

    Raises:
        ValueError: time stamps not strictly increasing or of a length other than ``T_raw``; ``crop``
            of a series shorter than ``length``.
    """
    t = np.asarray(time_s, dtype=np.float64)
    c, n = x.shape
    if t.shape != (n,):
        raise ValueError(f"time stamps of shape {t.shape} for a series of {n} steps")
    if n > 1 and not (np.diff(t) > 0).all():
        raise ValueError("time stamps must increase strictly")
    if policy == "crop":
        if n < length:
            raise ValueError(f"series of {n} steps is shorter than T={length}; cannot crop")
        uniform = np.stack([np.interp(np.linspace(t[0], t[-1], n), t, row) for row in x])
        return resample_series(uniform, length, "crop")
    grid = np.linspace(t[0], t[-1], length)
    return np.stack([np.interp(grid, t, row) for row in x.astype(np.float64)]).astype(np.float32)


def _err(sample: str, fld: str, msg: str) -> WeldDataError:
    return WeldDataError(f"sample '{sample}', field '{fld}': {msg}")


def _load_image(path: Path, sid: str, fld: str, mode: Literal["RGB", "L"] = "RGB") -> np.ndarray:
    if not path.is_file():
        raise _err(sid, fld, f"file {path} not found")
    try:
        with Image.open(path) as im:
            check_pixels(im, str(path))
            im.load()
            arr = np.array(im.convert(mode))
    except Exception as exc:  # PIL raises many types for corrupt files
        raise _err(sid, fld, f"{path} is not a readable image ({exc})") from exc
    return arr


def _load_npy(path: Path, sid: str, fld: str) -> np.ndarray:
    if not path.is_file():
        raise _err(sid, fld, f"file {path} not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise _err(sid, fld, f"{path} is not a readable .npy array ({exc})") from exc
    if not np.issubdtype(arr.dtype, np.number):
        raise _err(sid, fld, f"dtype {arr.dtype} is not numeric")
    return arr


def v1_channels(wavelengths_nm: Sequence[float]) -> list[dict]:
    """The channel dicts of a version-1 folder: ``{"name": "317 nm", "unit": "counts", "wavelength_nm": 317.0, "group": "VIS"}``."""
    out = []
    for w in wavelengths_nm:
        ch = {"name": f"{float(w):g} nm", "unit": "counts", "wavelength_nm": float(w)}
        ch["group"] = channel_group(ch)
        out.append(ch)
    return out


def normalise_channels(channels: object, source: str = "") -> list[dict]:
    """Validate a v2 ``channels`` list and fill in each channel's group.

    Args:
        channels: list of dicts with ``name`` (non-empty, unique), ``unit`` (string, may be empty
            for dimensionless), optional ``wavelength_nm`` (> 0), ``group`` (non-empty), ``description``.
        source: prefix of error messages (e.g. ``".../manifest.json: "``).

    Returns:
        ``[C]`` dicts with keys ``name``, ``unit``, ``wavelength_nm`` (float or ``None``), ``group``
        (and ``description`` when given).

    Raises:
        WeldDataError: not a non-empty list, unknown keys, missing/invalid name or unit, duplicate
            names, a non-positive wavelength; the message names the field, e.g. ``field 'channels[2].unit'``.
    """
    if not isinstance(channels, list) or not channels:
        raise WeldDataError(f"{source}field 'channels': expected a non-empty list of channels, got {channels!r:.80}")
    out, seen = [], set()
    for i, ch in enumerate(channels):
        def bad(key: str, msg: str) -> WeldDataError:
            return WeldDataError(f"{source}field 'channels[{i}]{'.' + key if key else ''}': {msg}")

        if not isinstance(ch, dict):
            raise bad("", f"expected an object {{'name', 'unit', ...}}, got {ch!r:.60}")
        unknown = set(ch) - _CHANNEL_KEYS
        if unknown:
            raise bad("", f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_CHANNEL_KEYS)}")
        name = ch.get("name")
        if not isinstance(name, str) or not name.strip():
            raise bad("name", f"a non-empty string is required, got {name!r}")
        if name in seen:
            raise bad("name", f"duplicate channel name {name!r}")
        seen.add(name)
        unit = ch.get("unit")
        if not isinstance(unit, str):
            raise bad("unit", f"a string is required (e.g. 'A', 'V', 'counts'; '' if dimensionless), got {unit!r}")
        wl = ch.get("wavelength_nm")
        if wl is not None:
            if isinstance(wl, bool) or not isinstance(wl, (int, float)) or not math.isfinite(wl) or wl <= 0:
                raise bad("wavelength_nm", f"a positive number (nm) is required, got {wl!r}")
            wl = float(wl)
        grp = ch.get("group")
        if grp is not None and (not isinstance(grp, str) or not grp.strip()):
            raise bad("group", f"a non-empty string is required, got {grp!r}")
        norm = {"name": name, "unit": unit, "wavelength_nm": wl, "group": grp}
        norm["group"] = channel_group(norm)
        if "description" in ch:
            norm["description"] = str(ch["description"])
        out.append(norm)
    return out


def _check_series(arr: np.ndarray, sid: str, fld: str, n_channels: int, declared: str) -> np.ndarray:
    if arr.ndim != 2:
        raise _err(sid, fld, f"expected a 2-D array [C, T], got shape {arr.shape}")
    if arr.shape[0] != n_channels:
        raise _err(sid, fld, f"has {arr.shape[0]} channels but {n_channels} {declared} declared "
                   f"(array shape {arr.shape}, expected [C={n_channels}, T])")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        kind = "NaN" if np.isnan(arr[tuple(bad)]) else "inf"
        raise _err(sid, fld, f"contains {kind} (first at channel {bad[0]}, time step {bad[1]})")
    return arr


def _check_times(t: np.ndarray, sid: str, fld: str, t_raw: int) -> np.ndarray:
    if t.ndim != 1 or t.shape[0] != t_raw:
        raise _err(sid, fld, f"expected a 1-D array of {t_raw} time stamps (one per time step), got shape {t.shape}")
    t = t.astype(np.float64)
    if not np.isfinite(t).all():
        raise _err(sid, fld, f"contains NaN/inf (first at time step {int(np.argwhere(~np.isfinite(t))[0, 0])})")
    d = np.diff(t)
    if (d <= 0).any():
        j = int(np.argwhere(d <= 0)[0, 0])
        raise _err(sid, fld, f"time stamps must increase strictly: step {j + 1} ({t[j + 1]:.6g} s) follows "
                   f"step {j} ({t[j]:.6g} s)")
    return t


def _read_views(root: Path, entry: dict, sid: str, version: int, load_masks: bool) -> tuple[list, list, list]:
    """(images, names, masks) of one sample entry."""
    if version == 2 and "images" in entry:
        specs = entry["images"]
        if not isinstance(specs, list) or not specs:
            raise _err(sid, "images", "expected a non-empty list of {'path', 'view', 'mask'} objects")
        prefix = "images[{k}]."
    elif "image" in entry:
        specs = [{"path": entry["image"], "view": "image", "mask": entry.get("mask")}]
        prefix = ""
    else:
        raise _err(sid, "images" if version == 2 else "image", "missing")
    images, names, masks = [], [], []
    for k, spec in enumerate(specs):
        pre = prefix.format(k=k)
        if not isinstance(spec, dict) or not spec.get("path"):
            raise _err(sid, f"{pre}path" if pre else "image", "missing")
        img = _load_image(root / spec["path"], sid, f"{pre}path" if pre else "image")
        mask = None
        if load_masks and spec.get("mask"):
            fld = f"{pre}mask" if pre else "mask"
            mask = (_load_image(root / spec["mask"], sid, fld, "L") > 0).astype(np.uint8)
            if mask.shape != img.shape[:2]:
                raise _err(sid, fld, f"size {mask.shape} differs from the image's {img.shape[:2]}")
        images.append(img)
        names.append(str(spec.get("view") or ("image" if k == 0 else f"view{k + 1}")))
        masks.append(mask)
    return images, names, masks


def _read_manifest(root: Path) -> tuple[Path, dict]:
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise WeldDataError(f"{mpath}: not found; a weld data folder needs a manifest.json (see docs/weld.md)")
    try:
        man = json.loads(mpath.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise WeldDataError(f"{mpath}: not valid JSON ({exc})") from exc
    if not isinstance(man, dict):
        raise WeldDataError(f"{mpath}: expected a JSON object at the top level")
    return mpath, man


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
    if "welds_per_sample" in man and (not isinstance(man["welds_per_sample"], int) or isinstance(man["welds_per_sample"], bool)):
        raise bad("welds_per_sample", "an integer", man["welds_per_sample"])
    if "wavelengths_nm" in man and man["wavelengths_nm"] is not None and (
            not isinstance(man["wavelengths_nm"], list) or not all(number(w) for w in man["wavelengths_nm"])):
        raise bad("wavelengths_nm", "a list of finite numbers", man["wavelengths_nm"])
    if man.get("sample_rate_hz") is not None and (not number(man["sample_rate_hz"]) or man["sample_rate_hz"] <= 0):
        raise bad("sample_rate_hz", "a finite number > 0", man["sample_rate_hz"])
    if "channels" in man and not isinstance(man["channels"], list):
        raise bad("channels", "a list of channel objects", man["channels"])
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
            for fld in ("spectra", "signals", "time_s"):
                if fld in weld and not isinstance(weld[fld], str):
                    raise bad(f"{where}.{fld}", "a file name", weld[fld])
            if "sample_rate_hz" in weld and (not number(weld["sample_rate_hz"]) or weld["sample_rate_hz"] <= 0):
                raise bad(f"{where}.sample_rate_hz", "a finite number > 0", weld["sample_rate_hz"])
            if "wavelengths_nm" in weld and (not isinstance(weld["wavelengths_nm"], list)
                                             or not all(number(w) for w in weld["wavelengths_nm"])):
                raise bad(f"{where}.wavelengths_nm", "a list of finite numbers", weld["wavelengths_nm"])


def read_weld_dataset(root: str | Path, length: int = 560, policy: Literal["resample", "crop"] = "resample",
                      min_length: int | None = None, classes: Sequence[str] | None = None, load_masks: bool = True,
                      require_labels: bool = True) -> WeldDataset:
    """Read and validate a weld data folder (format version 1 or 2).

    Args:
        root: folder with ``manifest.json``.
        length: ``T``, time steps every series is brought to (paper 000: 560).
        policy: ``resample`` (linear interpolation, by time where time stamps exist) or ``crop``
            (centred window; irregular series are first put on a uniform grid of their own length).
        min_length: series with fewer raw time steps are rejected; ``None``: the manifest's
            ``min_length`` (v2) or 64.
        classes: expected class vocabulary (e.g. a trained model's); the manifest's must equal it.
        load_masks: read the masks named in the manifest.
        require_labels: every sample must have a label (``False`` for prediction folders:
            a missing label becomes ``""`` with index ``-1``).

    Returns:
        :class:`WeldDataset` with spectra ``[W, C, length]`` per sample.

    Raises:
        WeldDataError: missing/invalid manifest or an unknown ``format``; invalid ``channels``; per
            sample: missing image or series file, unknown label, weld count != ``welds_per_sample``,
            channel count != number of channels/wavelengths, NaN/inf values, time stamps that are not
            strictly increasing or do not match the series, a series shorter than ``min_length`` (or
            than ``length`` under ``crop``), a mask whose size differs from its image, metadata that is
            not an object of scalars. The message names sample id and field.
    """
    root = Path(root)
    mpath, man = _read_manifest(root)
    fmt = man.get("format", FORMAT_V1)
    if fmt not in (FORMAT_V1, FORMAT_V2):
        raise WeldDataError(f"{mpath}: field 'format' is {fmt!r}, expected {FORMAT_V1!r} or {FORMAT_V2!r}")
    version = 1 if fmt == FORMAT_V1 else 2
    required = ("classes", "welds_per_sample", "wavelengths_nm", "sample_rate_hz", "samples") if version == 1 \
        else ("classes", "channels", "samples")
    for key in required:
        if key not in man:
            raise WeldDataError(f"{mpath}: missing top-level field '{key}'")
    _check_manifest_types(man, mpath)
    vocab = [str(c) for c in man["classes"]]
    if classes is not None and list(classes) != vocab:
        raise WeldDataError(f"{mpath}: field 'classes' {vocab} differs from the expected {list(classes)}")
    n_welds = int(man.get("welds_per_sample", 1))
    if version == 1:
        wavelengths = [float(w) for w in man["wavelengths_nm"]]
        default_rate: float | None = float(man["sample_rate_hz"])
        if n_welds < 1 or not wavelengths or default_rate <= 0:
            raise WeldDataError(f"{mpath}: welds_per_sample >= 1, a non-empty wavelengths_nm and sample_rate_hz > 0 are required")
        channels = v1_channels(wavelengths)
        declared = "wavelengths are"
        series_key = "spectra"
        min_len = DEFAULT_MIN_LENGTH if min_length is None else int(min_length)
        group_field = None
    else:
        channels = normalise_channels(man["channels"], f"{mpath}: ")
        wl = [c["wavelength_nm"] for c in channels]
        wavelengths = [float(w) for w in wl] if all(w is not None for w in wl) else None
        default_rate = man.get("sample_rate_hz")
        if default_rate is not None:
            default_rate = float(default_rate)
            if not default_rate > 0:
                raise WeldDataError(f"{mpath}: field 'sample_rate_hz' must be > 0, got {default_rate}")
        if n_welds < 1:
            raise WeldDataError(f"{mpath}: field 'welds_per_sample' must be >= 1, got {n_welds}")
        res = man.get("resampling")
        if res is not None and (not isinstance(res, dict) or res.get("method") != "linear"):
            raise WeldDataError(f"{mpath}: field 'resampling': only {{'method': 'linear'}} (numpy.interp) is supported, got {res!r}")
        declared = "channels are"
        series_key = "signals"
        min_len = int(man.get("min_length", DEFAULT_MIN_LENGTH)) if min_length is None else int(min_length)
        group_field = man.get("group_field")
    if not isinstance(man["samples"], list):
        raise WeldDataError(f"{mpath}: field 'samples' must be a list")
    samples: list[WeldSample] = []
    seen: set[str] = set()
    for i, entry in enumerate(man["samples"]):
        if not isinstance(entry, dict):
            raise WeldDataError(f"{mpath}: samples[{i}] is not an object")
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
        images, view_names, view_masks = _read_views(root, entry, sid, version, load_masks)
        meta = entry.get("metadata", {}) if version == 2 else {}
        if not isinstance(meta, dict) or any(isinstance(v, (dict, list)) for v in meta.values()):
            raise _err(sid, "metadata", f"expected an object of scalar values (e.g. {{'material': 'AlMg3'}}), got {meta!r:.80}")
        group = entry.get("group") if version == 2 else None
        if group is not None and (isinstance(group, (dict, list, bool)) or str(group) == ""):
            raise _err(sid, "group", f"expected a non-empty string or number, got {group!r}")
        welds = entry.get("welds", [])
        if not isinstance(welds, list) or len(welds) != n_welds:
            raise _err(sid, "welds", f"has {len(welds) if isinstance(welds, list) else 0} weld(s), the manifest "
                       f"declares welds_per_sample={n_welds}")
        series, raw_lengths, rates, durations = [], [], [], []
        for k, weld in enumerate(welds):
            key = series_key if version == 1 or series_key in weld or "spectra" not in weld else "spectra"
            fld = f"welds[{k}].{key}"
            if key not in weld:
                raise _err(sid, fld, "missing")
            arr = _load_npy(root / weld[key], sid, fld)
            if version == 1:
                wl_w = [float(w) for w in weld.get("wavelengths_nm", wavelengths)]
                if wl_w != wavelengths:
                    raise _err(sid, f"welds[{k}].wavelengths_nm", "differs from the dataset's wavelengths_nm")
            arr = _check_series(arr, sid, fld, len(channels), declared)
            t_raw = arr.shape[1]
            if t_raw < min_len or (policy == "crop" and t_raw < length):
                need = length if policy == "crop" else min_len
                raise _err(sid, fld, f"series has {t_raw} time steps, at least {need} are needed")
            if version == 2 and weld.get("time_s"):
                tfld = f"welds[{k}].time_s"
                times = _check_times(_load_npy(root / weld["time_s"], sid, tfld), sid, tfld, t_raw)
                duration = float(times[-1] - times[0])
                rate = (t_raw - 1) / duration
                series.append(resample_by_time(arr, times, length, policy))
            else:
                rate = weld.get("sample_rate_hz", default_rate)
                if rate is None:
                    raise _err(sid, f"welds[{k}].time_s", "missing: give per-weld time stamps 'time_s' or a 'sample_rate_hz'")
                rate = float(rate)
                if rate <= 0:
                    raise _err(sid, f"welds[{k}].sample_rate_hz", f"must be > 0, got {rate}")
                duration = (t_raw - 1) / rate
                series.append(resample_series(arr, length, policy))
            raw_lengths.append(int(t_raw))
            rates.append(rate)
            durations.append(duration)
        samples.append(WeldSample(sid, label, label_index, images[0], view_masks[0], np.stack(series).astype(np.float32),
                                  raw_lengths, rates, images, view_names, view_masks, durations, dict(meta),
                                  None if group is None else str(group)))
    if not samples:
        raise WeldDataError(f"{mpath}: field 'samples' is empty")
    return WeldDataset(root, vocab, n_welds, wavelengths, default_rate, samples, bool(man.get("synthetic", False)),
                       {k: v for k, v in man.items() if k not in ("samples",)}, channels, version,
                       {**RESAMPLING, "length": int(length), "policy": policy},
                       None if group_field is None else str(group_field))


def _save_png(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)


def _write_v1(root: Path, samples: Sequence[dict], classes: Sequence[str], wavelengths_nm: Sequence[float],
              sample_rate_hz: float, welds_per_sample: int, synthetic: bool, extra: dict | None) -> Path:
    entries = []
    for s in samples:
        sid = s["id"]
        series = s.get("spectra", s.get("signals"))
        if len(series) != welds_per_sample:
            raise ValueError(f"sample '{sid}': {len(series)} spectra for welds_per_sample={welds_per_sample}")
        if s.get("images") is not None or s.get("times_s") is not None:
            raise ValueError(f"sample '{sid}': several images and time stamps need format version 2")
        entry: dict = {"id": sid, "label": s["label"], "image": f"images/{sid}.png"}
        _save_png(root / entry["image"], s["image"])
        if s.get("mask") is not None:
            entry["mask"] = f"masks/{sid}.png"
            _save_png(root / entry["mask"], (np.asarray(s["mask"]) > 0).astype(np.uint8) * 255)
        welds = []
        for k, arr in enumerate(series):
            rel = f"spectra/{sid}_w{k + 1}.npy"
            _save_npy(root / rel, np.asarray(arr, dtype=np.float32))
            w = {"spectra": rel}
            if s.get("sample_rates_hz"):
                w["sample_rate_hz"] = float(s["sample_rates_hz"][k])
            welds.append(w)
        entry["welds"] = welds
        entries.append(entry)
    manifest = {"format": FORMAT_V1, "synthetic": synthetic, "classes": list(classes),
                "welds_per_sample": welds_per_sample, "wavelengths_nm": [float(w) for w in wavelengths_nm],
                "sample_rate_hz": float(sample_rate_hz), **(extra or {}), "samples": entries}
    return write_json(root / "manifest.json", manifest)


def write_weld_dataset(root: str | Path, samples: Sequence[dict], classes: Sequence[str],
                       wavelengths_nm: Sequence[float] | None = None, sample_rate_hz: float | None = None,
                       welds_per_sample: int = 2, synthetic: bool = False, extra: dict | None = None, *,
                       channels: Sequence[dict] | None = None, group_field: str | None = None,
                       min_length: int | None = None, version: int = 2) -> Path:
    """Write samples in the format above (files first, the manifest last, each atomically).

    Args:
        root: output folder (created).
        samples: dicts with ``id``, ``label``, the images as either ``image`` (uint8 ``[H, W]`` or
            ``[H, W, 3]``) + optional ``mask`` (uint8 ``[H, W]``, >0 = seam), or ``images`` (list of
            such arrays) + optional ``masks`` (list, ``None`` entries allowed) + optional
            ``view_names``; ``spectra`` (or ``signals``): list of ``W`` float arrays ``[C, T_raw]``;
            optional ``times_s`` (list of ``W`` float arrays ``[T_raw]``, seconds, increasing),
            ``starts`` (list of ``W`` ISO date-time strings), ``sample_rates_hz`` (list of ``W``),
            ``metadata`` (dict of scalars), ``group`` (str).
        classes: the label vocabulary.
        wavelengths_nm: ``[C]`` wavelengths; without ``channels`` they define the channels
            (``"<w> nm"``, unit ``counts``, VIS/NIR groups).
        sample_rate_hz: default rate of welds without ``times_s`` / ``sample_rates_hz`` (Hz).
        welds_per_sample: ``W``.
        synthetic: marks the set as simulated (reports built on it say so).
        extra: more top-level manifest fields (e.g. the simulator's or the importer's parameters).
        channels: v2 channel dicts (see the module docstring); take precedence over ``wavelengths_nm``.
        group_field: what the samples' ``group`` means (e.g. ``"batch"``).
        min_length: shortest raw series the reader accepts for this folder (default 64).
        version: 2 (default) or 1 (the old layout: wavelengths, one image, fixed rates).

    Returns:
        Path of ``manifest.json``.

    Raises:
        ValueError: a sample's series count differs from ``welds_per_sample``, a series' channel
            count or a time-stamp array's length does not match, neither channels nor wavelengths
            are given, v1 with v2-only content.
        WeldDataError: invalid ``channels``.
    """
    root = Path(root)
    if version == 1:
        if wavelengths_nm is None or sample_rate_hz is None:
            raise ValueError("format version 1 needs wavelengths_nm and sample_rate_hz")
        return _write_v1(root, samples, classes, wavelengths_nm, sample_rate_hz, welds_per_sample, synthetic, extra)
    if version != 2:
        raise ValueError(f"version must be 1 or 2, got {version}")
    if channels is None:
        if wavelengths_nm is None:
            raise ValueError("give channels (v2 channel dicts) or wavelengths_nm")
        channels = [{k: v for k, v in c.items()} for c in v1_channels(wavelengths_nm)]
    chans = normalise_channels(list(channels))
    entries = []
    for s in samples:
        sid = s["id"]
        series = s.get("signals", s.get("spectra"))
        if series is None or len(series) != welds_per_sample:
            raise ValueError(f"sample '{sid}': {0 if series is None else len(series)} series for welds_per_sample={welds_per_sample}")
        entry: dict = {"id": sid, "label": s["label"]}
        images = s.get("images") if s.get("images") is not None else [s["image"]]
        masks = s.get("masks") if s.get("masks") is not None else [s.get("mask")] + [None] * (len(images) - 1)
        names = s.get("view_names") or [None] * len(images)
        if len(masks) != len(images) or len(names) != len(images):
            raise ValueError(f"sample '{sid}': {len(images)} images but {len(masks)} masks and {len(names)} view names")
        views = []
        for k, (img, m, name) in enumerate(zip(images, masks, names)):
            stem = sid if len(images) == 1 else f"{sid}_v{k + 1}"
            view = {"path": f"images/{stem}.png", "view": name or ("image" if k == 0 else f"view{k + 1}")}
            _save_png(root / view["path"], np.asarray(img))
            if m is not None:
                view["mask"] = f"masks/{stem}.png"
                _save_png(root / view["mask"], (np.asarray(m) > 0).astype(np.uint8) * 255)
            views.append(view)
        entry["images"] = views
        if s.get("metadata"):
            entry["metadata"] = dict(s["metadata"])
        if s.get("group") is not None:
            entry["group"] = str(s["group"])
        welds = []
        for k, arr in enumerate(series):
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] != len(chans):
                raise ValueError(f"sample '{sid}', weld {k + 1}: series of shape {arr.shape}, expected [C={len(chans)}, T]")
            rel = f"signals/{sid}_w{k + 1}.npy"
            _save_npy(root / rel, arr)
            w: dict = {"signals": rel}
            if s.get("times_s") is not None:
                t = np.asarray(s["times_s"][k], dtype=np.float64)
                if t.shape != (arr.shape[1],):
                    raise ValueError(f"sample '{sid}', weld {k + 1}: {t.shape} time stamps for {arr.shape[1]} time steps")
                w["time_s"] = f"signals/{sid}_w{k + 1}_time.npy"
                _save_npy(root / w["time_s"], t)
            elif s.get("sample_rates_hz"):
                w["sample_rate_hz"] = float(s["sample_rates_hz"][k])
            if s.get("starts"):
                w["start"] = str(s["starts"][k])
            welds.append(w)
        entry["welds"] = welds
        entries.append(entry)
    manifest: dict = {"format": FORMAT_V2, "synthetic": synthetic, "classes": list(classes),
                      "welds_per_sample": welds_per_sample,
                      "channels": [{k: v for k, v in c.items() if v is not None} for c in chans]}
    if sample_rate_hz is not None:
        manifest["sample_rate_hz"] = float(sample_rate_hz)
    manifest["resampling"] = {"method": RESAMPLING["method"], "function": RESAMPLING["function"], "grid": RESAMPLING["grid"]}
    if min_length is not None:
        manifest["min_length"] = int(min_length)
    if group_field is not None:
        manifest["group_field"] = str(group_field)
    manifest.update(extra or {})
    manifest["samples"] = entries
    return write_json(root / "manifest.json", manifest)


def v1_channel_records(wavelengths_nm: Sequence[float]) -> list[dict]:
    """The channel records of a run that stored only wavelengths: ``{"name": "317 nm", "unit": "counts", "wavelength_nm"}``."""
    return [{"name": f"{float(w):g} nm", "unit": "counts", "wavelength_nm": float(w)} for w in wavelengths_nm]


def match_channels(ds: WeldDataset, run_channels: list[dict]) -> list[int]:
    """Positions in ``ds``'s channels of a trained run's channels ``run_channels`` (order may differ).

    Channels are matched by wavelength when every channel on both sides has one (a v1 folder's
    ``"317 nm"`` is the simulator's ``"VIS 317"``), else by name.

    Raises:
        WeldDataError: channels missing or extra, or a unit that differs, naming the manifest and
            its field (``wavelengths_nm`` for v1 folders, ``channels`` for v2).
    """
    mpath = ds.root / "manifest.json"
    run = run_channels
    by_wavelength = all(c.get("wavelength_nm") is not None for c in run) and ds.wavelengths_nm is not None
    if by_wavelength:
        names = [f"{float(c['wavelength_nm']):g} nm" for c in run]
        have = [f"{float(w):g} nm" for w in ds.wavelengths_nm]
    else:
        names = [c["name"] for c in run]
        have = ds.channel_names
    fld = "wavelengths_nm" if ds.format_version == 1 else "channels"
    missing = [n for n in names if n not in have]
    extra = [n for n in have if n not in names]
    if missing or extra:
        raise WeldDataError(f"{mpath}: field '{fld}' differs from the trained run's {len(names)} channels: "
                            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                            f"not in the run {extra[:6]}{'...' if len(extra) > 6 else ''}")
    pos = [have.index(n) for n in names]
    for c, p in zip(run, pos):
        unit = ds.channels[p].get("unit", "")
        if "unit" in c and c["unit"] != unit:
            raise WeldDataError(f"{mpath}: field '{fld}': channel '{c['name']}' is in {unit!r}, the run was trained on {c['unit']!r}")
    return pos


def read_for_run(data: str | Path, run_channels: list[dict], welds: int, length: int,
                 policy: Literal["resample", "crop"] = "resample", classes: Sequence[str] | None = None
                 ) -> tuple[WeldDataset, np.ndarray]:
    """Read a weld folder as a trained run reads it: ``(dataset, raw signals float32 [N, W, C_run, T])``, the
    signals' channels in the run's order (:func:`match_channels`).

    Args:
        data: the weld folder. run_channels: the run's channel records. welds: the run's welds per sample.
        length, policy: the run's ``data.seq_len`` and ``data.length_policy``.
        classes: the run's class names when labels are required (``evaluate``), else ``None``.

    Raises:
        WeldDataError: not in the format, or classes, channels or welds that differ from the run's (named).
    """
    ds = read_weld_dataset(data, length, policy, require_labels=classes is not None, load_masks=classes is not None,
                           classes=list(classes) if classes is not None else None)
    if ds.welds_per_sample != welds:
        raise WeldDataError(f"{data}/manifest.json: field 'welds_per_sample' is {ds.welds_per_sample}, the run was "
                            f"trained with {welds}")
    pos = match_channels(ds, run_channels)
    spectra = np.stack([s.spectra for s in ds.samples]).astype(np.float32)[:, :, pos]
    return ds, spectra
