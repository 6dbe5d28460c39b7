"""Physics-grounded simulator of laser-welded coupons: seam image + 32-channel spectra per weld.

No public data set pairs weld images with process spectra (paper 000's 603 samples are private), so
this module writes synthetic samples in the real format (:mod:`defectscope.data.weld.format`, version 2) for the
seven welding conditions of paper 000, Table 2. Every output is marked ``synthetic``.

Every physical assumption, its value and its source is listed in ``docs/weld.md``; in short:

- Optics: Gaussian beam, ``w(z) = w0 sqrt(1 + (z/zR)^2)``, ``w0 = 0.15 mm``, ``zR = 6 mm``; the
  relative power density ``I = P / (w/w0)^2`` falls with defocus ``z`` and with power ``P``.
- Melt pool: emitting temperature rises from the melting point of Al (933 K) to its boiling point
  (2743 K, the keyhole wall) with ``sqrt(I)``; the emitting area grows with the spot area. The
  thermal signal is Planck's law ``B(lambda, T)`` integrated over each channel's pass band.
- Plume: above a keyhole threshold (``I > 0.5``) the Al vapour plume emits the Al I lines
  308.2/309.3 and 394.4/396.2 nm, Mn I 403.1-403.4 nm (Al3003, about 1.2 % Mn) and trace Mg I;
  line strength scales with the vaporisation rate.
- Back-reflection of the 1030 nm disk laser: high in conduction mode (solid/liquid Al reflects
  strongly), low once the keyhole traps the beam; seen mainly by the 1017 nm NIR channel.
- Keyhole oscillation at 1-3 kHz (sampled at 10 kHz); gaps make the keyhole collapse
  intermittently (dips); water gives OH (306-312 nm) and H-alpha (656.3 nm) bursts and hydrogen
  porosity; oil gives CH (431 nm), C2 Swan (516.5 nm), H-alpha and soot/spatter bursts.
- Image (Gocator-like intensity, one grey channel): two horizontal seams with bead ripples, width set
  by power and spot size, heat-affected discoloration on the busbar-edge side (mirrored between the
  two seams, hence the vertical flip of the first crop, paper 000 section 4.2), spatter, porosity,
  background scratches, marks, illumination gradients and brightness changes (Fig. 6).
- Defocus of 4 mm widens the bead by about 0.5 px (inside the sample-to-sample spread) but lowers the
  NIR intensity by about a third: subtle in the image, visible in spectral intensity (Fig. 8).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from defectscope.data.weld.format import write_weld_dataset

#: the seven welding conditions of paper 000, Table 2, in index order
CONDITIONS = ["baseline", "low_power", "low_gap", "defocus", "water_treatment", "oil_treatment", "cold_weld"]

VIS_NM = 317.0 + 38.0 * np.arange(16)  # 317 ... 887 nm
NIR_NM = 1017.0 + 57.0 * np.arange(16)  # 1017 ... 1872 nm
#: 32 channel centre wavelengths (nm): 16 VIS from 317 nm in 38 nm steps, 16 NIR from 1017 nm in 57 nm steps
WAVELENGTHS_NM = np.concatenate([VIS_NM, NIR_NM])
FWHM_NM = np.concatenate([np.full(16, 38.0), np.full(16, 57.0)])  # one channel step


def simulator_channels() -> list[dict]:
    """The 32 channels as format-v2 dicts: ``{"name": "VIS 317", "unit": "counts", "wavelength_nm": 317.0, "group": "VIS"}``."""
    return [{"name": f"{band} {w:.0f}", "unit": "counts", "wavelength_nm": float(w), "group": band}
            for band, wls in (("VIS", VIS_NM), ("NIR", NIR_NM)) for w in wls]


HC_K_UM = 14388.0  # second radiation constant hc/k in um*K
T_MELT_K, T_BOIL_K = 933.0, 2743.0  # aluminium melting and boiling points
LASER_NM = 1030.0  # disk laser wavelength
W0_MM, ZR_MM = 0.15, 6.0  # beam waist radius and Rayleigh length
KEYHOLE_THRESHOLD = 0.5  # relative power density above which a keyhole (and plume) forms
SAMPLE_RATE_HZ = 10_000.0

# emission lines / bands (centre nm, relative strength) per source
PLUME_LINES = [(308.2, 0.6), (309.3, 0.6), (394.4, 0.8), (396.2, 1.0), (403.2, 0.15), (383.8, 0.04), (518.4, 0.04)]
WATER_LINES = [(309.0, 1.0), (656.3, 0.5)]  # OH (A-X) band head region, H-alpha
OIL_LINES = [(431.0, 0.6), (516.5, 0.8), (656.3, 0.3)]  # CH, C2 Swan, H-alpha


def channel_response(center_nm: float, width_nm: float | None = None) -> np.ndarray:
    """Response ``[32]`` of every channel to a narrow line (or a Gaussian band of ``width_nm``) at ``center_nm``.

    Channels are modelled as Gaussian pass bands with FWHM equal to the channel step.
    """
    sigma = FWHM_NM / 2.3548
    if width_nm:
        sigma = np.sqrt(sigma**2 + (width_nm / 2.3548) ** 2)
    return np.exp(-0.5 * ((WAVELENGTHS_NM - center_nm) / sigma) ** 2)


def planck_channels(temp_k: np.ndarray | float) -> np.ndarray:
    """Planck spectral radiance ``B(lambda, T)`` at the 32 channel centres, relative units.

    ``B = lambda^-5 / (exp(hc / (lambda k T)) - 1)`` with lambda in um (the constant ``2hc^2`` is
    dropped; the detector gain absorbs it). ``temp_k`` ``[...]`` -> ``[..., 32]``.
    """
    lam_um = WAVELENGTHS_NM / 1000.0
    t = np.asarray(temp_k, dtype=np.float64)[..., None]
    return lam_um**-5 / np.expm1(HC_K_UM / (lam_um * t))


_PLANCK_REF = planck_channels(T_BOIL_K).max()


def relative_power_density(power_rel: float, defocus_mm: float) -> float:
    """``I = P / (w(z)/w0)^2`` with ``w(z) = w0 sqrt(1 + (z/zR)^2)`` (Gaussian beam), baseline = 1."""
    return power_rel / (1.0 + (defocus_mm / ZR_MM) ** 2)


def pool_temperature(power_density: float) -> float:
    """Emitting melt-pool temperature (K): 933 K at zero power density, 2743 K (boiling) at the baseline."""
    return T_MELT_K + (T_BOIL_K - T_MELT_K) * float(np.sqrt(np.clip(power_density, 0.0, 1.3)))


def condition_parameters(condition: str, rng: np.random.Generator) -> dict:
    """Process parameters of one sample: relative power, defocus (mm), gap (mm), contamination.

    Raises:
        ValueError: unknown condition.
    """
    p = {"power_rel": 1.0, "defocus_mm": 0.0, "gap_mm": 0.0, "water": 0.0, "oil": 0.0, "cause": ""}
    if condition == "baseline":
        pass
    elif condition == "low_power":
        p["power_rel"] = rng.uniform(0.68, 0.8)
    elif condition == "low_gap":
        p["gap_mm"] = rng.uniform(0.1, 0.45)
    elif condition == "defocus":
        p["defocus_mm"] = float(rng.choice([-6.0, -4.0, 4.0, 6.0]))
    elif condition == "water_treatment":
        p["water"] = rng.uniform(0.6, 1.0)
    elif condition == "oil_treatment":
        p["oil"] = rng.uniform(0.6, 1.0)
    elif condition == "cold_weld":
        cause = str(rng.choice(["power", "gap", "defocus"]))
        p["cause"] = cause
        if cause == "power":
            p["power_rel"] = rng.uniform(0.4, 0.5)
        elif cause == "gap":
            p["gap_mm"] = rng.uniform(0.6, 0.9)
            p["power_rel"] = rng.uniform(0.85, 1.0)
        else:
            p["defocus_mm"] = float(rng.choice([-1, 1]) * rng.uniform(9.0, 11.0))
    else:
        raise ValueError(f"unknown condition {condition!r}; known: {CONDITIONS}")
    p["power_rel"] *= rng.normal(1.0, 0.03)  # laser power stability and coupling spread
    return p


def _smooth_noise(rng: np.random.Generator, n: int, tau: float, scale: float) -> np.ndarray:
    """AR(1) noise of ``n`` steps with correlation time ``tau`` steps and stationary std ``scale``."""
    from scipy.signal import lfilter

    a = np.exp(-1.0 / max(tau, 1e-6))
    e = rng.normal(0.0, scale * np.sqrt(1 - a * a), n)
    e[0] = rng.normal(0.0, scale)  # start in the stationary distribution
    return lfilter([1.0], [1.0, -a], e)


def _events(rng: np.random.Generator, n: int, rate_per_s: float, dur_ms: tuple[float, float], depth: tuple[float, float]) -> np.ndarray:
    """A train of smooth pulses ``[n]`` (Poisson arrivals at ``rate_per_s``, raised-cosine shape)."""
    out = np.zeros(n)
    count = rng.poisson(rate_per_s * n / SAMPLE_RATE_HZ)
    t = np.arange(n)
    for _ in range(count):
        c = rng.uniform(0, n)
        half = rng.uniform(*dur_ms) * 1e-3 * SAMPLE_RATE_HZ / 2
        amp = rng.uniform(*depth)
        d = np.abs(t - c) / half
        out = np.maximum(out, amp * np.where(d < 1, 0.5 * (1 + np.cos(np.pi * np.minimum(d, 1))), 0.0))
    return out


def simulate_spectra(p: dict, rng: np.random.Generator, n_steps: int) -> np.ndarray:
    """Spectral time series ``[32, n_steps]`` (detector counts) of one weld under parameters ``p``.

    See the module docstring and docs/weld.md for the physics.
    """
    n = n_steps
    t = np.arange(n) / SAMPLE_RATE_HZ
    dens = relative_power_density(p["power_rel"], p["defocus_mm"])
    spot_area = 1.0 + (p["defocus_mm"] / ZR_MM) ** 2  # (w/w0)^2
    # gap: part of the energy is lost through the gap; severe gaps cannot bridge (cold weld)
    dens_eff = dens * (1.0 - 0.35 * min(p["gap_mm"], 1.0))
    keyhole = float(np.clip((dens_eff - KEYHOLE_THRESHOLD) / (1.0 - KEYHOLE_THRESHOLD), 0.0, 1.2))
    # start/stop: laser on over [0, t_off], keyhole forms in ~3 ms, cooling tail tau 2 ms after switch-off
    t_off = t[-1] - rng.uniform(0.003, 0.005)
    ramp = np.clip(t / rng.uniform(0.002, 0.004), 0, 1)
    on = (t <= t_off).astype(float)
    cool = np.where(t <= t_off, 1.0, np.exp(-(t - t_off) / 0.002))
    # keyhole oscillation (1-3 kHz) with phase jitter, plus slow process fluctuation
    f_k = rng.uniform(1000.0, 3000.0)
    phase = 2 * np.pi * f_k * t + np.cumsum(rng.normal(0, 0.25, n))
    osc_amp = 0.06 + 0.05 * (p["water"] + p["oil"]) + 0.04 * min(p["gap_mm"] / 0.45, 1.0)
    osc = 1.0 + osc_amp * np.sin(phase) * (keyhole > 0)
    slow = 1.0 + _smooth_noise(rng, n, 50.0, 0.03)
    # gap: intermittent keyhole collapse -> dips (severity grows with the gap)
    dips = _events(rng, n, 250.0 * min(p["gap_mm"], 1.0) / 0.45, (1.0, 4.0), (0.3, 0.7)) if p["gap_mm"] > 0 else np.zeros(n)
    # contamination bursts
    water_b = _events(rng, n, 160.0 * p["water"], (0.3, 1.5), (0.5, 1.5)) if p["water"] else np.zeros(n)
    oil_b = _events(rng, n, 200.0 * p["oil"], (0.3, 1.5), (0.5, 1.5)) if p["oil"] else np.zeros(n)
    spatter = _events(rng, n, 40.0 + 300.0 * p["oil"] + 120.0 * p["water"] + 150.0 * min(p["gap_mm"], 1.0), (0.1, 0.4), (0.2, 1.0))
    # temperature (K) per time step: pool temperature, dips cool it, start-up ramp
    temp0 = pool_temperature(dens_eff) + rng.normal(0, 25.0)
    temp = temp0 * (0.55 + 0.45 * ramp) * (1 - 0.06 * dips) * (1 + 0.01 * (osc - 1)) * slow ** 0.3
    temp = np.where(t <= t_off, temp, T_MELT_K + (temp[np.searchsorted(t, t_off) - 1] - T_MELT_K) * cool)
    emitting_area = spot_area**0.5 * (1 - 0.5 * min(p["gap_mm"], 1.0))
    thermal = 900.0 * emitting_area * planck_channels(temp) / _PLANCK_REF  # [n, 32]
    # plume lines (only with a keyhole): strength ~ vaporisation rate, flickering
    plume_resp = sum(s * channel_response(c) for c, s in PLUME_LINES)
    flicker = np.exp(_smooth_noise(rng, n, 3.0, 0.15))
    plume = 220.0 * keyhole * ramp * on * osc * slow * flicker * (1 - dips)
    # back-reflection of the laser: conduction mode reflects, the keyhole traps the beam
    refl = 0.75 - 0.6 * min(keyhole, 1.0) * ramp
    refl = refl * (1 + 0.8 * dips) * (1 + 0.5 * (osc - 1))
    backrefl = 260.0 * p["power_rel"] * refl * on
    br_resp = channel_response(LASER_NM)
    # contamination emission
    water_resp = sum(s * channel_response(c, 6.0 if c < 320 else 0) for c, s in WATER_LINES)
    oil_resp = sum(s * channel_response(c, 4.0) for c, s in OIL_LINES)
    soot = planck_channels(2000.0) / _PLANCK_REF  # incandescent soot / hot spatter particles
    sig = (thermal + plume[:, None] * plume_resp + backrefl[:, None] * br_resp
           + 120.0 * water_b[:, None] * water_resp + 140.0 * oil_b[:, None] * oil_resp
           + 400.0 * (spatter + 0.5 * oil_b)[:, None] * soot)
    # detector: per-weld gain drift, per-channel gain, dark offset, shot and read noise
    gain = rng.lognormal(0.0, 0.05) * rng.normal(1.0, 0.02, 32)
    sig = sig * gain + 2.0
    sig = sig + rng.normal(0, 1.0, sig.shape) + rng.normal(0, 1.0, sig.shape) * np.sqrt(np.maximum(sig, 0)) * 0.3
    return sig.T.astype(np.float32)


# ----------------------------------------------------------------------------------------------- image


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: tuple[float, float], p1: tuple[float, float]) -> np.ndarray:
    (y0, x0), (y1, x1) = p0, p1
    dy, dx = y1 - y0, x1 - x0
    tt = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
    return np.hypot(yy - (y0 + tt * dy), xx - (x0 + tt * dx))


def _add_blob(img: np.ndarray, cy: float, cx: float, r: float, amp: float) -> None:
    """Add ``amp * exp(-d^2 / 2r^2)`` in place, evaluated on a local window of +-4r."""
    h, w = img.shape
    y0, y1 = max(int(cy - 4 * r), 0), min(int(cy + 4 * r) + 2, h)
    x0, x1 = max(int(cx - 4 * r), 0), min(int(cx + 4 * r) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    img[y0:y1, x0:x1] += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))


def simulate_image(p: dict, condition: str, rng: np.random.Generator, size: int = 256,
                   n_welds: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Coupon image (uint8 ``[size, size]``) with ``n_welds`` horizontal seams and their mask ``[size, size]``.

    Seam ``k`` is centred in the ``k``-th horizontal band; its half-width grows with power and spot size.
    """
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    scale = s / 256.0
    # background: brightness change between coupons, illumination gradient, brushed texture, grain
    base = rng.uniform(0.28, 0.72)
    ang = rng.uniform(0, 2 * np.pi)
    img = base + rng.uniform(0.0, 0.12) * ((xx * np.cos(ang) + yy * np.sin(ang)) / s - 0.5)
    rows = np.convolve(rng.normal(0, 0.03, s + 8), np.ones(9) / 9, mode="valid")[:s]
    img += rows[:, None] * (1 + 0.3 * np.sin(xx / (17 * scale)))
    img += rng.normal(0, 0.012, (s, s))
    for _ in range(rng.integers(0, 7)):  # scratches
        y0, x0 = rng.uniform(0, s, 2)
        length, a = rng.uniform(0.1, 0.8) * s, rng.uniform(0, np.pi)
        d = _segment_distance(yy, xx, (y0, x0), (y0 + length * np.sin(a), x0 + length * np.cos(a)))
        img += rng.choice([-1, 1]) * rng.uniform(0.08, 0.25) * np.exp(-0.5 * (d / (0.6 * scale)) ** 2)
    for _ in range(rng.integers(0, 4)):  # surface marks / stains
        cy, cx = rng.uniform(0, s, 2)
        r = rng.uniform(6, 25) * scale
        img -= rng.uniform(0.03, 0.1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    mask = np.zeros((s, s), dtype=np.uint8)
    dens = relative_power_density(p["power_rel"], p["defocus_mm"])
    spot = np.sqrt(1.0 + (p["defocus_mm"] / ZR_MM) ** 2)  # w / w0
    cold = condition == "cold_weld"
    for k in range(n_welds):
        band = s / n_welds
        yc0 = band * (k + 0.5) + rng.normal(0, 3 * scale)
        xa, xb = rng.uniform(0.07, 0.12) * s, rng.uniform(0.88, 0.93) * s
        yc = yc0 + 1.2 * scale * np.sin(2 * np.pi * xx / (rng.uniform(80, 200) * scale) + rng.uniform(0, 6))
        hw = 9.0 * scale * p["power_rel"] ** 0.8 * spot**0.35 * rng.normal(1.0, 0.05)
        if cold:
            hw = rng.uniform(4.0, 6.0) * scale
        wobble = 1.0 + (0.2 * min(p["gap_mm"] / 0.45, 1.0) + 0.08 * (p["oil"] + p["water"])) * np.sin(
            2 * np.pi * xx / (rng.uniform(15, 40) * scale) + rng.uniform(0, 6))
        hw_x = hw * wobble
        d = (yy - yc) / hw_x  # signed, in half-widths
        along = (xx >= xa) & (xx <= xb)
        present = np.ones_like(xx, dtype=bool)
        if cold:  # lack of fusion: the bead breaks up
            breaks = np.zeros(s, dtype=bool)
            for _ in range(rng.integers(2, 6)):
                c0 = rng.uniform(xa, xb)
                breaks |= np.abs(np.arange(s) - c0) < rng.uniform(4, 14) * scale
            present = ~breaks[None, :].repeat(s, 0)
        seam = (np.abs(d) <= 1.0) & along & present
        mask |= seam.astype(np.uint8)
        # heat-affected discoloration on the busbar-edge side: above seam 1, below seam 2 (mirrored)
        side = -1.0 if k % 2 == 0 else 1.0
        haz = np.clip(side * d - 1.0, 0, None)
        img -= 0.07 * np.exp(-haz / 1.0) * (side * d > 1.0) * along
        # bead: bright crown, dark toes, chevron ripples
        crown = rng.uniform(0.14, 0.24)
        lam = rng.uniform(4.0, 6.0) * scale * (1.3 if cold else 1.0)
        ripple_amp = (0.0 if cold else 0.07) / (1.0 + 0.6 * (spot - 1.0)) * (1.0 + 0.5 * (p["oil"] + p["water"]))
        ripple = ripple_amp * np.cos(2 * np.pi * (xx + 3.0 * hw_x * d**2 * (0.6 if dens > 0.5 else 0.3)) / lam)
        bead = crown * (1 - 0.5 * d**2) + ripple - 0.12 * np.exp(-0.5 * ((np.abs(d) - 1.0) / 0.15) ** 2)
        img = np.where(seam, img + bead, img)
        if p["gap_mm"] > 0 and not cold:  # underfill groove along the centre line
            img -= np.where(seam, 0.18 * min(p["gap_mm"] / 0.45, 1.0) * np.exp(-0.5 * (d / 0.25) ** 2), 0)
        if cold:  # unfused joint line and sharp, flat bead
            img -= np.where(along, 0.12 * np.exp(-0.5 * ((yy - yc) / (1.0 * scale)) ** 2), 0)
        # spatter: bright droplets around the seam
        n_sp = rng.poisson(1.5 + 25 * p["oil"] + 6 * p["water"] + 10 * min(p["gap_mm"], 1.0))
        for _ in range(n_sp):
            cx = rng.uniform(xa, xb)
            cy = yc0 + rng.choice([-1, 1]) * rng.uniform(1.2, 4.0) * hw
            r = rng.uniform(0.6, 1.6) * scale
            _add_blob(img, cy, cx, r, rng.uniform(0.15, 0.35))
        # porosity: dark round pores on the bead (hydrogen from water; some with oil)
        n_pore = rng.poisson(7 * p["water"] + 2 * p["oil"])
        for _ in range(n_pore):
            cx = rng.uniform(xa, xb)
            cy = yc0 + rng.uniform(-0.6, 0.6) * hw
            r = rng.uniform(1.0, 2.6) * scale
            _add_blob(img, cy, cx, r, -0.3)
        if p["oil"]:  # soot halo
            img -= 0.09 * p["oil"] * np.exp(-0.5 * (np.clip(np.abs(d) - 1, 0, None) / 1.5) ** 2) * along * (np.abs(d) > 1)
    img = np.clip(img + rng.normal(0, 0.01, img.shape), 0, 1)
    return (img * 255 + 0.5).astype(np.uint8), mask


def simulate_sample(sample_id: str, condition: str, seed: int, index: int, image_size: int = 256, n_welds: int = 2) -> dict:
    """One synthetic sample (dict for :func:`write_weld_dataset`), a pure function of ``(seed, index)``."""
    rng = np.random.default_rng([seed, index])
    p = condition_parameters(condition, rng)
    image, mask = simulate_image(p, condition, rng, image_size, n_welds)
    spectra = [simulate_spectra(p, rng, int(rng.integers(560, 720))) for _ in range(n_welds)]
    return {"id": sample_id, "label": condition, "image": image, "mask": mask, "spectra": spectra,
            "sample_rates_hz": [SAMPLE_RATE_HZ] * n_welds, "params": p}


def simulate_weld_dataset(out: str | Path, n_samples: int = 603, seed: int = 0, image_size: int = 256,
                          conditions: list[str] | None = None,
                          progress: Callable[[int, int], None] | None = None) -> Path:
    """Simulate ``n_samples`` coupons (classes balanced, order shuffled by ``seed``) and write them.

    Args:
        out: output folder (format ``defectscope-weld/2`` of :mod:`defectscope.data.weld.format`, 32 named
            channels with their wavelengths and VIS/NIR groups, one view with its seam mask per coupon,
            a fixed 10 kHz rate; manifest marked synthetic).
        n_samples: number of coupons (paper 000: 603).
        seed: the same seed gives byte-identical arrays and images.
        image_size: coupon image side in pixels.
        conditions: subset of :data:`CONDITIONS` (default: all seven).
        progress: optional callback ``(done, total)``.

    Returns:
        Path of the written ``manifest.json``.
    """
    conds = list(conditions or CONDITIONS)
    rng = np.random.default_rng(seed)
    labels = [conds[i % len(conds)] for i in range(n_samples)]
    labels = [labels[i] for i in rng.permutation(n_samples)]
    start = time.perf_counter()
    samples = []
    for i, cond in enumerate(labels):
        samples.append(simulate_sample(f"S{i:04d}", cond, seed, i, image_size))
        if progress:
            progress(i + 1, n_samples)
    extra = {"simulator": {"module": __name__, "seed": seed, "image_size": image_size, "laser_nm": LASER_NM,
                           "w0_mm": W0_MM, "zR_mm": ZR_MM, "seconds": round(time.perf_counter() - start, 2),
                           "params": {s["id"]: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s["params"].items()}
                                      for s in samples}}}
    return write_weld_dataset(out, samples, conds, WAVELENGTHS_NM.tolist(), SAMPLE_RATE_HZ, 2, synthetic=True, extra=extra,
                              channels=simulator_channels())
