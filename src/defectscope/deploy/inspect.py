"""Score image archives of any size with a deployable model on Ray Data (``defectscope inspect``).

    >>> res = inspect_archive("model.onnx", ["archive/2024/", "line3/*.png", "todo.txt"], "preds.parquet",
    ...                       workers=2, threads=1)
    >>> res.rows, res.errors, res.summary["classes"]
    (1800, 0, {'crazing': 300, ...})

Pipeline (Ray Data, streaming): the driver expands the sources into a list of file paths
(:func:`expand_sources`) and removes those already scored (``resume``); the paths are split
into small blocks; :class:`ImageScorer`, a callable class run by ``map_batches`` on an actor
pool (``workers`` actors, ``threads`` CPUs each, so one model copy per worker), reads, decodes,
preprocesses and scores each batch; an image that cannot be read or decoded becomes a row
with its ``error`` instead of failing the job. The driver receives the result blocks as they
are produced, shows progress and writes them as Parquet parts (atomically, one file per flush)
into ``RESULTS.parts/``; at the end the parts (and the rows of an earlier ``RESULTS``) are
merged with pyarrow into ``RESULTS`` (one atomic replace), one row per image, sorted by path,
and the parts folder is removed.

Nothing is lost: every input path ends as exactly one row; after a kill, ``resume=True``
skips the paths already in ``RESULTS`` or in its parts folder, so a killed-and-resumed job
gives the same row set as one uninterrupted run (a kill loses at most the rows received
since the last flush, which are scored again).

Columns: ``path`` (absolute, as listed; not symlink-resolved), the task's answer fields
flattened (classification: ``class``, ``class_index``, ``score``, ``probabilities`` as a JSON
object string; images such as ``overlay_png`` are not stored), ``latency_ms`` (model time of
the image's batch / batch size), ``error`` (null when scored), ``inspected_at`` (UTC),
``model_sha256`` (SHA-256 of the file that ran: the ``.onnx`` file or ``model.ckpt``),
``model_backend`` (``onnxruntime`` / ``pytorch``), ``model`` (``task/model_name``) and
``worker`` (``host:pid`` of the actor). Models with a drift reference (classifiers) add
``drift_coordinates`` (``list<float32>``: the image's coordinates on the drift alarm's channels,
:meth:`~defectscope.deploy.drift.DriftAlarm.project`); at the end the scored rows, in path order,
are tested in consecutive windows (:func:`~defectscope.deploy.drift.window_scan`) and the result
is ``summary["drift"]`` and ``RESULTS.drift.json``. Path order is the stream order: with dated
folders it is time order; a shuffled list tests nothing about time; an archive sorted by class
alarms in path order (each window holds one class) while 200 random windows of it, also reported,
test the archive as a whole.

With ``save_maps=DIR`` (``--save-maps DIR``) each worker also writes the task's picture output of every
scored image as a PNG into ``DIR`` (atomically; see the adapters' ``map_kind``): segmentation the mask
(255 = defect), anomaly the anomaly map (``round(255 * min(map / map_scale, 1))``), detection the
boxes drawn on the image, weld the attention overlay. The file name is :func:`map_file_name` of the
input path (its stem plus a hash of the whole path, so equal names in different folders do not
collide), and the row's ``map_path`` column holds the written file (null for error rows).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import time
import warnings
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from defectscope.errors import DefectscopeError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
"""File suffixes collected from folders (a file named on the command line or in a list is always taken)."""

FIXED_COLUMNS = ("path", "error", "latency_ms", "inspected_at", "model_sha256", "model_backend", "model", "worker")
_SKIPPED_ANSWER_KEYS = frozenset({"latency_ms"})


class InspectError(DefectscopeError, ValueError):
    """A source, model or results file cannot be used by ``inspect``; the message names it."""


# ----------------------------------------------------------------------------------------------
# sources


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _folder_images(folder: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES:
                out.append(os.path.join(dirpath, name))
    return out


def _list_file(lst: Path) -> list[str]:
    """Paths of a ``.txt`` list: one per line; blank lines and ``#`` comments skipped; relative
    paths are relative to the list file's folder; a trailing ``,label`` column is ignored."""
    try:
        text = lst.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InspectError(f"{lst}: not a UTF-8 text file (byte {exc.start}); expected one image path per line") from None
    out = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "," in entry and not (lst.parent / entry).exists():  # split lists of the training contract: path,label
            entry = entry.rsplit(",", 1)[0].strip()
        p = Path(entry)
        out.append(str(p if p.is_absolute() else lst.parent / p))
    return out


