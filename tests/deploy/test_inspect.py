"""``defectscope inspect`` on Ray Data: sources, results files, and a run killed half-way then resumed.

The Ray test starts Ray twice (a killed subprocess and the resume), so it is the only one that
runs Ray; the others check the pieces around it without starting Ray.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.deploy.inspect import InspectError, expand_sources, inspect_archive, merge_results, parts_dir

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory, neu_root):
    """An archive of 300 real NEU images (50 per class, symlinked) in two folders, 3 PNGs re-encoded
    from NEU files, one truncated PNG, and a list file naming one more real image and a missing one."""
    root = tmp_path_factory.mktemp("archive")
    for c in CLASSES:
        d = root / "line1" / c
        d.mkdir(parents=True)
        for i in range(1, 51):
            (d / f"{c}_{i}.jpg").symlink_to(neu_root / "images" / f"{c}_{i}.jpg")
    png = root / "line2"
    png.mkdir()
    for i in range(1, 4):
        Image.open(neu_root / "images" / f"scratches_{100 + i}.jpg").save(png / f"s{i}.png")
    data = (png / "s1.png").read_bytes()
    (png / "broken.png").write_bytes(data[: len(data) // 3])
    (root / "todo.txt").write_text(f"# extra images\n{neu_root / 'images' / 'patches_200.jpg'}\n\nmissing/nowhere.jpg\n")
    return root


def test_expand_sources_folders_globs_lists(archive):
    paths = expand_sources([archive / "line1", str(archive / "line2" / "*.png"), archive / "todo.txt",
                            archive / "line1" / "crazing" / "crazing_1.jpg"])  # a repeat is kept once
    assert len(paths) == 300 + 4 + 2 and len(set(paths)) == len(paths)
    assert all(os.path.isabs(p) for p in paths)
    assert str(archive / "missing" / "nowhere.jpg") in paths  # kept: it becomes a row with its error
    assert paths[0].endswith("line1/crazing/crazing_1.jpg")  # symlinks keep their names
    with pytest.raises(InspectError, match="matches no files"):
        expand_sources([str(archive / "*.tiff")])
    with pytest.raises(InspectError, match="no_such_folder: no such file"):
        expand_sources([archive / "no_such_folder"])


def test_merge_keeps_one_row_per_path(tmp_path):
    a = pa.table({"path": ["/b", "/a"], "class": ["x", "y"], "error": [None, None]})
    b = pa.table({"path": ["/b", "/c"], "class": ["z", None], "error": [None, "ImageReadError: /c: bad"]})
    merged = merge_results([a, b], tmp_path / "r.parquet")
    back = pq.read_table(tmp_path / "r.parquet")
    assert back.equals(merged)
    assert back.column("path").to_pylist() == ["/a", "/b", "/c"]
    assert back.column("class").to_pylist() == ["y", "x", None]  # the first row of /b wins


def test_existing_results_need_resume_and_the_same_model(tmp_path, tiny_onnx, archive):
    out = tmp_path / "r.parquet"
    pq.write_table(pa.table({"path": ["/x.jpg"], "error": [None], "model_sha256": ["0" * 64], "model_backend": ["onnxruntime"]}), out)
    src = [archive / "line2"]
    with pytest.raises(InspectError, match="--resume"):
        inspect_archive(tiny_onnx, src, out)
    with pytest.raises(InspectError, match="another model"):
        inspect_archive(tiny_onnx, src, out, resume=True)
    res = CliRunner().invoke(app, ["inspect", str(tiny_onnx), str(archive / "line2"), "--out", str(out), "--resume", "--overwrite"])
    assert res.exit_code == 2 and "exclude each other" in res.output
    with socket.socket() as s:  # a port nothing listens on: a clear error at once, not Ray's minutes of retries
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = CliRunner().invoke(app, ["inspect", str(tiny_onnx), str(archive / "line2"), "--out", str(tmp_path / "new.parquet"),
                                   "--address", f"127.0.0.1:{port}"])
    assert res.exit_code == 2 and f"no Ray cluster reachable at 127.0.0.1:{port}" in res.output
    assert not (tmp_path / "new.parquet").exists() and not parts_dir(tmp_path / "new.parquet").exists()


def _part_rows(out: Path) -> int:
    n = 0
    for f in parts_dir(out).glob("*.parquet"):
        try:
            n += pq.read_metadata(f).num_rows
        except Exception:  # noqa: BLE001 - only complete (atomically moved) parts count
            pass
    return n


def test_killed_run_resumes_to_the_same_table(tmp_path, tiny_onnx, archive, onnx_predictor):
    """A CLI run on 306 inputs is killed (SIGKILL to its process group: driver and Ray) once
    some parts are written; ``--resume`` finishes it. Every input has exactly one row, the two
    bad inputs carry their error, and every scored row equals the plain predictor's answer."""
    out = tmp_path / "preds.parquet"
    sources = [str(archive / "line1"), str(archive / "line2" / "*.png"), str(archive / "todo.txt")]
    cmd = [sys.executable, "-m", "defectscope.cli", "inspect", str(tiny_onnx), *sources, "--out", str(out),
           "--batch-size", "4", "--flush-every", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while _part_rows(out) < 24 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the CLI and its local Ray
        log = proc.communicate()[0].decode(errors="replace")
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{log[-3000:]}"
    assert not out.exists()  # the results file appears only when the job completes
    kept = _part_rows(out)
    assert 0 < kept < 306

    res = CliRunner().invoke(app, ["inspect", str(tiny_onnx), *sources, "--out", str(out), "--resume", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "scored now / already done" in res.output and f"{306 - kept} / {kept}" in res.output
    assert not parts_dir(out).exists()

    table = pq.read_table(out)
    paths = table.column("path").to_pylist()
    assert len(paths) == len(set(paths)) == 306
    assert set(paths) == set(expand_sources(sources))
    errors = {p: e for p, e in zip(paths, table.column("error").to_pylist()) if e is not None}
    assert set(errors) == {str(archive / "line2" / "broken.png"), str(archive / "missing" / "nowhere.jpg")}
    assert all(Path(p).name in e for p, e in errors.items())
    # the CLI's --runtime auto times ONNX Runtime and OpenVINO at start (either may win on a given CPU); the resume
    # keeps the runtime that scored the killed run's rows, so the table holds one
    backends = table.column("model_backend").unique().to_pylist()
    assert len(backends) == 1 and backends[0] in ("onnxruntime", "openvino"), backends

    # the same answers as an uninterrupted plain loop over the same model
    scored = [p for p in paths if p not in errors]
    ref = onnx_predictor.predict(scored, batch_size=16)
    rows = {r["path"]: r for r in table.to_pylist()}
    for p, a in zip(scored, ref):
        r = rows[p]
        assert r["class"] == a["class"]
        assert abs(r["score"] - a["score"]) < 1e-5
        probs = json.loads(r["probabilities"])
        assert list(probs) == CLASSES and np.allclose(list(probs.values()), list(a["probabilities"].values()), atol=1e-5)


def test_save_maps_refused_for_a_task_without_pictures(tmp_path, tiny_onnx, neu_files):
    with pytest.raises(InspectError, match="task 'classification' has no picture output"):
        inspect_archive(tiny_onnx, [neu_files[0]], tmp_path / "r.parquet", save_maps=tmp_path / "maps")
    assert not (tmp_path / "maps").exists() and not (tmp_path / "r.parquet").exists()
