"""The project's own error types: one base class, so the CLI can tell user errors from bugs.

Every error a user can fix (a bad recipe, a bad data file, a missing or unsafe run folder, an
output path that cannot be written) is a :class:`DefectscopeError`; the CLI prints its message
as one line and exits with status 2. Any other exception is a bug and keeps its traceback.

The concrete classes live beside the code that raises them (``ConfigError`` in
:mod:`defectscope.config`, ``DatasetError`` / ``ImageReadError`` in
:mod:`defectscope.data.images`, ``RLEError``, ``BoxFormatError``, ``WeldDataError``,
``RunError`` in :mod:`defectscope.engine.run`, ``DeployError``, ``WeightsUnavailableError``).
Most also derive from :class:`ValueError` (or ``KeyError`` / ``RuntimeError``) so that code
catching those keeps working.
"""

from __future__ import annotations


class DefectscopeError(Exception):
    """Base of every user-facing error; the message names the file and the field."""


class OutputPathError(DefectscopeError, ValueError):
    """An output path (``--out``) cannot be written: it is a folder where a file is expected (or
    the reverse), or its folder is not writable. Raised before any work is done."""


class UnknownNameError(DefectscopeError, KeyError):
    """A registry lookup (task, model, backbone, encoder) named something unknown; the message
    lists the known names. ``str()`` gives the message without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
