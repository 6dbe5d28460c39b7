"""Multimodal laser-weld data (paper 000, section 3): the on-disk format, its reader/writer, a simulator.

- :mod:`.format`: ``manifest.json`` + ``.npy`` spectra + PNG images/masks; :func:`read_weld_dataset`
  validates every sample and resamples series to ``T``; :func:`write_weld_dataset` writes the format.
- :mod:`.simulate`: a physics-grounded simulator of the seven Table-2 welding conditions that writes
  the same format (marked synthetic).
- :mod:`.channels`: Pearson correlation (eq. 1) and least-redundant channel selection.
"""

from defectscope.data.weld.format import (
    FORMAT,
    WeldDataError,
    WeldDataset,
    WeldSample,
    read_weld_dataset,
    resample_series,
    write_weld_dataset,
)

__all__ = ["FORMAT", "WeldDataError", "WeldDataset", "WeldSample", "read_weld_dataset", "resample_series",
           "write_weld_dataset"]
