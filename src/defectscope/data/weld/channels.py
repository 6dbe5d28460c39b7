"""Spectral preprocessing of paper 000, section 4.1.1: min-max normalisation, Pearson correlation, channel selection."""

from __future__ import annotations

import numpy as np

#: channels below this wavelength (nm) belong to the VIS spectrometer, the others to the NIR one
VIS_NIR_SPLIT_NM = 1000.0


def pearson_matrix(spectra: np.ndarray) -> np.ndarray:
    """Pearson correlation between channels (paper 000, eq. 1).

    Args:
        spectra: ``[..., C, T]`` (e.g. samples x welds x channels x time steps); every value of a
            channel over all leading axes and time steps is one observation ``x_i`` of eq. 1.

    Returns:
        ``[C, C]`` matrix ``r_xy`` in [-1, 1]; a constant channel correlates 0 with every other.

    Raises:
        ValueError: fewer than 2 dimensions.
    """
    x = np.asarray(spectra, dtype=np.float64)
    if x.ndim < 2:
        raise ValueError(f"spectra: expected [..., C, T], got shape {x.shape}")
    c = x.shape[-2]
    flat = np.moveaxis(x, -2, 0).reshape(c, -1)
    flat = flat - flat.mean(1, keepdims=True)
    norm = np.sqrt((flat**2).sum(1))
    cov = flat @ flat.T
    with np.errstate(invalid="ignore", divide="ignore"):
        r = cov / np.outer(norm, norm)
    r = np.nan_to_num(r, nan=0.0)
    np.fill_diagonal(r, 1.0)
    return np.clip(r, -1.0, 1.0)


def select_channels(corr: np.ndarray, k: int = 4, wavelengths_nm: list[float] | np.ndarray | None = None,
                    per_band: bool = True) -> list[int]:
    """Greedy selection of the ``k`` least redundant channels from a correlation matrix.

    Redundancy of a candidate = its largest ``|r|`` to the already selected channels plus its mean
    ``|r|`` to all other channels; the first channel is the one with the smallest mean ``|r|``, each
    next one the remaining channel of smallest redundancy (ties: smaller mean ``|r|``, lower index). With ``per_band`` and wavelengths on both sides of
    1000 nm, ``k // 2`` channels come from the VIS and ``k - k // 2`` from the NIR spectrometer, as the
    paper's choice of two VIS and two NIR channels (317, 393, 1017, 1590 nm).

    Args:
        corr: ``[C, C]`` Pearson matrix (:func:`pearson_matrix`).
        k: number of channels to keep (paper 000: 4), ``1 <= k <= C``.
        wavelengths_nm: ``[C]`` channel wavelengths, needed for ``per_band``.
        per_band: balance the selection between VIS and NIR.

    Returns:
        Selected channel indices, sorted ascending.

    Raises:
        ValueError: ``k`` out of range or a non-square matrix.
    """
    corr = np.abs(np.asarray(corr, dtype=np.float64))
    c = corr.shape[0]
    if corr.shape != (c, c):
        raise ValueError(f"corr: expected a square matrix, got {corr.shape}")
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    off = corr.copy()
    np.fill_diagonal(off, 0.0)
    mean_r = off.sum(1) / max(c - 1, 1)
    quota: dict[int, int] = {0: k}
    band = np.zeros(c, dtype=int)
    if per_band and wavelengths_nm is not None:
        wl = np.asarray(wavelengths_nm, dtype=np.float64)
        band = (wl >= VIS_NIR_SPLIT_NM).astype(int)
        n_vis, n_nir = int((band == 0).sum()), int((band == 1).sum())
        if n_vis and n_nir and k >= 2:
            quota = {0: min(k // 2, n_vis), 1: 0}
            quota[1] = min(k - quota[0], n_nir)
            quota[0] = k - quota[1]
        else:
            band[:] = 0
    chosen: list[int] = []
    taken = {b: 0 for b in quota}
    while len(chosen) < k:
        best, best_key = -1, None
        for i in range(c):
            if i in chosen or taken.get(int(band[i]), 0) >= quota.get(int(band[i]), 0):
                continue
            key = ((corr[i, chosen].max() if chosen else 0.0) + mean_r[i], mean_r[i], i)
            if best_key is None or key < best_key:
                best, best_key = i, key
        chosen.append(best)
        taken[int(band[best])] += 1
    return sorted(chosen)


def minmax_stats(spectra: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel minimum and maximum over a training set ``[..., C, T]`` -> two ``[C]`` arrays.

    The statistics are global (over all training samples), not per sample, so that absolute
    intensity differences (e.g. defocus, paper 000 Fig. 8) survive the normalisation.
    """
    x = np.moveaxis(np.asarray(spectra, dtype=np.float64), -2, 0).reshape(spectra.shape[-2], -1)
    return x.min(1).astype(np.float32), x.max(1).astype(np.float32)


def minmax_normalise(spectra: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``(x - min) / (max - min)`` per channel with stored training statistics; ``[..., C, T]`` float32."""
    lo = np.asarray(lo, dtype=np.float32)[:, None]
    hi = np.asarray(hi, dtype=np.float32)[:, None]
    return ((np.asarray(spectra, dtype=np.float32) - lo) / np.maximum(hi - lo, 1e-6)).astype(np.float32)
