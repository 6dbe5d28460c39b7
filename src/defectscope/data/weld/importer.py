"""Import a user's own weld recordings (CSV sensor exports, audio, photos) into the weld format v2.

A recording set is one folder per weld run, e.g.::

    recordings/20250304_B1_R01_ok/sensors.csv      # date/time columns + named channels, a few Hz
    recordings/20250304_B1_R01_ok/coupon_top.png   # photos of the finished coupon (any number)
    recordings/20250304_B1_R01_ok/arc.flac         # optional audio track

A small YAML *spec* (:class:`ImportSpec`, documented with a worked example in docs/weld.md) says where
the runs are, which CSV columns are time and which are channels (with units), how times are written,
which rows are the process window, which files are photos and audio, and where the label comes from.
:func:`import_recordings` reads every run, checks it, and writes a ``defectscope-weld/2`` folder
(:mod:`defectscope.data.weld.format`): one sample per run, one weld per sample, the channels at their
original (irregular) time stamps, which the reader resamples by time (linear, ``numpy.interp``).

Messy exports that are handled: header names with leading/trailing spaces; more header names than
fields in the rows (columns are taken by position); decimal commas; ``;``/``,``/tab delimiters
(sniffed from the header); a byte-order mark; blank lines; a first idle period (process window by
threshold or skipped seconds); cumulative counters (turned into a difference or a rate); repeated time
stamps (rows averaged). Everything else raises :class:`RecordingError` naming file, line and column,
or :class:`SpecError` naming the spec key.

Audio (decoded with ``soundfile``; FLAC, WAV, OGG...) becomes channels on the CSV's time grid: the
RMS envelope and log band powers of Hann-windowed frames (numpy FFT), each averaged over the frames
whose centres fall in a CSV row's interval (between the midpoints to its neighbours).
"""

from __future__ import annotations

import csv
import glob
import io
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defectscope.data.weld.format import WeldDataError, read_weld_dataset, write_weld_dataset

__all__ = ["AudioSpec", "ChannelSpec", "CsvSpec", "GroupSpec", "ImagesSpec", "ImportResult", "ImportSpec", "LabelSpec",
           "RecordingError", "RunRecord", "SpecError", "TimeSpec", "WindowSpec", "audio_features", "import_recordings",
           "load_spec", "read_run", "read_sensor_csv"]


class SpecError(WeldDataError):
    """The import spec is invalid; the message names the spec file and key."""


class RecordingError(WeldDataError):
    """A recording is unusable; the message names the file and, where it applies, line and column."""


# --------------------------------------------------------------------------------------------- spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CsvSpec(_Strict):
    """Which file of a run is the sensor CSV and how it is written.

    Attributes:
        pattern: glob inside the run folder; exactly one file must match (e.g. ``"*_sensors.csv"``).
        delimiter: ``";"``, ``","``, ``"\\t"`` or ``"auto"`` (the one most frequent in the header line).
        decimal: ``"."`` or ``","`` (decimal comma; then the delimiter must not be ``","``).
        encoding: text encoding (``utf-8-sig`` also strips a byte-order mark).
        skip_lines: lines before the header line (e.g. a device banner).
    """

    pattern: str
    delimiter: Literal[";", ",", "\t", "auto"] = "auto"
    decimal: Literal[".", ","] = "."
    encoding: str = "utf-8-sig"
    skip_lines: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _decimal_vs_delimiter(self) -> "CsvSpec":
        if self.decimal == "," and self.delimiter == ",":
            raise ValueError("decimal ',' needs another delimiter (';' or tab)")
        return self


class TimeSpec(_Strict):
    """The time column(s) and how they are parsed.

    Exactly one of: ``column`` + ``format`` (one date-time column, ``datetime.strptime`` format,
    e.g. ``"%Y-%m-%d %H:%M:%S.%f"``); ``date_column`` + ``time_column`` + ``format`` (the format of
    ``"<date> <time>"`` joined by one space, e.g. ``"%d.%m.%Y %H:%M:%S,%f"``); ``column`` + ``unit``
    (numeric seconds or milliseconds since any origin).
    """

    column: Optional[str] = None
    date_column: Optional[str] = None
    time_column: Optional[str] = None
    format: Optional[str] = None
    unit: Optional[Literal["s", "ms"]] = None

    @model_validator(mode="after")
    def _one_way(self) -> "TimeSpec":
        split = self.date_column is not None or self.time_column is not None
        if split and (self.date_column is None or self.time_column is None):
            raise ValueError("give both 'date_column' and 'time_column'")
        if split == (self.column is not None):
            raise ValueError("give either 'column' or 'date_column' + 'time_column'")
        if (self.format is None) == (self.unit is None):
            raise ValueError("give either 'format' (a strptime date-time format) or 'unit' (s or ms, numeric time)")
        if split and self.unit is not None:
            raise ValueError("'date_column' + 'time_column' need 'format', not 'unit'")
        return self


