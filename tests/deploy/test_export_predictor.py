"""ONNX export (metadata, dynamic batch, checker) and PyTorch / ONNX Runtime parity on real NEU images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from defectscope.deploy.adapters import DeployError, ModelInfo
from defectscope.deploy.predictor import OnnxPredictor, load_predictor


def test_export_writes_checked_model_with_metadata_and_dynamic_batch(tiny_onnx):
    model = onnx.load(str(tiny_onnx))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["defectscope.format"] == "defectscope-onnx/1"
    assert json.loads(meta["defectscope.task"]) == "classification"
    assert json.loads(meta["defectscope.class_names"])[0] == "crazing"
    assert json.loads(meta["defectscope.input_size"]) == [64, 64]
    norm = json.loads(meta["defectscope.normalisation"])
    assert norm["inside_model"] is True and norm["mean"] == [0.5, 0.5, 0.5]
    assert json.loads(meta["defectscope.thresholds"]) == {}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert [o.name for o in model.graph.output] == ["logits", "probabilities"]
    info = ModelInfo.from_metadata(meta, str(tiny_onnx))
    assert info.task == "classification" and info.input_size == (64, 64) and len(info.sha256) == 64


def test_onnx_matches_pytorch_on_real_neu_images(torch_predictor, onnx_predictor, neu_files):
    a = torch_predictor.predict(neu_files, batch_size=5)  # batches of 5, 5, 2: the batch axis is dynamic
    b = onnx_predictor.predict(neu_files, batch_size=12)
    pa = np.array([list(r["probabilities"].values()) for r in a])
    pb = np.array([list(r["probabilities"].values()) for r in b])
    assert pa.shape == (12, 6)
    assert np.abs(pa - pb).max() < 1e-4
    assert [r["class"] for r in a] == [r["class"] for r in b]
    assert np.allclose(pa.sum(1), 1.0, atol=1e-5)
    assert torch_predictor.identity()["backend"] == "pytorch" and onnx_predictor.identity()["backend"] == "onnxruntime"
    assert torch_predictor.identity()["sha256"] == onnx_predictor.identity()["sha256"]  # same checkpoint


def test_openvino_matches_onnx_runtime_on_real_neu_images(tiny_onnx, onnx_predictor, neu_files):
    """OpenVINO (fp32, compiled from the same ONNX file) against ONNX Runtime on real NEU images, batch 12 and 1."""
    from defectscope.deploy.benchmark import openvino_runner

    batch, _ = onnx_predictor.prepare(neu_files)
    ov = openvino_runner(tiny_onnx, threads=1)
    ref = onnx_predictor.run(batch)
    for b in (12, 1):
        got = ov({k: v[:b] for k, v in batch.items()})
        assert np.abs(got["probabilities"] - ref["probabilities"][:b]).max() < 1e-4
        assert (got["probabilities"].argmax(1) == ref["probabilities"][:b].argmax(1)).all()


def test_predictor_accepts_paths_bytes_and_arrays_alike(onnx_predictor, neu_files):
    from defectscope.data.images import load_image

    f = neu_files[3]
    by_path = onnx_predictor.predict([f])[0]
    by_bytes = onnx_predictor.predict([f.read_bytes()])[0]
    by_array = onnx_predictor.predict([load_image(f)])[0]
    by_float = onnx_predictor.predict([load_image(f).astype(np.float32) / 255.0])[0]
    for other in (by_bytes, by_array, by_float):
        assert other["class"] == by_path["class"]
        assert max(abs(other["probabilities"][k] - v) for k, v in by_path["probabilities"].items()) < 1e-6


def test_load_predictor_rejects_foreign_files(tmp_path, tiny_onnx):
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(DeployError, match="run folder"):
        load_predictor(txt)
    model = onnx.load(str(tiny_onnx))
    del model.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(DeployError, match="not a defectscope ONNX export"):
        OnnxPredictor(bare)


def test_spectra_to_image_only_model_is_an_error(onnx_predictor, neu_files):
    with pytest.raises(DeployError, match="image only"):
        onnx_predictor.predict([neu_files[0]], spectra=[np.zeros((4, 10), np.float32)])


def test_benchmark_measures_every_runtime_on_the_held_out_split(tiny_run, tmp_path):
    """A short benchmark of the tiny run (no torch.compile): every row measured, ONNX Runtime fp32 agrees
    with eager fp32 on the real held-out images, int8 runs, files and the table are written."""
    import json

    from defectscope.deploy.benchmark import benchmark, render_table

    res = benchmark(tiny_run, tmp_path, threads=1, iters=5, budget_s=0.5, test_limit=12, calib_images=8,
                    compile_=False, log=lambda m: None)
    rows = {r.runtime: r for r in res.rows}
    assert list(rows) == ["PyTorch eager fp32", "eager channels_last+bf16", "ONNX Runtime fp32", "ONNX Runtime int8",
                          "OpenVINO fp32"]
    assert all(r.error is None for r in res.rows), [r.error for r in res.rows]
    assert res.test_images == 12 and res.params > 0 and res.gflops_per_image > 0
    assert res.matmul_gflops["fp32"] > 0 and res.quality_metric == "accuracy %"
    ort = rows["ONNX Runtime fp32"]
    assert ort.max_abs_diff < 1e-4 and ort.agreement == 1.0
    ov = rows["OpenVINO fp32"]
    assert ov.max_abs_diff < 1e-4 and ov.agreement == 1.0 and ov.quality == ort.quality
    assert rows["ONNX Runtime int8"].max_abs_diff > 0  # really quantised
    assert rows["PyTorch eager fp32"].speedup_b1 == 1.0 and rows["PyTorch eager fp32"].max_abs_diff == 0.0
    from defectscope.machine import resolve_precision

    bf16 = rows.pop("eager channels_last+bf16")
    if resolve_precision("auto").bf16:  # measured only where this CPU computes bf16 natively (issue 23)
        rows["eager channels_last+bf16"] = bf16
    else:
        assert bf16.p50_ms is None and bf16.note.startswith("not measured: fp32") and res.matmul_gflops["bf16"] is None
    assert res.environment["torch_cpu_capability"] and "precision_reason" in res.environment
    for r in rows.values():
        assert r.p50_ms > 0 and r.p95_ms >= r.p50_ms and r.images_per_s > 0 and 0 <= r.quality <= 100
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.int8.onnx").is_file()
    assert len(json.loads((tmp_path / "benchmark.json").read_text())["rows"]) == 5
    assert render_table(res).row_count == 5


@pytest.mark.parametrize("task", ["timeseries"])
def test_tasks_without_an_adapter_are_refused_with_the_reason(tmp_path, task):
    """Export, predictor and service refuse the model families they do not handle, saying why."""
    import yaml

    from defectscope.deploy.export import export_onnx

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"task": task}))
    for call in (lambda: export_onnx(run, tmp_path / "m.onnx"), lambda: load_predictor(run)):
        with pytest.raises(DeployError, match=f"task '{task}' is not supported.*supported tasks: "
                                              "anomaly, classification, detection, multicnn, segmentation, weld"):
            call()
    assert not (tmp_path / "m.onnx").exists()


def test_int8_keeps_the_high_resolution_layers_of_both_resolutions_in_fp32(tiny_onnx):
    from defectscope.deploy.benchmark import first_layers, keep_fp32_nodes

    model = onnx.load(str(tiny_onnx))
    stems = first_layers(model)
    assert sorted(stems) == ["/model/backbone/conv_stem/Conv", "/model/backbone/conv_stem_1/Conv"]
    keep = keep_fp32_nodes(model)
    assert set(stems) < set(keep)
    # stage 0 (dw + pw) and stage 1 (2 blocks x 3 convs) of both resolutions, and nothing later
    assert len(keep) == 2 * (1 + 2 + 6) and not any("blocks.2" in n or "/head/" in n for n in keep)


def test_onnx_predictor_needs_no_torch(tiny_onnx, neu_files):
    """An ONNX classifier answers (as an ``inspect`` worker does) without importing torch, in a fresh
    interpreter; its session does not spin-wait (make_session)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from defectscope.deploy.predictor import load_predictor\n"
        "import defectscope.deploy.inspect\n"
        f"p = load_predictor({str(tiny_onnx)!r}, threads=1)\n"
        f"a = p.predict([{str(neu_files[0])!r}])[0]\n"
        "print(a['class'], p.session.get_session_options().get_session_config_entry('session.intra_op.allow_spinning'))\n"
        "print('torch' in sys.modules)\n"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    env = {**os.environ, "PYTHONPATH": str(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cls, spinning, torch_loaded = res.stdout.split()
    assert cls in ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches") and spinning == "0" and torch_loaded == "False"


def test_runtime_auto_times_both_exact_runtimes_and_keeps_the_faster(tiny_onnx, onnx_predictor, neu_files):
    """Issue 23: serve / inspect pick the fastest exact runtime on this CPU (--runtime auto)."""
    from defectscope.deploy.predictor import DeployError, load_predictor

    auto = load_predictor(tiny_onnx, threads=1, runtime="auto")
    choice = auto.runtime_choice
    assert choice["chosen"] == auto.backend in ("onnxruntime", "openvino")
    assert set(choice["batch1_ms"]) == {"onnxruntime", "openvino"} and all(v > 0 for v in choice["batch1_ms"].values())
    faster = min(choice["batch1_ms"], key=choice["batch1_ms"].get)
    assert auto.backend == faster or choice["max_abs_diff"] > 1e-3
    ov = load_predictor(tiny_onnx, threads=1, runtime="openvino")
    assert ov.identity()["backend"] == "openvino"
    ref = onnx_predictor.predict(neu_files)
    for p in (auto, ov):
        got = p.predict(neu_files)
        assert [r["class"] for r in got] == [r["class"] for r in ref]
        assert max(abs(g["probabilities"][k] - r["probabilities"][k]) for g, r in zip(got, ref) for k in r["probabilities"]) < 1e-4
    with pytest.raises(DeployError, match="runtime 'tensorrt'"):
        load_predictor(tiny_onnx, runtime="tensorrt")
