"""Model inputs of the weld task (paper 000, section 4): weld crops from a coupon image and the
normalised, selected signal channels.

- :func:`crop_welds` (boxes: :func:`weld_boxes`): one crop per weld from the seam mask (or a fixed band without one), the first
  flipped vertically, optionally blanked outside the seam (section 4.2);
- :class:`SpectralPrep` / :func:`fit_spectral_prep`: Pearson channel selection (eq. 1) and min-max
  statistics fitted on a training part, applied to any signals (section 4.1.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from defectscope.data.weld.channels import (
    minmax_normalise,
    minmax_stats,
    pearson_matrix,
    select_channels,
    select_channels_by_group,
)


def weld_boxes(image_shape: tuple[int, ...], mask: np.ndarray | None, n_welds: int, size: tuple[int, int]
               ) -> list[tuple[int, int, int, int, bool]]:
    """The image box each weld is cropped from (see :func:`crop_welds`): ``(y0, y1, x0, x1, found)`` per weld,
    pixel rows ``y0:y1`` and columns ``x0:x1`` of an image of shape ``image_shape = (H, W_px, ...)``;
    ``found`` is whether the band held seam mask pixels (otherwise the box is the fixed band)."""
    h_img, w_img = int(image_shape[0]), int(image_shape[1])
    ch, cw = size
    boxes = []
    for k in range(n_welds):
        b0, b1 = int(round(k * h_img / n_welds)), int(round((k + 1) * h_img / n_welds))
        band = mask[b0:b1] if mask is not None else None
        found = band is not None and bool(band.any())
        if found:
            rows, cols = np.nonzero(band)
            x0, x1 = max(cols.min() - 4, 0), min(cols.max() + 5, w_img)
            yc = b0 + rows.mean()
        else:
            x0, x1, yc = 0, w_img, (b0 + b1) / 2
        bh = max(8, int(round((x1 - x0) * ch / cw)))
        y0 = int(round(yc - bh / 2))
        y0 = min(max(y0, 0), max(h_img - bh, 0))
        y1 = min(y0 + bh, h_img)
        boxes.append((y0, y1, int(x0), int(x1), found))
    return boxes


def crop_welds(image: np.ndarray, mask: np.ndarray | None, n_welds: int, size: tuple[int, int], segmented: bool) -> np.ndarray:
    """Crop each weld (paper 000 section 4.2): uint8 ``[W, 3, h, w]``, the first crop flipped vertically.

    Weld ``k`` is searched in the ``k``-th of ``n_welds`` horizontal bands of the image; its box spans
    the mask's columns (+-4 px) and is centred on the mask's mean row, with the aspect ratio of
    ``size``. Without mask pixels in a band (or without a mask: no seam U-Net) the box spans the
    band's full width, centred on the band (a fixed band), unmasked. With ``segmented`` the pixels
    outside the (3 px dilated) seam mask are set to 0 before resizing (bilinear) to ``size``.
    The boxes are :func:`weld_boxes`.
    """
    ch, cw = size
    crops = []
    for k, (y0, y1, x0, x1, found) in enumerate(weld_boxes(image.shape, mask, n_welds, size)):
        img = torch.from_numpy(np.ascontiguousarray(image[y0:y1, x0:x1])).permute(2, 0, 1).float()
        if segmented and found:  # no seam found in this band: keep the raw crop rather than a black one
            m = torch.from_numpy(mask[y0:y1, x0:x1]).float()[None, None]
            m = F.max_pool2d(m, 7, 1, 3)[0]
            img = img * m
        crop = F.interpolate(img[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        if k == 0:
            crop = crop.flip(-2)
        crops.append(crop.round().clamp(0, 255).to(torch.uint8).numpy())
    return np.stack(crops)


@dataclass
class SpectralPrep:
    """Channel selection and normalisation fitted on the training part (stored in the checkpoint).

    Attributes:
        corr: ``[C, C]`` Pearson matrix of the training signals (eq. 1; empty when loaded from a run).
        selected: indices of the kept channels (sorted); lo, hi: their ``[C_sel]`` training min / max.
    """

    corr: np.ndarray
    selected: list[int]
    lo: np.ndarray
    hi: np.ndarray

    def apply(self, spectra: np.ndarray) -> np.ndarray:
        """Raw ``[N, W, C_all, T]`` -> normalised selected ``[N, W, C_sel, T]`` (float32)."""
        return minmax_normalise(spectra[:, :, self.selected], self.lo, self.hi)


def fit_spectral_prep(spectra_train: np.ndarray, channels: str = "select", num_channels: int = 4, per_band: bool = True,
                      wavelengths: list[float] | None = None, groups: list[str] | None = None) -> SpectralPrep:
    """Pearson matrix (eq. 1) on the training signals, channel selection, min-max statistics (section 4.1.1).

    Args:
        spectra_train: raw ``[N, W, C, T]`` of the training part.
        channels: ``select`` (keep ``num_channels``, capped at ``C``) or ``all``.
        per_band: balance the selection over VIS/NIR (with ``wavelengths``) or over ``groups``.
        wavelengths: ``[C]`` nm when every channel has one: the paper's VIS/NIR-balanced selection
            (:func:`select_channels`).
        groups: ``[C]`` channel groups, used when ``wavelengths`` is ``None``
            (:func:`select_channels_by_group`; a single group or ``per_band=False``: global).

    Raises:
        ValueError: ``channels`` is neither ``select`` nor ``all``.
    """
    corr = pearson_matrix(spectra_train)
    c = spectra_train.shape[2]
    k = min(num_channels, c)
    if channels == "all":
        selected = list(range(c))
    elif channels != "select":
        raise ValueError(f"channels must be 'select' or 'all', got {channels!r}")
    elif wavelengths is not None:
        selected = select_channels(corr, k, wavelengths, per_band)
    else:
        selected = select_channels_by_group(corr, k, groups if per_band else None)
    selected = [int(i) for i in selected]
    lo, hi = minmax_stats(spectra_train[:, :, selected])
    return SpectralPrep(corr, selected, lo, hi)
