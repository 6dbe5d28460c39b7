"""A realistic, messy weld recording set written by the tests (no data is downloaded).

:func:`write_messy_recordings` writes ``n_runs`` run folders the way a welding cell exports them and
the import spec (``spec.yaml``) that reads them::

    ROOT/spec.yaml
    ROOT/recordings/20250304_B1_R01_ok/cell7_export.csv    # ';' separated, decimal commas, BOM
    ROOT/recordings/20250304_B1_R01_ok/coupon_top.png      # 2-3 photos of the coupon
    ROOT/recordings/20250304_B1_R01_ok/coupon_angle.png
    ROOT/recordings/20250304_B1_R01_ok/arc.flac            # 8 kHz mono, written with soundfile

The CSV: separate ``Date`` / ``Time`` columns (``04.03.2025;08:00:02,125``), irregular time steps
(0.12-0.32 s, about 4.5 Hz), header names with trailing spaces and two header names more than the rows
have fields, a first idle period (current about 0 A for 1.5-3.5 s) and an idle tail, a cumulative
wire counter (m). Classes ``ok`` / ``porosity`` (in the run id, with the batch ``B1``-``B4``):

- signals: porosity runs have less shielding gas (6.5-9.5 against 13.5-16.5 l/min), a more unstable
  arc voltage (std 1.2 V against 0.3 V) and photodiode spikes; the current is the same (140-160 A);
- images: porosity coupons show 8-14 dark pores on the bead (ok: at most one);
- audio: porosity runs crackle (decaying 2-3 kHz bursts, about 25 per second) over the same arc hum.

Every class is separable in each modality on its own, so a model can learn from any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

CLASSES = ["ok", "porosity"]
HEADER = ["Date", "Time", "Current [A] ", "Voltage [V] ", "Wire total [m] ", "Gas flow [l/min] ", "Photodiode [V] ",
          "Ambient [°C]", "Comment ", "Reserve "]  # 10 names, 8 fields per row
AUDIO_RATE = 8000


@dataclass
class MessyRecordings:
    """What :func:`write_messy_recordings` wrote.

    Attributes:
        root: the folder; ``spec_path``: ``root/spec.yaml``; ``runs_dir``: ``root/recordings``.
        run_ids: run folder names (sorted, the importer's order); labels, groups: per run.
        classes: ``["ok", "porosity"]``; spec: the spec as a dict (edit and :func:`write_spec` for variants).
        csv_name, audio_name: file names inside each run folder.
        weld_rows: per run, the number of CSV rows inside the weld (current above 20 A).
    """

    root: Path
    spec_path: Path
    runs_dir: Path
    run_ids: list[str]
    labels: list[str]
    groups: list[str]
    classes: list[str]
    spec: dict
    csv_name: str = "cell7_export.csv"
    audio_name: str = "arc.flac"
    weld_rows: list[int] = field(default_factory=list)

    def run_dir(self, i: int) -> Path:
        """Folder of run ``i`` (in :attr:`run_ids` order)."""
        return self.runs_dir / self.run_ids[i]


def messy_spec() -> dict:
    """The import spec of the messy layout, as a dict (the YAML that :func:`write_messy_recordings` writes)."""
    return {
        "runs": "recordings/*",
        "csv": {"pattern": "*_export.csv", "decimal": ","},
        "time": {"date_column": "Date", "time_column": "Time", "format": "%d.%m.%Y %H:%M:%S,%f"},
        "channels": [
            {"column": "Current [A]", "name": "current", "unit": "A", "group": "electrical"},
            {"column": "Voltage [V]", "name": "voltage", "unit": "V", "group": "electrical"},
            {"column": "Wire total [m]", "name": "wire_feed", "unit": "m/s", "group": "wire", "cumulative": "rate"},
            {"column": "Gas flow [l/min]", "name": "gas_flow", "unit": "l/min", "group": "gas"},
            {"column": "Photodiode [V]", "name": "photodiode", "unit": "V", "group": "optical"},
        ],
        "window": {"mode": "threshold", "channel": "current", "above": 20.0},
        "min_rows": 30,
        "images": {"pattern": "coupon_*.png", "order": ["coupon_top"], "min_count": 2},
        "audio": {"pattern": "*.flac", "bands_hz": [[50, 400], [400, 1500], [1500, 3500]]},
        "label": {"regex": r"^(?P<date>\d{8})_B\d+_R\d+_(?P<label>[a-z]+)$", "classes": list(CLASSES)},
        "group": {"name": "batch", "regex": r"_(?P<group>B\d+)_"},
        "metadata": {"material": "AlMg3", "joint": "lap"},
        "synthetic": True,
    }


def write_spec(path: Path, spec: dict) -> Path:
    """Write a spec dict as YAML; returns ``path``."""
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _dec(v: float, nd: int = 2) -> str:
    return f"{v:.{nd}f}".replace(".", ",")


def _photo(rng: np.random.Generator, porous: bool, view: str, h: int = 96, w: int = 128) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = rng.uniform(0.42, 0.6) + 0.1 * (xx / w - 0.5) + rng.normal(0, 0.02, (h, w))
    yc = h * (0.5 if view == "top" else 0.58) + rng.normal(0, 2)
    hw = (7.0 if view == "top" else 4.5) * rng.uniform(0.9, 1.1)
    d = (yy - yc) / hw
    bead = np.abs(d) <= 1
    img = np.where(bead, img + 0.22 * (1 - 0.5 * d**2) + 0.05 * np.cos(2 * np.pi * xx / 5.0), img)
    img -= 0.06 * np.exp(-np.clip(np.abs(d) - 1, 0, None)) * (np.abs(d) > 1)  # heat tint beside the bead
    n_pores = rng.integers(8, 15) if porous else rng.integers(0, 2)
    for _ in range(n_pores):
        cy, cx = yc + rng.uniform(-0.6, 0.6) * hw, rng.uniform(0.1, 0.9) * w
        r = rng.uniform(1.4, 2.6) * (1.0 if view == "top" else 0.8)
        img -= 0.45 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    img = np.clip(img, 0, 1)
    rgb = np.stack([img, img * 0.98, img * 0.94], -1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _audio(rng: np.random.Generator, total_s: float, weld: tuple[float, float], porous: bool) -> np.ndarray:
    from scipy.signal import lfilter

    n = int(total_s * AUDIO_RATE)
    t = np.arange(n) / AUDIO_RATE
    on = ((t >= weld[0]) & (t <= weld[1])).astype(float)
    x = rng.normal(0, 0.002, n)  # idle: room noise
    hum = 0.05 * np.sin(2 * np.pi * 100 * t + rng.uniform(0, 6)) + 0.02 * np.sin(2 * np.pi * 300 * t)
    arc = lfilter([1.0], [1.0, -0.9], rng.normal(0, 0.01, n))  # low-passed arc noise
    x += on * (hum + arc)
    if porous:
        imp = (rng.random(n) < 25.0 / AUDIO_RATE) * rng.uniform(0.1, 0.25, n) * on
        k = np.arange(int(0.012 * AUDIO_RATE)) / AUDIO_RATE
        f = rng.uniform(2000, 3000)
        x += np.convolve(imp, np.sin(2 * np.pi * f * k) * np.exp(-k / 0.003))[:n]
    return np.clip(x, -1, 1).astype(np.float32)


def write_messy_recordings(root: str | Path, n_runs: int = 20, seed: int = 0, defect: str = "all",
                           n_groups: int = 4) -> MessyRecordings:
    """Write ``n_runs`` messy run folders (classes alternating, batches ``B1``-``B<n_groups>``) and their spec.

    Args:
        root: folder to write into (created).
        n_runs: number of runs (16-24 fit the issue's small-set case; half ``ok``, half ``porosity``).
        seed: the same seed writes identical files.
        defect: ``"all"``: the defect shows in every modality (module docstring); ``"spread"``: the signals
            proxy of issue 25: photos, audio, gas flow and photodiode carry no class information and
            the only difference is the spread of the arc voltage (std 0.9 V against 0.45 V, same mean),
            which per-channel statistics find and a model that ignores the spread does not.
        n_groups: number of batches (groups) the runs are spread over, two runs (one of each class) after another.

    Returns:
        :class:`MessyRecordings` (paths, run ids, labels, groups, the spec dict).
    """
    import soundfile as sf

    root = Path(root)
    runs_dir = root / "recordings"
    rng = np.random.default_rng(seed)
    ids, labels, groups, weld_rows = [], [], [], []
    for i in range(n_runs):
        label = CLASSES[i % 2]
        porous = label == "porosity"
        shows = porous and defect == "all"  # the defect shows in gas, photodiode, photos and audio
        batch = f"B{1 + (i // 2) % n_groups}"
        day = datetime(2025, 3, 4) + timedelta(days=int(i >= n_runs // 2))
        rid = f"{day:%Y%m%d}_{batch}_R{i + 1:02d}_{label}"
        run = runs_dir / rid
        run.mkdir(parents=True)
        idle, weld_s, tail = rng.uniform(1.5, 3.5), rng.uniform(14, 20), rng.uniform(0.8, 1.5)
        steps = rng.uniform(0.12, 0.32, int((idle + weld_s + tail) / 0.12) + 2)
        t = np.concatenate([[0.0], np.cumsum(steps)])
        t = np.round(t[t <= idle + weld_s + tail], 3)
        on = (t >= idle) & (t <= idle + weld_s)
        weld_rows.append(int(on.sum()))
        n = len(t)
        i_mean = rng.uniform(140, 160)
        current = np.where(on, i_mean + rng.normal(0, 3, n), np.abs(rng.normal(0.2, 0.1, n)))
        u_std = (1.2 if porous else 0.3) if defect == "all" else (0.9 if porous else 0.45)
        voltage = np.where(on, 22 + rng.normal(0, u_std, n), 0.1 + np.abs(rng.normal(0, 0.05, n)))
        gas_mean = rng.uniform(6.5, 9.5) if shows else rng.uniform(13.5, 16.5)
        gas = np.where(t >= idle - 0.5, gas_mean + rng.normal(0, 0.5, n), 0.0)  # pre-flow starts 0.5 s early
        pd = np.where(on, 2.0 + rng.normal(0, 0.1, n), 0.01)
        if shows:
            pd += on * (rng.random(n) < 0.2) * rng.uniform(0.4, 0.8, n)
        wire_speed = rng.uniform(7.5, 8.5) / 60.0  # m/s
        dt = np.diff(t, prepend=t[0])
        wire = 123.0 + np.cumsum(np.where(on, wire_speed * dt, 0.0))
        start = day + timedelta(hours=8, minutes=13 * i)
        lines = [";".join(HEADER)]
        for j in range(n):
            ts = start + timedelta(seconds=float(t[j]))
            lines.append(";".join([f"{ts:%d.%m.%Y}", f"{ts:%H:%M:%S},{ts.microsecond // 1000:03d}", _dec(current[j]),
                                   _dec(voltage[j]), _dec(wire[j], 3), _dec(gas[j]), _dec(pd[j], 3), _dec(21.5 + 0.1 * j / n)]))
        (run / "cell7_export.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
        for view in ["top", "angle"] + (["detail"] if rng.random() < 0.5 else []):
            Image.fromarray(_photo(rng, shows, "top" if view == "detail" else view)).save(run / f"coupon_{view}.png")
        audio = _audio(rng, float(t[-1]) + 0.3, (idle, idle + weld_s), shows)
        sf.write(str(run / "arc.flac"), audio, AUDIO_RATE, format="FLAC", subtype="PCM_16")
        ids.append(rid)
        labels.append(label)
        groups.append(batch)
    order = np.argsort(ids)
    spec = messy_spec()
    spec_path = write_spec(root / "spec.yaml", spec)
    return MessyRecordings(root, spec_path, runs_dir, [ids[i] for i in order], [labels[i] for i in order],
                           [groups[i] for i in order], list(CLASSES), spec, weld_rows=[weld_rows[i] for i in order])