class ChannelSpec(_Strict):
    """One CSV column that becomes a channel.

    Attributes:
        column: header name (compared after stripping spaces).
        name: channel name in the data set (default: the column name, stripped).
        unit: the stored channel's unit (for a counter as ``rate``: per second, e.g. ``"m/s"``).
        group: channel group (e.g. ``electrical``, ``gas``, ``optical``) for the balanced channel
            selection; default ``other``.
        wavelength_nm: optional, for spectrometer or photodiode lines.
        cumulative: the column is a running counter (e.g. wire length, gas volume): ``difference``
            stores the increment per row, ``rate`` the increment per second; a decrease is an error.
    """

    column: str
    name: Optional[str] = None
    unit: str
    group: Optional[str] = None
    wavelength_nm: Optional[float] = Field(None, gt=0)
    cumulative: Optional[Literal["difference", "rate"]] = None

    @property
    def channel_name(self) -> str:
        return (self.name or self.column).strip()


class WindowSpec(_Strict):
    """Which rows are the process window.

    ``mode: all``: every row, after dropping ``skip_start_s`` seconds at the start (an idle period).
    ``mode: threshold``: from the first to the last row where channel ``channel`` is above ``above``
    (searched after ``skip_start_s``), widened by ``pad_s`` on both sides; rows in between that dip
    below the threshold stay (they are part of the weld).
    """

    mode: Literal["all", "threshold"] = "all"
    channel: Optional[str] = None
    above: Optional[float] = None
    skip_start_s: float = Field(0.0, ge=0)
    pad_s: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _threshold_needs(self) -> "WindowSpec":
        if self.mode == "threshold" and (self.channel is None or self.above is None):
            raise ValueError("mode 'threshold' needs 'channel' (a channel name) and 'above' (its threshold)")
        return self


class ImagesSpec(_Strict):
    """Photos of a run: ``pattern`` (glob in the run folder; view name = file stem), ``order`` (view
    names that come first, in this order; the others follow sorted by name; the first view is the
    sample's main image), ``min_count`` (fewer is an error), ``max_side`` (larger photos are
    downscaled, aspect kept; null = keep)."""

    pattern: str
    order: list[str] = []
    min_count: int = Field(1, ge=1)
    max_side: Optional[int] = Field(1024, ge=16)


class AudioSpec(_Strict):
    """Optional audio track of a run, turned into channels on the CSV's time grid.

    Attributes:
        pattern: glob in the run folder; exactly one file must match (any format soundfile decodes).
        offset_s: time of the first audio sample relative to the CSV's first row (s).
        frame_s: analysis frame length (s); frames overlap by half.
        bands_hz: ``[low, high)`` bands whose log power becomes a channel each (all below Nyquist).
        group: the group of the audio channels.
    """

    pattern: str
    offset_s: float = 0.0
    frame_s: float = Field(0.05, gt=0)
    bands_hz: list[tuple[float, float]] = [(50.0, 500.0), (500.0, 2000.0), (2000.0, 8000.0)]
    group: str = "acoustic"

    @field_validator("bands_hz")
    @classmethod
    def _bands(cls, v: list[tuple[float, float]]) -> list[tuple[float, float]]:
        for lo, hi in v:
            if not 0 <= lo < hi:
                raise ValueError(f"each band needs 0 <= low < high, got [{lo}, {hi}]")
        return v


class LabelSpec(_Strict):
    """Where the label of a run comes from: ``regex`` (a named group ``label``; other named groups
    become metadata) matched against the run id (folder name) or its path relative to the spec's
    folder (``source``), or a labels ``csv`` (relative to the spec's folder) with ``id_column`` and
    ``label_column`` (and ``metadata_columns``). ``classes`` fixes the vocabulary and its order."""

    regex: Optional[str] = None
    source: Literal["run_id", "path"] = "run_id"
    csv: Optional[str] = None
    id_column: str = "run"
    label_column: str = "label"
    metadata_columns: list[str] = []
    classes: Optional[list[str]] = None

    @model_validator(mode="after")
    def _one_source(self) -> "LabelSpec":
        if (self.regex is None) == (self.csv is None):
            raise ValueError("give either 'regex' or 'csv'")
        return self


class GroupSpec(_Strict):
    """Optional group id of a run (e.g. batch or part) for grouped cross-validation: ``regex`` (named
    group ``group``) on the run id or path, or ``column`` of the labels CSV; ``name`` says what it is."""

    name: str = "group"
    regex: Optional[str] = None
    source: Literal["run_id", "path"] = "run_id"
    column: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self) -> "GroupSpec":
        if (self.regex is None) == (self.column is None):
            raise ValueError("give either 'regex' or 'column' (of the labels CSV)")
        return self


