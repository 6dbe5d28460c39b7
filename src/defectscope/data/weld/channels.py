"""Signal preprocessing of paper 000, section 4.1.1: min-max normalisation, Pearson correlation, channel selection.

The paper selects 2 VIS + 2 NIR spectrometer channels. Process signals of other kinds have no
wavelength; there a channel's *group* (``VIS``, ``NIR``, ``electrical``, ``acoustic``, ...) takes the
place of the spectrometer: :func:`select_channels_by_group` balances the selection over the groups,
and :func:`channel_group` gives the group of a channel dict (VIS/NIR from the wavelength when the
channel names none, so spectrometer data select exactly as :func:`select_channels` with ``per_band``).
"""

from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np

#: channels below this wavelength (nm) belong to the VIS spectrometer, the others to the NIR one
VIS_NIR_SPLIT_NM = 1000.0
#: group of a channel with neither an explicit group nor a wavelength
OTHER_GROUP = "other"


def channel_group(channel: dict) -> str:
    """Group of one channel dict: its ``group`` if given, else ``VIS`` (< 1000 nm) / ``NIR`` from its
    ``wavelength_nm``, else ``"other"``."""
    if channel.get("group"):
        return str(channel["group"])
    wl = channel.get("wavelength_nm")
    if wl is None:
        return OTHER_GROUP
    return "VIS" if float(wl) < VIS_NIR_SPLIT_NM else "NIR"


def groups_from_wavelengths(wavelengths_nm: Sequence[float]) -> list[str]:
    """``[C]`` ``"VIS"`` / ``"NIR"`` per wavelength (split at :data:`VIS_NIR_SPLIT_NM`)."""
    return [channel_group({"wavelength_nm": w}) for w in wavelengths_nm]


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


def _greedy_select(corr: np.ndarray, k: int, band: np.ndarray, quota: dict[int, int]) -> list[int]:
    """Greedy least-redundant selection under per-band quotas (the loop of :func:`select_channels`)."""
    c = corr.shape[0]
    off = corr.copy()
    np.fill_diagonal(off, 0.0)
    mean_r = off.sum(1) / max(c - 1, 1)
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


def _check_corr(corr: np.ndarray, k: int) -> np.ndarray:
    corr = np.abs(np.asarray(corr, dtype=np.float64))
    c = corr.shape[0]
    if corr.ndim != 2 or corr.shape != (c, c):
        raise ValueError(f"corr: expected a square matrix, got {corr.shape}")
    if not 1 <= k <= c:
        raise ValueError(f"k must be in [1, {c}], got {k}")
    return corr


def select_channels(corr: np.ndarray, k: int = 4, wavelengths_nm: list[float] | np.ndarray | None = None,
                    per_band: bool = True) -> list[int]:
    """Greedy selection of the ``k`` least redundant channels from a correlation matrix.

    Redundancy of a candidate = its largest ``|r|`` to the already selected channels plus its mean
    ``|r|`` to all other channels; the first channel is the one with the smallest mean ``|r|``, each
    next one the remaining channel of smallest redundancy (ties: smaller mean ``|r|``, lower index). With ``per_band`` and wavelengths on both sides of
    1000 nm, ``k // 2`` channels come from the VIS and ``k - k // 2`` from the NIR spectrometer, as the
    paper's choice of two VIS and two NIR channels (317, 393, 1017, 1590 nm).

    For channels without wavelengths use :func:`select_channels_by_group`.

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
    corr = _check_corr(corr, k)
    c = corr.shape[0]
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
    return _greedy_select(corr, k, band, quota)


def group_quotas(sizes: Sequence[int], k: int) -> list[int]:
    """Split ``k`` selected channels over groups of the given ``sizes`` as evenly as the sizes allow.

    Every group gets ``k // G``, the remainder goes to the last groups (two groups: ``k // 2`` and
    ``k - k // 2``, as paper 000's VIS/NIR split); a group smaller than its share keeps all its
    channels and the rest is shared among the others again (water filling).

    Raises:
        ValueError: ``k`` larger than the total size or a group without channels.
    """
    sizes = [int(n) for n in sizes]
    if any(n < 1 for n in sizes):
        raise ValueError(f"every group needs at least one channel, got sizes {sizes}")
    if not 0 <= k <= sum(sizes):
        raise ValueError(f"k must be in [0, {sum(sizes)}], got {k}")
    quota = [0] * len(sizes)
    open_ = list(range(len(sizes)))
    left = k
    while left and open_:
        share, rem = divmod(left, len(open_))
        full = [g for i, g in enumerate(open_) if sizes[g] - quota[g] <= share + (1 if i >= len(open_) - rem else 0)]
        if not full:
            for i, g in enumerate(open_):
                quota[g] += share + (1 if i >= len(open_) - rem else 0)
            left = 0
            break
        for g in full:  # saturate the small groups, share the rest again
            left -= sizes[g] - quota[g]
            quota[g] = sizes[g]
        open_ = [g for g in open_ if g not in full]
    return quota


def select_channels_by_group(corr: np.ndarray, k: int = 4, groups: Sequence[Hashable] | None = None,
                             order: Sequence[Hashable] | None = None) -> list[int]:
    """Least-redundant channel selection balanced over channel groups (paper 000's VIS/NIR split, generalised).

    The same greedy criterion as :func:`select_channels`; the ``k`` channels are shared over the
    groups by :func:`group_quotas`. With a single group, without ``groups``, or when ``k`` is smaller
    than the number of groups the selection is global. For spectrometer data with the groups of
    :func:`groups_from_wavelengths` the result equals ``select_channels(corr, k, wavelengths, per_band=True)``.

    Args:
        corr: ``[C, C]`` Pearson matrix (:func:`pearson_matrix`).
        k: number of channels to keep, ``1 <= k <= C``.
        groups: ``[C]`` group label of every channel (e.g. :attr:`WeldDataset.channel_groups`:
            ``"VIS"``, ``"NIR"``, ``"electrical"``, ``"acoustic"``).
        order: group order for the remainder (later groups get the extra channels); default:
            ``VIS`` before ``NIR``, otherwise the order of first appearance in ``groups``.

    Returns:
        Selected channel indices, sorted ascending.

    Raises:
        ValueError: ``k`` out of range, a non-square matrix, ``groups`` of the wrong length or an
            ``order`` that misses a group.
    """
    corr = _check_corr(corr, k)
    c = corr.shape[0]
    if groups is None:
        return _greedy_select(corr, k, np.zeros(c, dtype=int), {0: k})
    groups = list(groups)
    if len(groups) != c:
        raise ValueError(f"groups: {len(groups)} labels for {c} channels")
    names = list(dict.fromkeys(groups))
    if order is not None:
        missing = [g for g in names if g not in list(order)]
        if missing:
            raise ValueError(f"order: misses the group(s) {missing}")
        names = [g for g in order if g in names]
    elif "VIS" in names and "NIR" in names:
        names.remove("VIS")
        names.insert(names.index("NIR"), "VIS")
    if len(names) < 2 or k < len(names):
        return _greedy_select(corr, k, np.zeros(c, dtype=int), {0: k})
    band = np.array([names.index(g) for g in groups], dtype=int)
    quota = group_quotas([int((band == b).sum()) for b in range(len(names))], k)
    return _greedy_select(corr, k, band, dict(enumerate(quota)))


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