def expand_sources(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Expand folders, globs and list files into absolute image paths (first occurrence kept).

    Args:
        sources: each one of: a folder (its image files, recursively, by suffix:
            :data:`IMAGE_SUFFIXES`), a glob pattern (``dir/*.png``, ``**`` recursive), a ``.txt``
            list file (one path per line, relative to the list's folder), or one file.

    Returns:
        Absolute paths (``os.path.abspath``: symlinks are kept as named), in source order;
        folders sorted by name. A listed file that does not exist is kept: it becomes a row
        with its error.

    Raises:
        InspectError: a source that does not exist, a glob that matches nothing, or nothing to score.
    """
    seen: dict[str, None] = {}
    for src in sources:
        text = os.fspath(src)
        p = Path(text)
        if p.is_dir():
            found = _folder_images(p)
            if not found:
                raise InspectError(f"{text}: folder has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif p.is_file() and p.suffix.lower() == ".txt":
            found = _list_file(p)
            if not found:
                raise InspectError(f"{text}: list file names no image paths (one path per line expected)")
        elif p.is_file():
            found = [text]
        elif _is_glob(text):
            found = sorted(f for f in glob.glob(text, recursive=True) if os.path.isfile(f))
            if not found:
                raise InspectError(f"{text}: glob pattern matches no files")
        else:
            raise InspectError(f"{text}: no such file, folder or glob match; give folders, globs or a .txt list of image paths")
        for f in found:
            seen.setdefault(os.path.abspath(f), None)
    if not seen:
        raise InspectError("no images to inspect: give at least one folder, glob or list file")
    return list(seen)


# ----------------------------------------------------------------------------------------------
# rows


def _arrow_type(value):
    import pyarrow as pa

    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, (int, np.integer)):
        return pa.int64()
    if isinstance(value, (float, np.floating)):
        return pa.float64()
    return pa.string()  # text, and dicts/lists stored as JSON text


def answer_columns(answer: dict) -> list[tuple[str, object]]:
    """``(name, pyarrow type)`` of the answer fields stored as columns.

    Scalars keep their type; dicts and lists become JSON text; ``*_png`` images (overlays) and
    fields whose probe value is ``None`` are not stored.
    """
    cols = []
    for k, v in answer.items():
        if k in _SKIPPED_ANSWER_KEYS or k in FIXED_COLUMNS or k.endswith("_png") or v is None:
            continue
        cols.append((k, _arrow_type(v)))
    return cols


def result_schema(answer_cols: Sequence[tuple[str, object]]):
    """The Parquet schema of the results: :data:`FIXED_COLUMNS` around the answer columns."""
    import pyarrow as pa

    fields = [pa.field("path", pa.string(), nullable=False)]
    fields += [pa.field(k, t) for k, t in answer_cols]
    fields += [pa.field("latency_ms", pa.float64()), pa.field("error", pa.string()),
               pa.field("inspected_at", pa.timestamp("ms", tz="UTC")), pa.field("model_sha256", pa.string()),
               pa.field("model_backend", pa.string()), pa.field("model", pa.string()), pa.field("worker", pa.string())]
    return pa.schema(fields)


def map_file_name(path: str) -> str:
    """The ``--save-maps`` file name of an input path: ``<stem>-<first 16 hex of SHA-256 of the path>.png``;
    characters of the stem other than letters, digits, ``.``, ``_``, ``-`` become ``_`` (stem cut at 80)."""
    import hashlib
    import re

    digest = hashlib.sha256(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(path).stem)[:80]
    return f"{stem}-{digest}.png"


def _cell(value):
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=False)
    if isinstance(value, np.generic):
        return value.item()
    return value


def model_identity(predictor) -> dict[str, str]:
    """``{"model_sha256", "model_backend", "model"}`` of a loaded predictor: the SHA-256 of the
    file that runs (the ``.onnx`` file, or the run's ``model.ckpt``)."""
    info = predictor.info
    sha = info.extra.get("onnx_sha256") if getattr(predictor, "run_dir", None) is None else info.sha256
    return {"model_sha256": sha or info.sha256, "model_backend": predictor.backend, "model": f"{info.task}/{info.model_name}"}


DRIFT_COLUMN = "drift_coordinates"


def probe_answer(predictor) -> dict:
    """One answer of ``predictor`` on a grey image of its input size (gives the result columns).

    Raises:
        InspectError: the model needs more than an image per sample (weld fusion spectra).
    """
    info = predictor.info
    if set(info.inputs) != {"image"} or info.extra.get("spectra_shape"):
        raise InspectError(f"{info.source}: model '{info.model_name}' ({info.task}) takes inputs {sorted(info.inputs)}; "
                           "inspect scores image-only models (weld fusion needs a spectra array per image)")
    h, w = info.input_size
    return predictor.answers([np.full((int(h), int(w), 3), 128, np.uint8)])[0]


class ImageScorer:
    """Ray Data callable class: one model copy per actor; a batch of paths in, result rows out.

    Args:
        model: run folder or ``.onnx`` file (readable on every node).
        threads: intra-op threads of the model (the actor reserves as many CPUs).
        answer_cols: :func:`answer_columns` of the model (fixed by the driver, so that every
            block has the same schema, also a block where every image failed).
        maps_dir: folder for the task's picture outputs (``--save-maps``; ``None``: none written);
            ``answer_cols`` then includes ``map_path``.

    ``__call__(batch)`` takes ``{"path": array of str [B]}`` and returns a ``pyarrow.Table`` of
    ``B`` rows (:func:`result_schema`). Each file is read and decoded here, inside the map
    function: a missing, unreadable, non-image or too large file gives a row with ``error`` set
    (``"<ExceptionType>: message"``) and nulls in the answer columns; the rest of the batch is
    scored. If the batched forward pass fails, the batch is scored image by image so that only
    the failing images carry the error.
    """

    def __init__(self, model: str, threads: int, answer_cols: Sequence[tuple[str, object]],
                 maps_dir: str | None = None, runtime: str = "onnxruntime") -> None:
        from defectscope.deploy.predictor import load_predictor

        self.predictor = load_predictor(model, threads=threads, runtime=runtime)
        self.maps_dir = Path(maps_dir) if maps_dir else None
        self.ident = model_identity(self.predictor)
        self.alarm = self.predictor.drift_alarm()
        self.answer_cols = list(answer_cols)
        self.schema = result_schema(self.answer_cols)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def _save_map(self, path: str, outputs: dict[str, np.ndarray], image: np.ndarray) -> str | None:
        """Write the adapter's :meth:`map_image` of one image as ``maps_dir/map_file_name(path)`` (atomic);
        returns the file, ``None`` when the model has no picture for it."""
        from PIL import Image

        from defectscope.utils.io import atomic_path

        arr = self.predictor.adapter.map_image(self.predictor.info, outputs, image)
        if arr is None:
            return None
        target = self.maps_dir / map_file_name(path)
        with atomic_path(target) as tmp:
            Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(tmp, format="PNG")
        return str(target)

    def _answers(self, inputs: list[dict[str, np.ndarray]], decoded: list[np.ndarray],
                 paths: list[str]) -> list[dict | Exception]:
        p = self.predictor
        try:
            batch = {k: np.stack([x[k] for x in inputs]).astype(np.float32, copy=False) for k in p.info.inputs}
            t0 = time.perf_counter()
            out = p.run(batch)
            ms = (time.perf_counter() - t0) * 1000.0 / len(inputs)
            coords = None
            if self.alarm is not None:
                from defectscope.deploy.drift import image_statistics

                coords = self.alarm.project({"features": out["features"], "image_statistics": image_statistics(batch["image"])})
            res: list[dict | Exception] = []
            for j, im in enumerate(decoded):
                one = {k: v[j] for k, v in out.items()}
                a = p.adapter.postprocess(p.info, one, im)
                a["latency_ms"] = round(ms, 4)
                if coords is not None:
                    a[DRIFT_COLUMN] = coords[j]
                if self.maps_dir is not None:
                    try:
                        a["map_path"] = self._save_map(paths[j], one, im)
                    except Exception as exc:  # noqa: BLE001 - a map that cannot be written is this row's error
                        a = exc
                res.append(a)
            return res
        except Exception as exc:  # noqa: BLE001 - retried one by one below; each failing image keeps its error
            if len(inputs) == 1:
                return [exc]
            return [r for i in range(len(inputs))
                    for r in self._answers(inputs[i : i + 1], decoded[i : i + 1], paths[i : i + 1])]

    def __call__(self, batch: dict) -> "pyarrow.Table":  # noqa: F821
        import pyarrow as pa

        from defectscope.deploy.images import as_rgb_uint8

        paths = [str(x) for x in batch["path"]]
        errors: list[str | None] = [None] * len(paths)
        ok_idx, inputs, decoded = [], [], []
        for i, path in enumerate(paths):
            try:
                im = as_rgb_uint8(path)
                inputs.append(self.predictor.adapter.preprocess(self.predictor.info, im, None))
                decoded.append(im)
                ok_idx.append(i)
            except Exception as exc:  # noqa: BLE001 - nothing is lost: the row carries the error
                errors[i] = _error_text(exc)
        answers: list[dict | None] = [None] * len(paths)
        if ok_idx:
            for i, a in zip(ok_idx, self._answers(inputs, decoded, [paths[i] for i in ok_idx])):
                if isinstance(a, Exception):
                    errors[i] = _error_text(a)
                else:
                    answers[i] = a
        now = datetime.now(timezone.utc)
        cols: dict[str, list] = {"path": paths}
        for name, _ in self.answer_cols:
            if name == DRIFT_COLUMN:
                cols[name] = [a[name].tolist() if a is not None else None for a in answers]
                continue
            cols[name] = [_cell(a.get(name)) if a is not None else None for a in answers]
        cols["latency_ms"] = [a.get("latency_ms") if a is not None else None for a in answers]
        cols["error"] = errors
        cols["inspected_at"] = [now] * len(paths)
        for k in ("model_sha256", "model_backend", "model"):
            cols[k] = [self.ident[k]] * len(paths)
        cols["worker"] = [self.worker] * len(paths)
        return pa.Table.from_pydict(cols, schema=self.schema)


def _error_text(exc: BaseException) -> str:
    msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return f"{exc.__class__.__name__}: {msg}"[:2000]


# ----------------------------------------------------------------------------------------------
# results files


def parts_dir(out: str | os.PathLike) -> Path:
    """The folder of streamed result parts of ``out``: ``RESULTS.parts/`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for every kind of bad file
        raise InspectError(f"{path}: not a readable Parquet results file ({exc.__class__.__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); move it away or use --overwrite") from None


def read_existing(out: str | os.PathLike, include_out: bool = True) -> list:
    """Tables already written for ``out``: ``RESULTS`` itself (if present and ``include_out``),
    then each part (by name).

    Leftover temporary files of an interrupted write (``.*.tmp``) are removed; they never hold
    rows that were counted as done.

    Raises:
        InspectError: a file that is not readable Parquet or lacks the ``path`` column.
    """
    out = Path(out)
    tables = []
    files = [out] if include_out and out.is_file() else []
    pdir = parts_dir(out)
    if pdir.is_dir():
        for tmp in pdir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        files += sorted(pdir.glob("*.parquet"))
    for f in files:
        t = _read_parquet(f)
        if "path" not in t.column_names:
            raise InspectError(f"{f}: has no 'path' column; not a results file of 'defectscope inspect'")
        tables.append(t)
    return tables


def merge_results(tables: Sequence, out: str | os.PathLike):
    """Concatenate result tables, keep the first row per ``path``, sort by path, write ``out`` atomically.

    Args:
        tables: ``pyarrow.Table`` s with a ``path`` column (schemas are unified; a column missing
            from one table is null there).
        out: the ``.parquet`` file to write.

    Returns:
        The merged ``pyarrow.Table``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from defectscope.utils.io import atomic_path

    tables = [t for t in tables if t.num_rows]
    if not tables:
        raise InspectError(f"{out}: no rows to write")
    merged = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    paths = merged.column("path").to_numpy(zero_copy_only=False).astype(str)
    _, first = np.unique(paths, return_index=True)  # sorted unique paths, index of the first occurrence
    merged = merged.take(pa.array(first))
    with atomic_path(out) as tmp:
        pq.write_table(merged, tmp)
    return merged


def summarize(table) -> dict:
    """Counts for the console: ``rows``, ``errors``, per-class counts (``classes``) when there is a
    ``class`` column, and ``defect_rate`` (share of scored rows) when there is a boolean
    ``defective`` / ``anomalous`` / ``is_defect`` column."""
    import pyarrow.compute as pc

    n = table.num_rows
    err = table.column("error") if "error" in table.column_names else None
    errors = int(pc.sum(pc.is_valid(err)).as_py() or 0) if err is not None else 0
    out: dict = {"rows": n, "errors": errors, "scored": n - errors}
    if "class" in table.column_names:
        counts = table.column("class").drop_null().value_counts().to_pylist()
        out["classes"] = dict(sorted((c["values"], int(c["counts"])) for c in counts))
    for name in ("defective", "anomalous", "is_defect"):
        if name in table.column_names:
            col = table.column(name).drop_null()
            out["defect_rate"] = float(pc.mean(col.cast("float64")).as_py() or 0.0) if len(col) else None
            out["defect_column"] = name
            break
    return out


def drift_scan(alarm, table, out: str | os.PathLike) -> dict:
    """Test the scored rows of ``table`` (sorted by path) in consecutive windows of ``alarm.window``
    images (:func:`~defectscope.deploy.drift.window_scan`, each window at the false-alarm rate
    ``alarm.alpha``) and write the result to ``RESULTS.drift.json`` (atomically).

    Also tests 200 windows drawn at random from all scored rows
    (:func:`~defectscope.deploy.drift.random_windows`, seed 0): whether the archive as a whole looks
    like the reference, whatever its order (``random``).

    Returns:
        The path-order scan without its per-window list, plus ``first_alarm`` (first and last path of
        the first alarming window), ``random`` (the random-window test) and ``report`` (the JSON file).
    """
    from defectscope.deploy.drift import random_windows, window_scan
    from defectscope.utils.io import write_json

    coords = table.column(DRIFT_COLUMN).to_pylist()
    paths = table.column("path").to_pylist()
    keep = [i for i, c in enumerate(coords) if c is not None]
    dim = sum(r.basis.shape[0] for r in alarm.channels.values())
    x = np.asarray([coords[i] for i in keep], dtype=np.float64).reshape(len(keep), dim)
    scan = window_scan(alarm, x, [paths[i] for i in keep])
    scan["random"] = random_windows(alarm, x, n_windows=200, seed=0)
    report = Path(str(out) + ".drift.json")
    write_json(report, scan)
    first = next((w for w in scan["per_window"] if w["triggered_by"]), None)
    brief = {k: v for k, v in scan.items() if k != "per_window"}
    brief["first_alarm"] = {"first": first["first"], "last": first["last"], "triggered_by": first["triggered_by"]} if first else None
    brief["report"] = str(report)
    return brief


def _steady_rate(pdir: Path, run_id: str) -> float | None:
    """Images/s after start-up, from the workers' ``inspected_at`` stamps of this run's parts:
    rows finished after the first batch / (last stamp - first stamp); ``None`` if too short."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    files = sorted(pdir.glob(f"part-{run_id}-*.parquet"))
    if not files:
        return None
    ts = pc.cast(_pa_concat([pq.read_table(f, columns=["inspected_at"]).column(0) for f in files]), "int64")
    lo, hi = pc.min(ts).as_py(), pc.max(ts).as_py()
    n_first = pc.sum(pc.equal(ts, lo)).as_py()
    if hi is None or hi - lo < 500:  # under half a second: not measurable at ms resolution
        return None
    return (len(ts) - n_first) / ((hi - lo) / 1000.0)


def _pa_concat(chunks: list):
    import pyarrow as pa

    return pa.chunked_array(chunks).combine_chunks() if chunks else pa.array([], pa.int64())


# ----------------------------------------------------------------------------------------------
# the job


@dataclass
class InspectResult:
    """What :func:`inspect_archive` did.

    Attributes:
        out: the results file.
        inputs: number of input paths (after expansion and de-duplication).
        rows: rows in ``out`` (== ``inputs`` when ``out`` holds no rows of other inputs).
        new: images scored in this call; ``resumed``: inputs found already done.
        errors: rows of ``out`` with an error.
        summary: :func:`summarize` of ``out``.
        identity: model identity (:func:`model_identity`).
        timings: seconds: ``ray_init`` (starting or joining Ray), ``first_result`` (from the job's
            start to the first result block: actor start-up, model load), ``run`` (job start to the
            last block), ``merge`` (merging the parts), ``total``.
        images_per_s: ``new / timings["run"]``; ``steady_images_per_s``: images finished after the
            first batch / time from the first to the last batch, from the workers' ``inspected_at``
            stamps (start-up excluded).
        workers: the actors used (resolved when ``workers=None``; 0 when nothing was left to score).
    """

    out: Path
    inputs: int
    rows: int
    new: int
    resumed: int
    errors: int
    summary: dict
    identity: dict
    timings: dict = field(default_factory=dict)
    images_per_s: float = 0.0
    steady_images_per_s: float = 0.0
    workers: int = 0


ProgressFn = Callable[[int, int, int, float], None]
"""``on_progress(done, total, errors, images_per_s)``: done counts resumed inputs too."""


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast when ``[ray://]host:port`` does not accept TCP connections (Ray itself retries
    for minutes). ``auto`` and addresses without a port are left to Ray.

    Raises:
        InspectError: the host does not resolve or nothing listens on the port.
    """
    text = address.split("://", 1)[-1]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InspectError(f"--address {address}: no Ray cluster reachable at {host}:{port} "
                           f"({exc.strerror or exc.__class__.__name__}); start one with 'ray start --head' "
                           "or leave --address out for a local Ray") from None


def start_ray(address: str | None, num_cpus: int) -> bool:
    """Join the Ray cluster at ``address``, or start a private local Ray with ``num_cpus`` CPUs.

    The workers import this process's ``defectscope`` package: locally through their inherited
    ``PYTHONPATH``, on a cluster through Ray's ``runtime_env`` (``py_modules``), so they run the
    same code as the driver; its dependencies (torch, onnxruntime, pyarrow) must be installed on
    the nodes.

    Start-up cost kept down: no dashboard, no GPU detection (``num_gpus=0``), worker output not
    streamed to the driver (``log_to_driver=False``: an actor's failure still arrives as its
    exception), usage statistics off for the private instance (``RAY_USAGE_STATS_ENABLED=0`` unless
    set), no ``runtime_env`` locally; and the workers of an ONNX classifier never import torch
    (:func:`defectscope.deploy.adapters.get_adapter` imports only the task's adapter).

    Returns:
        ``True`` when this call started Ray (the caller shuts it down), ``False`` if Ray was
        already initialised in this process (then that instance is used).

    Raises:
        InspectError: ``address`` unreachable, checked first, even when this process already runs
            Ray (an address that names nothing is an error, never silently replaced by that instance).
    """
    import ray

    import defectscope

    if address:
        _check_reachable(address)
    if ray.is_initialized():
        return False
    pkg = Path(defectscope.__file__).resolve().parent
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "configure_logging": True, "log_to_driver": False}
    if address:  # the workers import the driver's own defectscope (shipped by Ray), not whatever is installed there
        try:
            from defectscope.data.images import MAX_MEGAPIXELS_ENV

            env = {MAX_MEGAPIXELS_ENV: os.environ[MAX_MEGAPIXELS_ENV]} if os.environ.get(MAX_MEGAPIXELS_ENV) else {}
            ray.init(address=address, runtime_env={"py_modules": [str(pkg)], "excludes": ["__pycache__", "*.pyc"],
                                                   **({"env_vars": env} if env else {})}, **quiet)
        except ConnectionError as exc:
            raise InspectError(f"--address {address}: cannot join the Ray cluster ({exc}); check the address "
                               "(head:6379 or ray://head:10001) and the cluster's authentication settings") from None
    else:  # "local": always a new private instance, never an unrelated cluster found on this machine
        # local workers inherit the environment: put the driver's defectscope first on their path (cheaper
        # than a runtime_env, which would start fresh worker processes instead of Ray's pre-started ones)
        old = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join([str(pkg.parent)] + ([old] if old else []))
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=0, object_store_memory=512 * 1024 * 1024, **quiet)
        finally:
            if old is None:
                os.environ.pop("PYTHONPATH", None)
            else:
                os.environ["PYTHONPATH"] = old
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    return True


def inspect_archive(model: str | os.PathLike, sources: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                    workers: int | None = None, threads: int = 1, batch_size: int = 32, address: str | None = None,
                    resume: bool = False, overwrite: bool = False, flush_rows: int = 1000, flush_seconds: float = 10.0,
                    block_rows: int | None = None, on_progress: ProgressFn | None = None,
                    save_maps: str | os.PathLike | None = None, runtime: str = "onnxruntime") -> InspectResult:
    """Score every image of ``sources`` with ``model`` on Ray Data and write one Parquet row per image.

    Args:
        model: run folder (PyTorch) or ``.onnx`` file from ``defectscope export`` (ONNX Runtime);
            any task with a deploy adapter whose model takes an image only.
        sources: folders, globs, ``.txt`` list files or files (:func:`expand_sources`).
        out: results ``.parquet`` file; parts are streamed into ``out.parts/`` first.
        workers: actors (model copies) in the pool; ``None``: as many as the CPUs allow
            (local: ``os.cpu_count() // threads``; on a cluster: its CPUs ``// threads``), at least 1.
            ``threads``: intra-op threads and reserved CPUs per actor. A local Ray gets
            ``workers * threads`` CPUs. Measured here (docs/deploy.md): 2 workers of 1 thread beat
            1 worker of 2 threads by 1.5x on 2 cores.
        batch_size: images per forward pass.
        address: a Ray cluster (``ray://host:10001`` or ``host:6379``); ``None``: a private local Ray.
            On a cluster, defectscope (same version) must be installed on every node and the model
            and images must be readable at the same paths there.
        resume: skip paths already in ``out`` or its parts; other rows are kept.
        overwrite: discard an existing ``out`` and parts (``out`` is replaced only at the end).
        flush_rows, flush_seconds: write a part when this many rows are buffered or this many
            seconds passed since the last part (a kill loses at most that much work).
        block_rows: paths per Ray block (default ``4 * batch_size``, fewer for small inputs so that
            every worker gets blocks).
        on_progress: called after every result block, see :data:`ProgressFn`.
        save_maps: folder for each scored image's picture output (mask, anomaly map, boxes overlay,
            attention overlay: the adapter's ``map_kind``), named by :func:`map_file_name`; the rows get
            ``map_path``. On resume only the newly scored images' files are written.
        runtime: for an ``.onnx`` model, ``onnxruntime`` (default here; the CLI's default is ``auto``),
            ``openvino`` or ``auto``: the driver times both exact runtimes once (:class:`~defectscope.deploy.predictor.OnnxPredictor`) and every
            worker runs the faster one.

    Returns:
        :class:`InspectResult`.

    Raises:
        InspectError: bad sources; existing results without ``resume``/``overwrite``; results of
            another model on resume; a model that needs more than an image; ``save_maps`` with a task
            that has no picture output (classification, multicnn).
        DeployError / RunError: the model cannot be loaded.
        OutputPathError: ``out`` cannot be written.
    """
    import pyarrow as pa

    from defectscope.deploy.predictor import load_predictor
    from defectscope.utils.io import atomic_path, check_output_path

    t_start = time.perf_counter()
    if (workers is not None and workers < 1) or threads < 1 or batch_size < 1:
        raise InspectError(f"workers={workers}, threads={threads}, batch_size={batch_size}: each must be >= 1")
    if workers is None and not address:
        workers = max(1, (os.cpu_count() or 1) // threads)
    if resume and overwrite:
        raise InspectError("--resume and --overwrite exclude each other: resume keeps the rows already written, overwrite discards them")
    out = Path(out)
    check_output_path(out, "file")
    pdir = parts_dir(out)
    paths = expand_sources(sources)

    if resume and runtime == "auto" and Path(model).suffix.lower() == ".onnx" and (
            out.exists() or (pdir.is_dir() and any(pdir.glob("*.parquet")))):
        earlier = {b for t in read_existing(out) if t.num_rows and "model_backend" in t.column_names
                   for b in t.column("model_backend").to_pylist()} & {"onnxruntime", "openvino"}
        if len(earlier) == 1:
            runtime = earlier.pop()  # resume on the runtime that scored the earlier rows (auto's timing may differ)
    predictor = load_predictor(model, threads=threads, runtime=runtime)
    runtime = predictor.backend if predictor.backend in ("onnxruntime", "openvino") else "onnxruntime"
    answer = probe_answer(predictor)
    ident = model_identity(predictor)
    cols = answer_columns(answer)
    alarm = predictor.drift_alarm()
    if alarm is not None:
        cols.append((DRIFT_COLUMN, pa.list_(pa.float32())))
    maps_dir = None
    if save_maps is not None:
        if predictor.adapter.map_kind is None:
            raise InspectError(f"--save-maps {save_maps}: task '{predictor.info.task}' has no picture output to save "
                               "(segmentation masks, anomaly maps, detection boxes and weld attention maps are saved)")
        maps_dir = str(check_output_path(save_maps, "dir").resolve())
        cols.append(("map_path", pa.string()))
    del predictor

    existing = []
    have_parts = pdir.is_dir() and any(pdir.glob("*.parquet"))
    if out.exists() or have_parts:
        if overwrite:
            shutil.rmtree(pdir, ignore_errors=True)
        elif not resume:
            what = out if out.exists() else pdir
            raise InspectError(f"{what}: results of an earlier inspect exist; add --resume to continue it "
                               "(skips images already scored) or --overwrite to start again")
        else:
            existing = read_existing(out)
    done: set[str] = set()
    for t in existing:
        if t.num_rows and "model_sha256" in t.column_names:
            other = {(s, b) for s, b in zip(t.column("model_sha256").to_pylist(), t.column("model_backend").to_pylist())}
            other.discard((ident["model_sha256"], ident["model_backend"]))
            if other:
                s, b = sorted(other)[0]
                raise InspectError(f"{out}: holds results of another model (sha256 {str(s)[:16]}, {b}); this run uses "
                                   f"{ident['model_sha256'][:16]} ({ident['model_backend']}); write to another --out or use --overwrite")
        done.update(t.column("path").to_pylist())
    todo = [p for p in paths if p not in done]
    resumed = len(paths) - len(todo)

    timings: dict[str, float] = {}
    new = new_errors = 0
    steady = rate = 0.0
    prior_errors = sum(t.num_rows - t.column("error").null_count for t in existing if "error" in t.column_names)
    if on_progress:
        on_progress(resumed, len(paths), prior_errors, 0.0)
    if todo:
        import ray
        import ray.data

        t0 = time.perf_counter()
        started = start_ray(address, (workers or 1) * threads)
        timings["ray_init"] = time.perf_counter() - t0
        if workers is None:  # a cluster: one worker per `threads` of its CPUs
            workers = max(1, int(ray.cluster_resources().get("CPU", threads)) // threads)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            # fewer blocks than workers (a handful of images) is fine here; Ray would warn about it
            warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)
            # blocks of at most 4 batches, and enough blocks to keep every worker busy
            block = block_rows or max(1, min(4 * batch_size, -(-len(todo) // (4 * workers))))
            blocks = [pa.table({"path": pa.array(todo[i : i + block], pa.string())}) for i in range(0, len(todo), block)]
            ds = ray.data.from_arrow(blocks).map_batches(
                ImageScorer, fn_constructor_kwargs={"model": str(Path(model).resolve()), "threads": threads, "answer_cols": cols, "runtime": runtime,
                                                 "maps_dir": maps_dir},
                batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=threads)
            run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            buffer: list = []
            buffered = seq = 0
            last_flush = t_job = time.perf_counter()
            t_first = None

            def flush() -> None:
                nonlocal buffer, buffered, seq, last_flush
                if buffered:
                    import pyarrow.parquet as pq

                    with atomic_path(pdir / f"part-{run_id}-{seq:06d}.parquet") as tmp:  # creates pdir
                        pq.write_table(pa.concat_tables(buffer), tmp)
                    seq += 1
                buffer, buffered, last_flush = [], 0, time.perf_counter()

            try:
                for tbl in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                    buffer.append(tbl)
                    buffered += tbl.num_rows
                    new += tbl.num_rows
                    new_errors += tbl.num_rows - tbl.column("error").null_count
                    if buffered >= flush_rows or now - last_flush >= flush_seconds:
                        flush()
                    if on_progress:
                        on_progress(resumed + new, len(paths), prior_errors + new_errors, new / max(now - t_job, 1e-9))
            finally:  # also on KeyboardInterrupt: what arrived is kept for --resume
                flush()
            t_end = time.perf_counter()
            timings["first_result"] = (t_first or t_end) - t_job
            timings["run"] = t_end - t_job
            rate = new / max(timings["run"], 1e-9)
            steady = _steady_rate(pdir, run_id) or rate
        finally:
            if started:
                ray.shutdown()
    t0 = time.perf_counter()
    tables = read_existing(out, include_out=resume)  # --overwrite: the old RESULTS is replaced, not merged
    merged = merge_results(tables, out)
    shutil.rmtree(pdir, ignore_errors=True)
    timings["merge"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    have = set(merged.column("path").to_pylist())
    missing = [p for p in paths if p not in have]
    if missing:  # cannot happen unless Ray dropped rows; fail loudly rather than report a short table as complete
        raise InspectError(f"{out}: {len(missing)} input(s) have no row (first: {missing[0]}); rerun with --resume")
    summary = summarize(merged)
    if alarm is not None and DRIFT_COLUMN in merged.column_names:
        summary["drift"] = drift_scan(alarm, merged, out)
    return InspectResult(out=out, inputs=len(paths), rows=merged.num_rows, new=new, resumed=resumed,
                         errors=summary["errors"], summary=summary, identity=ident, timings=timings,
                         images_per_s=rate, steady_images_per_s=steady, workers=(workers or 0) if new else 0)
