"""Multimodal laser-weld data (paper 000, section 3): the on-disk format, its reader/writer, a simulator, an importer.

- :mod:`.format`: ``manifest.json`` + ``.npy`` series + PNG images/masks, versions 1 (spectrometer:
  wavelengths, one image, fixed rate) and 2 (named channels with units and groups, several views,
  metadata, group ids, per-weld time stamps); :func:`read_weld_dataset` validates every sample and
  resamples series to ``T`` (by time, ``numpy.interp``); :func:`write_weld_dataset` writes version 2.
- :mod:`.simulate`: a physics-grounded simulator of the seven Table-2 welding conditions that writes
  the same format (marked synthetic).
- :mod:`.importer`: a user's own recordings (sensor CSV, audio, photos) -> version 2, driven by a
  YAML spec (``defectscope signals import``).
- :mod:`.channels`: Pearson correlation (eq. 1) and least-redundant channel selection, balanced over
  VIS/NIR (paper 000) or over any channel groups.
- :mod:`.prepare`: the model inputs: weld crops (section 4.2) and the fitted channel selection with
  its min-max statistics.
"""

from defectscope.data.weld.format import (
    FORMAT,
    FORMAT_V1,
    FORMAT_V2,
    WeldDataError,
    WeldDataset,
    WeldSample,
    read_weld_dataset,
    resample_by_time,
    resample_series,
    write_weld_dataset,
)

__all__ = ["FORMAT", "FORMAT_V1", "FORMAT_V2", "WeldDataError", "WeldDataset", "WeldSample", "read_weld_dataset",
           "resample_by_time", "resample_series", "write_weld_dataset"]
