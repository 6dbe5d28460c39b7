"""Atomic writes (``defectscope.utils.io``): all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from defectscope.utils.io import atomic_path, write_json, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """mkstemp's temporary files are private (0o600); a report or a results file must not be:
    a colleague of the same group reads it. Compared with a file made by ``open`` in the same process."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    write_text(tmp_path / "a.txt", "hello")
    write_json(tmp_path / "b.json", {"k": 1})
    assert _mode(tmp_path / "a.txt") == _mode(plain) == _mode(tmp_path / "b.json")
    assert (tmp_path / "a.txt").read_text() == "hello"
    # a writer that sets its own mode keeps it
    with atomic_path(tmp_path / "key.pem") as tmp:
        tmp.write_text("secret")
        os.chmod(tmp, 0o400)
    assert _mode(tmp_path / "key.pem") == 0o400


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text().strip().startswith("{") and "old" in target.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