class ImportSpec(_Strict):
    """The whole import spec (YAML). Unknown keys are rejected. See docs/weld.md for an example.

    Attributes:
        runs: glob of run folders, relative to the spec file's folder (or absolute; ``**`` recurses).
        csv, time, channels, window: the sensor CSV (:class:`CsvSpec`, :class:`TimeSpec`,
            :class:`ChannelSpec` list, :class:`WindowSpec`).
        min_rows: shortest accepted process window (CSV rows); also stored as the folder's ``min_length``.
        images: the photos (:class:`ImagesSpec`); audio: optional (:class:`AudioSpec`).
        label: :class:`LabelSpec`; group: optional :class:`GroupSpec`.
        metadata: constant per-sample metadata (e.g. ``material: AlMg3``).
        synthetic: mark the imported set as synthetic (test fixtures).
    """

    runs: str
    csv: CsvSpec
    time: TimeSpec
    channels: list[ChannelSpec] = Field(min_length=1)
    window: WindowSpec = WindowSpec()
    min_rows: int = Field(32, ge=2)
    images: ImagesSpec
    audio: Optional[AudioSpec] = None
    label: LabelSpec
    group: Optional[GroupSpec] = None
    metadata: dict[str, str | int | float | bool] = {}
    synthetic: bool = False


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_spec(path: str | Path) -> ImportSpec:
    """Read and validate an import spec (YAML, read with ``yaml.safe_load``: no code runs).

    Raises:
        SpecError: unreadable file, invalid YAML, unknown or missing keys, wrong values, bad
            regular expressions, a window channel that is not a channel, duplicate channel names;
            the message names the file and the key (e.g. ``key 'channels.2.unit'``).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc})") from exc
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of keys (runs, csv, time, channels, ...) at the top level")
    try:
        spec = ImportSpec.model_validate(raw)
    except ValidationError as exc:
        msgs = []
        for e in exc.errors()[:6]:
            msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            msgs.append(f"key '{_loc(e['loc'])}': {msg}")
        raise SpecError(f"{path}: " + "; ".join(msgs)) from None
    names = [c.channel_name for c in spec.channels]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"{path}: key 'channels': duplicate channel name(s) {dup}")
    if spec.window.mode == "threshold" and spec.window.channel not in names:
        raise SpecError(f"{path}: key 'window.channel': {spec.window.channel!r} is not one of the channels {names}")
    for key, rx, need in (("label.regex", spec.label.regex, "label"),
                          ("group.regex", spec.group.regex if spec.group else None, "group")):
        if rx is None:
            continue
        try:
            comp = re.compile(rx)
        except re.error as exc:
            raise SpecError(f"{path}: key '{key}': invalid regular expression ({exc})") from None
        if need not in comp.groupindex:
            raise SpecError(f"{path}: key '{key}': needs a named group (?P<{need}>...)")
    if spec.group and spec.group.column and spec.label.csv is None:
        raise SpecError(f"{path}: key 'group.column': needs a labels CSV ('label.csv')")
    return spec


# ---------------------------------------------------------------------------------------------- CSV


@dataclass
class SensorTable:
    """A parsed sensor CSV.

    Attributes:
        time_s: float64 ``[N]`` seconds since the first row, strictly increasing (repeated time stamps merged).
        values: float64 ``[C, N]`` channel values in the spec's channel order (counters already differenced).
        lines: ``[N]`` file line number (1-based) of every row (the first of merged rows).
        start: date-time of the first row, or ``None`` for numeric time columns.
    """

    time_s: np.ndarray
    values: np.ndarray
    lines: np.ndarray
    start: datetime | None


def _number(text: str, decimal: str) -> float:
    t = text.strip().replace("\u00a0", "").replace(" ", "")
    if decimal == ",":
        t = t.replace(",", ".")
    return float(t)


def read_sensor_csv(path: str | Path, spec: ImportSpec) -> SensorTable:
    """Parse one run's sensor CSV according to the spec.

    Args:
        path: the CSV file.
        spec: :class:`ImportSpec` (its ``csv``, ``time`` and ``channels``).

    Returns:
        :class:`SensorTable` (all rows; the process window is cut by :func:`read_run`).

    Raises:
        RecordingError: unreadable file; a column of the spec missing from the header (names the
            header line and the columns found); a row too short for a needed column, an empty or
            non-numeric channel value, an unparsable time, time going backwards, a decreasing
            cumulative counter (names file, line and column); fewer than two rows.
    """
    path = Path(path)
    cs, ts = spec.csv, spec.time
    try:
        text = path.read_text(encoding=cs.encoding)
    except (OSError, UnicodeDecodeError, LookupError) as exc:
        raise RecordingError(f"{path}: cannot read the CSV as {cs.encoding} ({exc}); spec key 'csv.encoding'") from exc
    lines = text.splitlines()
    header_no = cs.skip_lines
    while header_no < len(lines) and not lines[header_no].strip():
        header_no += 1
    if header_no >= len(lines):
        raise RecordingError(f"{path}: no header line found (after skipping {cs.skip_lines} line(s); spec key 'csv.skip_lines')")
    delim = cs.delimiter
    if delim == "auto":
        counts = {d: lines[header_no].count(d) for d in (";", "\t", ",")}
        delim = max(counts, key=counts.get)
        if counts[delim] == 0:
            raise RecordingError(f"{path}, line {header_no + 1}: no ';', ',' or tab in the header line; set 'csv.delimiter'")
    if delim == "," and cs.decimal == ",":
        raise RecordingError(f"{path}, line {header_no + 1}: the header is comma-separated but spec key 'csv.decimal' is ','; "
                             "set 'csv.delimiter'")
    reader = csv.reader(io.StringIO("\n".join(lines[header_no:])), delimiter=delim)
    header = [h.strip() for h in next(reader)]
    col = {}
    for i, h in enumerate(header):
        col.setdefault(h, i)

    def index(name: str, key: str) -> int:
        if name.strip() not in col:
            raise RecordingError(f"{path}, line {header_no + 1}: no column '{name.strip()}' in the header (spec key '{key}'); "
                                 f"columns: {[h for h in header if h]}")
        return col[name.strip()]

    if ts.column is not None:
        tcols = [(ts.column.strip(), index(ts.column, "time.column"))]
    else:
        tcols = [(ts.date_column.strip(), index(ts.date_column, "time.date_column")),
                 (ts.time_column.strip(), index(ts.time_column, "time.time_column"))]
    ccols = [(c.column.strip(), index(c.column, f"channels.{j}.column")) for j, c in enumerate(spec.channels)]
    times: list[float] = []
    values: list[list[float]] = []
    line_nos: list[int] = []
    start: datetime | None = None
    prev_t, prev_line = None, 0
    for row in reader:
        line = header_no + reader.line_num
        if not any(f.strip() for f in row):
            continue
        for name, i in tcols + ccols:
            if i >= len(row):
                raise RecordingError(f"{path}, line {line}, column '{name}': missing (the row has {len(row)} fields, "
                                     f"the column is field {i + 1} of the header)")
        if ts.format is not None:
            raw_t = " ".join(row[i].strip() for _, i in tcols)
            try:
                dt = datetime.strptime(raw_t, ts.format)
            except ValueError:
                raise RecordingError(f"{path}, line {line}, column '{' + '.join(n for n, _ in tcols)}': {raw_t!r} does not match "
                                     f"the format {ts.format!r} (spec key 'time.format')") from None
            if start is None:
                start = dt
            t = (dt - start).total_seconds()
        else:
            try:
                t = _number(row[tcols[0][1]], cs.decimal) * (1e-3 if ts.unit == "ms" else 1.0)
            except ValueError:
                raise RecordingError(f"{path}, line {line}, column '{tcols[0][0]}': {row[tcols[0][1]]!r} is not a number "
                                     f"(time in {ts.unit}; spec key 'time.unit')") from None
            if not np.isfinite(t):
                raise RecordingError(f"{path}, line {line}, column '{tcols[0][0]}': time {row[tcols[0][1]]!r} is not finite")
        if prev_t is not None and t < prev_t:
            raise RecordingError(f"{path}, line {line}, column '{' + '.join(n for n, _ in tcols)}': time goes backwards "
                                 f"({t - prev_t:+.6g} s after line {prev_line}); rows must be in time order")
        vals = []
        for name, i in ccols:
            field_ = row[i]
            try:
                v = _number(field_, cs.decimal)
            except ValueError:
                what = "an empty value" if not field_.strip() else f"{field_.strip()!r} is not a number"
                hint = " (decimal comma? set 'csv.decimal: \",\"')" if cs.decimal == "." and "," in field_ else ""
                raise RecordingError(f"{path}, line {line}, column '{name}': {what}{hint}") from None
            if not np.isfinite(v):
                raise RecordingError(f"{path}, line {line}, column '{name}': {field_.strip()!r} is not a finite number")
            vals.append(v)
        times.append(t)
        values.append(vals)
        line_nos.append(line)
        prev_t, prev_line = t, line
    if len(times) < 2:
        raise RecordingError(f"{path}: {len(times)} data row(s); a run needs at least 2")
    t = np.asarray(times, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64).T
    ln = np.asarray(line_nos, dtype=np.int64)
    uniq, first, inverse = np.unique(t, return_index=True, return_inverse=True)
    if len(uniq) < len(t):  # repeated time stamps: average their rows
        cnt = np.bincount(inverse)
        x = np.stack([np.bincount(inverse, weights=row) / cnt for row in x])
        t, ln = uniq, ln[first]
    for j, c in enumerate(spec.channels):
        if c.cumulative is None:
            continue
        d = np.diff(x[j])
        if (d < 0).any():
            k = int(np.argwhere(d < 0)[0, 0])
            raise RecordingError(f"{path}, line {ln[k + 1]}, column '{c.column.strip()}': the cumulative counter decreases "
                                 f"({x[j, k]:g} -> {x[j, k + 1]:g}); spec key 'channels.{j}.cumulative' expects a running total")
        if c.cumulative == "rate":
            d = d / np.diff(t)
        x[j] = np.concatenate([d[:1], d])
    return SensorTable(t, x, ln, start)


# -------------------------------------------------------------------------------------------- audio


def audio_features(path: str | Path, row_time_s: np.ndarray, offset_s: float = 0.0, frame_s: float = 0.05,
                   bands_hz: list[tuple[float, float]] | None = None) -> tuple[np.ndarray, list[str]]:
    """Audio channels on a (possibly irregular) time grid: RMS envelope and log band powers.

    The track (decoded with ``soundfile``, channels averaged to mono, values in full scale) is cut into
    Hann-windowed frames of ``frame_s`` seconds, hop ``frame_s / 2``. Per frame: ``rms = sqrt(mean(x^2))``
    and, per band ``[lo, hi)``, the band power ``P = 2 sum_k |X_k|^2 / (N sum_n w_n^2)`` over the FFT
    bins in the band (Parseval: the bands of a frame add up to its mean square). Per grid time
    ``t_i``, the frames whose centres lie between the midpoints to the neighbouring grid times are
    averaged (power, then ``sqrt`` for the RMS and ``10 log10(P + 1e-12)`` dBFS for the bands); a
    grid interval that holds no frame centre takes the linear interpolation of the frame values.

    Args:
        path: audio file.
        row_time_s: ``[N]`` increasing grid times (s) on the CSV's clock.
        offset_s: CSV time of the first audio sample (s).
        frame_s: frame length (s).
        bands_hz: bands (Hz), default ``[(50, 500), (500, 2000), (2000, 8000)]``.

    Returns:
        ``([1 + B, N] float64, names)`` with names ``audio_rms``, ``audio_<lo>_<hi>hz``.

    Raises:
        RecordingError: the file cannot be decoded, is empty, a band reaches above the Nyquist
            frequency, or the track does not cover the grid's time span (names the file).
    """
    import soundfile as sf

    path = Path(path)
    bands = list(bands_hz or [(50.0, 500.0), (500.0, 2000.0), (2000.0, 8000.0)])
    try:
        data, sr = sf.read(str(path), dtype="float64", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError, RuntimeError, TypeError... for bad files
        raise RecordingError(f"{path}: cannot decode the audio ({exc}); spec key 'audio.pattern'") from exc
    x = data.mean(1)
    n = int(round(frame_s * sr))
    if n < 8 or len(x) < n:
        raise RecordingError(f"{path}: {len(x)} audio samples at {sr} Hz are too few for frames of {frame_s} s (spec key 'audio.frame_s')")
    for lo, hi in bands:
        if hi > sr / 2:
            raise RecordingError(f"{path}: band [{lo:g}, {hi:g}) Hz reaches above the Nyquist frequency {sr / 2:g} Hz of this "
                                 f"{sr} Hz track (spec key 'audio.bands_hz')")
    hop = max(n // 2, 1)
    frames = np.lib.stride_tricks.sliding_window_view(x, n)[::hop]
    centres = offset_s + (np.arange(len(frames)) * hop + n / 2) / sr
    t = np.asarray(row_time_s, dtype=np.float64)
    end = offset_s + len(x) / sr
    tol = frame_s
    if t[0] < offset_s - tol or t[-1] > end + tol:
        raise RecordingError(f"{path}: the audio covers {offset_s:.3f}-{end:.3f} s of the run but the process window spans "
                             f"{t[0]:.3f}-{t[-1]:.3f} s (CSV clock; spec key 'audio.offset_s')")
    win = np.hanning(n)
    spec = np.abs(np.fft.rfft(frames * win, axis=1)) ** 2 * 2.0 / (n * (win**2).sum())
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    per_frame = [np.mean(frames**2, axis=1)]
    for lo, hi in bands:
        per_frame.append(spec[:, (freqs >= lo) & (freqs < hi)].sum(1))
    per_frame = np.stack(per_frame)  # [1 + B, F] powers
    edges = np.concatenate([[-np.inf], (t[1:] + t[:-1]) / 2, [np.inf]])
    idx = np.searchsorted(edges, centres, side="right") - 1
    cnt = np.bincount(idx, minlength=len(t))[: len(t)]
    out = np.empty((len(per_frame), len(t)))
    for j, p in enumerate(per_frame):
        mean = np.bincount(idx, weights=p, minlength=len(t))[: len(t)] / np.maximum(cnt, 1)
        out[j] = np.where(cnt > 0, mean, np.interp(t, centres, p))
    out[0] = np.sqrt(out[0])
    out[1:] = 10.0 * np.log10(out[1:] + 1e-12)
    names = ["audio_rms"] + [f"audio_{lo:g}_{hi:g}hz" for lo, hi in bands]
    return out, names


# --------------------------------------------------------------------------------------------- runs


@dataclass
class RunRecord:
    """One imported run.

    Attributes:
        run_id: the run folder's name; ``sample_id`` its file-name-safe form.
        folder: the run folder.
        label: class name; group: group id or ``None``; metadata: per-sample metadata.
        time_s: float64 ``[T]`` seconds since the window's first row; values: float64 ``[C, T]``.
        start: ISO date-time of the window's first row (``None`` for numeric time columns).
        lines: ``(first, last)`` CSV line of the window.
        images: uint8 ``[H, W, 3]`` arrays; view_names: their file stems.
    """

    run_id: str
    sample_id: str
    folder: Path
    label: str
    group: str | None
    metadata: dict
    time_s: np.ndarray
    values: np.ndarray
    start: str | None
    lines: tuple[int, int]
    images: list[np.ndarray] = field(default_factory=list)
    view_names: list[str] = field(default_factory=list)


def _one_file(folder: Path, pattern: str, key: str, what: str) -> Path:
    found = sorted(p for p in folder.glob(pattern) if p.is_file())
    if len(found) != 1:
        raise RecordingError(f"{folder}: {len(found)} files match {pattern!r} (spec key '{key}'); exactly one {what} is expected"
                             + (f": {[p.name for p in found[:5]]}" if found else ""))
    return found[0]


def _load_photo(path: Path, max_side: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except Exception as exc:  # PIL raises many types for corrupt files
        raise RecordingError(f"{path}: not a readable image ({exc}); spec key 'images.pattern'") from exc
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(rgb, dtype=np.uint8)


def _window(table: SensorTable, spec: ImportSpec, path: Path) -> np.ndarray:
    """Boolean ``[N]`` mask of the process-window rows."""
    w = spec.window
    t = table.time_s
    keep = t >= t[0] + w.skip_start_s
    if w.mode == "threshold":
        j = [c.channel_name for c in spec.channels].index(w.channel)
        above = keep & (table.values[j] > w.above)
        if not above.any():
            raise RecordingError(f"{path}: channel '{w.channel}' never exceeds {w.above:g} (spec keys 'window.channel', "
                                 f"'window.above'); its range is {table.values[j].min():g} to {table.values[j].max():g}")
        rows = np.flatnonzero(above)
        keep = keep & (t >= t[rows[0]] - w.pad_s) & (t <= t[rows[-1]] + w.pad_s)
    return keep


def _labels_table(spec: ImportSpec, base: Path) -> dict[str, dict]:
    lab = spec.label
    path = (base / lab.csv) if lab.csv else None
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise SpecError(f"key 'label.csv': cannot read {path} ({exc})") from exc
    first = text.splitlines()[0] if text.strip() else ""
    delim = max((";", "\t", ","), key=first.count)
    reader = csv.DictReader(io.StringIO(text), delimiter=delim)
    reader.fieldnames = [f.strip() for f in (reader.fieldnames or [])]
    need = [lab.id_column, lab.label_column, *lab.metadata_columns] + ([spec.group.column] if spec.group and spec.group.column else [])
    for c in need:
        if c not in reader.fieldnames:
            raise RecordingError(f"{path}, line 1: no column '{c}' (spec keys 'label.id_column' / 'label.label_column' / "
                                 f"'label.metadata_columns' / 'group.column'); columns: {reader.fieldnames}")
    table: dict[str, dict] = {}
    for row in reader:
        rid = (row.get(lab.id_column) or "").strip()
        if not rid:
            continue
        if rid in table:
            raise RecordingError(f"{path}, line {reader.line_num}, column '{lab.id_column}': run {rid!r} is listed twice")
        table[rid] = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
    return table


def _label_of(run_id: str, rel: str, spec: ImportSpec, table: dict[str, dict], folder: Path) -> tuple[str, str | None, dict]:
    lab, meta = spec.label, {}
    if lab.regex is not None:
        subject = run_id if lab.source == "run_id" else rel
        m = re.search(lab.regex, subject)
        if not m or not m.group("label"):
            raise RecordingError(f"{folder}: run {run_id!r} has no label: spec key 'label.regex' ({lab.regex!r}) does not match "
                                 f"the {'run id' if lab.source == 'run_id' else 'path'} {subject!r}")
        label = m.group("label")
        meta.update({k: v for k, v in m.groupdict().items() if k not in ("label", "group") and v is not None})
    else:
        row = table.get(run_id)
        if row is None or not row.get(lab.label_column):
            raise RecordingError(f"{folder}: run {run_id!r} has no label in {lab.csv} (spec key 'label.csv', "
                                 f"column '{lab.label_column}')")
        label = row[lab.label_column]
        meta.update({c: row.get(c, "") for c in lab.metadata_columns})
    if lab.classes is not None and label not in lab.classes:
        raise RecordingError(f"{folder}: run {run_id!r} has label {label!r}, not one of spec key 'label.classes' {lab.classes}")
    group = None
    g = spec.group
    if g is not None:
        if g.regex is not None:
            subject = run_id if g.source == "run_id" else rel
            m = re.search(g.regex, subject)
            group = m.group("group") if m else None
            if not group:
                raise RecordingError(f"{folder}: run {run_id!r} has no group: spec key 'group.regex' ({g.regex!r}) does not "
                                     f"match {subject!r}")
        else:
            group = table.get(run_id, {}).get(g.column) or None
            if group is None:
                raise RecordingError(f"{folder}: run {run_id!r} has no group in {lab.csv} (spec key 'group.column' = {g.column!r})")
    return label, group, meta


def _safe_id(run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"


def read_run(folder: str | Path, spec: ImportSpec, base: Path, labels_table: dict[str, dict] | None = None) -> RunRecord:
    """Read one run folder: sensor CSV (+ audio channels), process window, photos, label.

    Args:
        folder: the run folder.
        spec: the validated spec.
        base: the spec file's folder (relative paths of the spec start there).
        labels_table: rows of the labels CSV by run id (built by :func:`import_recordings`).

    Returns:
        :class:`RunRecord` with ``values`` ``[C, T]`` (CSV channels in spec order, then the audio channels).

    Raises:
        RecordingError: see :func:`read_sensor_csv` and :func:`audio_features`; no or several CSV /
            audio files, fewer photos than ``images.min_count``, an unreadable photo, no label or
            group, a window shorter than ``min_rows`` (names the file and the spec key).
    """
    folder = Path(folder)
    run_id = folder.name
    try:
        rel = folder.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        rel = folder.as_posix()
    label, group, meta = _label_of(run_id, rel, spec, labels_table or {}, folder)
    csv_path = _one_file(folder, spec.csv.pattern, "csv.pattern", "sensor CSV")
    table = read_sensor_csv(csv_path, spec)
    keep = _window(table, spec, csv_path)
    n = int(keep.sum())
    rows = np.flatnonzero(keep)
    if n < spec.min_rows:
        span = f" (lines {table.lines[rows[0]]}-{table.lines[rows[-1]]})" if n else ""
        raise RecordingError(f"{csv_path}: run {run_id!r} is shorter than the minimum: {n} row(s) in the process window{span}, "
                             f"spec key 'min_rows' asks for at least {spec.min_rows}")
    t_win = table.time_s[keep]
    values = table.values[:, keep]
    if spec.audio is not None:
        a = spec.audio
        audio_path = _one_file(folder, a.pattern, "audio.pattern", "audio file")
        feats, _ = audio_features(audio_path, t_win, a.offset_s, a.frame_s, a.bands_hz)
        values = np.concatenate([values, feats])
    rank = {name: k for k, name in enumerate(spec.images.order)}
    photos = sorted((p for p in folder.glob(spec.images.pattern) if p.is_file()),
                    key=lambda p: (rank.get(p.stem, len(rank)), p.name))
    if len(photos) < spec.images.min_count:
        raise RecordingError(f"{folder}: {len(photos)} photo(s) match {spec.images.pattern!r} (spec key 'images.pattern'), "
                             f"at least {spec.images.min_count} expected (spec key 'images.min_count')")
    images = [_load_photo(p, spec.images.max_side) for p in photos]
    start = None
    if table.start is not None:
        start = (table.start + timedelta(seconds=float(t_win[0]))).isoformat(timespec="milliseconds")
    metadata = {**spec.metadata, **meta, "run": run_id}
    return RunRecord(run_id, _safe_id(run_id), folder, label, group, metadata, t_win - t_win[0], values, start,
                     (int(table.lines[rows[0]]), int(table.lines[rows[-1]])), images, [p.stem for p in photos])


def _channel_dicts(spec: ImportSpec) -> list[dict]:
    out = []
    for c in spec.channels:
        d = {"name": c.channel_name, "unit": c.unit}
        if c.wavelength_nm is not None:
            d["wavelength_nm"] = c.wavelength_nm
        if c.group:
            d["group"] = c.group
        out.append(d)
    if spec.audio is not None:
        out.append({"name": "audio_rms", "unit": "FS", "group": spec.audio.group,
                    "description": f"RMS envelope of {spec.audio.frame_s:g} s Hann frames (full scale)"})
        for lo, hi in spec.audio.bands_hz:
            out.append({"name": f"audio_{lo:g}_{hi:g}hz", "unit": "dBFS", "group": spec.audio.group,
                        "description": f"log power of the {lo:g}-{hi:g} Hz band"})
    return out


@dataclass
class ImportResult:
    """What :func:`import_recordings` wrote.

    Attributes:
        manifest: path of the written ``manifest.json``.
        n_runs: runs imported; class_counts: runs per class (vocabulary order).
        channels: channel names; group_counts: runs per group (empty without a group spec).
        rows: ``(min, median, max)`` rows per process window; durations_s: the same in seconds.
    """

    manifest: Path
    n_runs: int
    class_counts: dict[str, int]
    channels: list[str]
    group_counts: dict[str, int]
    rows: tuple[int, float, int]
    durations_s: tuple[float, float, float]


def import_recordings(spec_path: str | Path, out: str | Path) -> ImportResult:
    """Import every run of a spec into a ``defectscope-weld/2`` folder and read it back once.

    All runs are read and checked before anything is written; files are written atomically, the
    manifest last. The manifest stores the spec (``import.spec``), each run's CSV line span and
    source folder (``import.runs``) and ``min_length = min_rows``.

    Args:
        spec_path: the YAML spec (:class:`ImportSpec`).
        out: output folder; must not exist or be empty.

    Returns:
        :class:`ImportResult`.

    Raises:
        SpecError: invalid spec (names the key), no run folder matches ``runs``.
        RecordingError: any run is unusable (names file, line, column or spec key); two runs map
            to the same sample id; ``out`` is not empty.
    """
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    base = spec_path.parent
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RecordingError(f"{out}: exists and is not an empty folder; choose a new --out")
    pattern = spec.runs
    folders = sorted(Path(p) for p in glob.glob(str(base / pattern), recursive=True) if Path(p).is_dir())
    if not folders:
        raise SpecError(f"{spec_path}: key 'runs': no folder matches {pattern!r} (relative to {base})")
    table = _labels_table(spec, base)
    records: list[RunRecord] = []
    seen: dict[str, Path] = {}
    for f in folders:
        rec = read_run(f, spec, base, table)
        if rec.sample_id in seen:
            raise RecordingError(f"{f}: run id {rec.run_id!r} gives the sample id {rec.sample_id!r} already used by {seen[rec.sample_id]}")
        seen[rec.sample_id] = f
        records.append(rec)
    classes = list(spec.label.classes) if spec.label.classes is not None else sorted({r.label for r in records})
    samples = [{"id": r.sample_id, "label": r.label, "images": r.images, "view_names": r.view_names,
                "signals": [r.values.astype(np.float32)], "times_s": [r.time_s], "starts": [r.start] if r.start else None,
                "metadata": r.metadata, "group": r.group} for r in records]
    extra = {"import": {"importer": __name__, "spec_file": str(spec_path), "spec": spec.model_dump(mode="json"),
                        "runs": {r.sample_id: {"folder": str(r.folder), "csv_lines": list(r.lines)} for r in records}}}
    manifest = write_weld_dataset(out, samples, classes, welds_per_sample=1, synthetic=spec.synthetic, extra=extra,
                                  channels=_channel_dicts(spec), group_field=spec.group.name if spec.group else None,
                                  min_length=spec.min_rows)
    ds = read_weld_dataset(out, length=max(spec.min_rows, 2))  # the written folder must read back
    lens = [r.values.shape[1] for r in records]
    durs = [float(r.time_s[-1]) for r in records]
    groups: dict[str, int] = {}
    for r in records:
        if r.group is not None:
            groups[r.group] = groups.get(r.group, 0) + 1
    return ImportResult(manifest, len(records), {c: int((ds.labels == i).sum()) for i, c in enumerate(classes)},
                        ds.channel_names, groups, (min(lens), float(np.median(lens)), max(lens)),
                        (min(durs), float(np.median(durs)), max(durs)))
