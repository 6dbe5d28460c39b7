"""Atomic file writes: nothing already written is lost when a write fails half-way.

Every artefact of a run (checkpoint, metrics, report, export) is written to a
temporary file in the same folder and moved over the target with
:func:`os.replace`, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import yaml


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it, which is not thread-safe later)
_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; move it onto ``target`` on success.

    If the body raises, the temporary file is removed and ``target`` keeps its
    previous content (or stays absent). The final file gets the permissions a plain ``open(target,
    "w")`` would give (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``, unless the
    body changed them.

    Args:
        target: final file path. Its parent folder is created if missing.

    Yields:
        Path of an empty temporary file in the same folder (the body may replace or overwrite it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists() and (tmp_path.stat().st_mode & 0o777) == 0o600:
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically and return the path.

    Characters UTF-8 cannot encode (the surrogate escapes Python uses for file names that are
    not valid UTF-8) are written as backslash escapes (``\\udce9``), so such a name is still
    recorded instead of the whole write failing.
    """
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    return Path(target)


def display_path(path: str | os.PathLike) -> str:
    """``path`` as printable text: bytes that are not UTF-8 shown as ``\\xNN`` escapes."""
    raw = os.fsencode(path)
    return raw.decode("utf-8", errors="backslashreplace")


def check_output_path(target: str | os.PathLike, kind: str = "file") -> Path:
    """Check, before any work, that ``target`` can be written as a ``file`` or a ``dir``.

    A file target must not be an existing folder; a folder target must not be an existing file;
    the nearest existing folder on the way must be a writable folder (missing folders are
    created by the writers later).

    Raises:
        OutputPathError: the message names the path and what is wrong with it.
    """
    from defectscope.errors import OutputPathError

    target = Path(target)
    shown = display_path(target)
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    if kind == "file" and target.is_dir():
        raise OutputPathError(f"{shown}: is an existing folder; --out expects a file path here")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise OutputPathError(f"{shown}: is an existing file; --out expects a folder here")
    probe = target if kind == "dir" and target.is_dir() else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputPathError(f"{shown}: cannot be created: {display_path(probe)} is a file, not a folder")
    try:  # a real write probe: permissions, read-only mounts and full quotas all show here
        with tempfile.TemporaryFile(dir=probe, prefix=".defectscope-write-test."):
            pass
    except OSError as exc:
        raise OutputPathError(f"{shown}: cannot be written: folder {display_path(probe)} is not writable "
                              f"({exc.strerror or exc.__class__.__name__})") from None
    return target


def write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically and return the path."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def write_json(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays allowed)."""
    return write_text(target, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_yaml(target: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as YAML atomically."""
    return write_text(target, yaml.safe_dump(obj, sort_keys=False))


def torch_save(target: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` ``obj`` to ``target`` atomically (checkpoints)."""
    import torch

    with atomic_path(target) as tmp:
        torch.save(obj, tmp)
    return Path(target)


def torch_load_weights_only(path: str | os.PathLike, what: str, error: type[Exception], hint: str | None = None) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with every failure turned into ``error``.

    Opening the file never runs code from it: a file that carries a pickled Python object is
    refused (the message names the file, the object's type and why), and so is a missing, empty,
    truncated or corrupt file.

    Args:
        path: the file (a checkpoint, a weights file).
        what: what the file is, for the message (``checkpoint``, ``weights file (model.weights)``).
        error: the exception class to raise (the caller's :class:`~defectscope.errors.DefectscopeError`).
        hint: a sentence appended when the file holds a pickled object (default: do not load files
            of unknown origin).

    Raises:
        error: the message names ``path`` and the reason.
    """
    import pickle
    import re
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    if path.stat().st_size == 0:
        raise error(f"{path}: empty file (0 bytes); the {what} is missing its content")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text and "weights_only" not in text:
            raise error(f"{path}: {what} is corrupt ({exc.__class__.__name__}: {text.splitlines()[0][:200]})") from None
        found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global[^\w]+([\w.]+)", text)
        name = found.group(1) if found else "a Python object"
        raise error(f"{path}: refused to load the {what}: it holds a pickled Python object ({name}) and loading "
                    f"it could run arbitrary code. {hint or 'Do not load files of unknown origin.'}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, IndexError) as exc:
        first = (str(exc).splitlines() or [""])[0][:200]
        raise error(f"{path}: {what} cannot be read: truncated or corrupt ({exc.__class__.__name__}: {first})") from None
