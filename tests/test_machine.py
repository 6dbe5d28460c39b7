"""Issue 23: one decision of precision and threads, made by this machine (defectscope.machine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from defectscope import machine
from defectscope.config import TrainConfig
from defectscope.machine import CpuFacts, resolve_precision, resolve_threads

SRC = Path(__file__).resolve().parents[1] / "src" / "defectscope"


def _facts(capability: str, flags: tuple[str, ...], mkldnn: bool) -> CpuFacts:
    return CpuFacts(model="test CPU", capability=capability, bf16_flags=flags, mkldnn_bf16=mkldnn,
                    logical_cpus=2, physical_cores=2)


@pytest.fixture
def fake_cpu(monkeypatch):
    """Replace the CPU facts and the bf16 probe; clear the per-process caches around the test."""

    def set_cpu(facts: CpuFacts, ratio: float = 4.0):
        monkeypatch.setattr(machine, "cpu_facts", lambda: facts)
        monkeypatch.setattr(machine, "bf16_probe", lambda: {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * ratio,
                                                             "ratio": ratio})
        machine._cpu_auto.cache_clear()

    yield set_cpu
    machine._cpu_auto.cache_clear()


def test_native_bf16_gives_bf16_mixed(fake_cpu):
    fake_cpu(_facts("AVX512", ("avx512_bf16",), True), ratio=4.2)
    p = resolve_precision("auto")
    assert p.value == "bf16-mixed" and p.bf16 and "native" in p.reason


def test_avx2_gives_fp32_without_probing(fake_cpu, monkeypatch):
    fake_cpu(_facts("AVX2", (), False))
    monkeypatch.setattr(machine, "bf16_probe", lambda: pytest.fail("an emulating CPU must not run the bf16 probe"))
    p = resolve_precision("auto")
    assert p.value == "32" and not p.bf16 and "AVX2" in p.reason and "emulates" in p.reason


def test_bf16_instructions_that_measure_slower_give_fp32(fake_cpu):
    fake_cpu(_facts("AVX512", ("avx512_bf16",), True), ratio=0.8)
    p = resolve_precision("auto")
    assert p.value == "32" and "measured" in p.reason


def test_explicit_settings_win(fake_cpu):
    fake_cpu(_facts("AVX2", (), False))
    assert resolve_precision("bf16-mixed").value == "bf16-mixed"
    assert "emulates bf16" in resolve_precision("bf16-mixed").reason
    fake_cpu(_facts("AVX512", ("avx512_bf16",), True))
    assert resolve_precision("32").value == "32" and resolve_precision(32).value == "32"
    assert resolve_precision("32-true").value == "32"
    with pytest.raises(ValueError, match="precision 'fp16'"):
        resolve_precision("fp16")


def test_trainer_uses_the_one_decision(fake_cpu):
    from defectscope.engine.trainer import resolved_precision

    fake_cpu(_facts("AVX2", (), False))
    assert TrainConfig().precision == "auto"
    assert resolved_precision(TrainConfig()) == "32"
    fake_cpu(_facts("AVX512", ("amx_bf16", "avx512_bf16"), True))
    assert resolved_precision(TrainConfig()) == "bf16-mixed"
    assert resolved_precision(TrainConfig(precision="32")) == "32"


def test_threads_auto_is_what_this_process_may_use():
    assert resolve_threads("auto") == machine.usable_cpus() >= 1
    assert resolve_threads(3) == 3
    assert TrainConfig(num_threads=0).num_threads == "auto"  # old recipes: 0 meant "torch's default"
    assert TrainConfig(num_threads="4").num_threads == 4
    with pytest.raises(ValueError):
        TrainConfig(num_threads=-1)
    with pytest.raises(ValueError):
        resolve_threads("many")


def test_no_module_outside_the_helper_decides_precision():
    """Every autocast goes through defectscope.machine.autocast; no recipe default or call site
    hard-codes bf16 (the issue's hard-coded sites: detection cache, weld features, seam U-Net, benchmark)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "machine.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"torch\.autocast\(|precision\s*=\s*[\"']bf16-mixed[\"']|[\"']precision[\"']\s*:\s*[\"']bf16", code):
                offenders.append(f"{path.relative_to(SRC)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    configs = Path(__file__).resolve().parents[1] / "configs"
    for cfg in configs.glob("*.yaml"):
        assert not re.search(r"precision:\s*bf16-mixed", cfg.read_text()), cfg.name
        assert not re.search(r"num_threads:\s*\d", cfg.read_text()), cfg.name


def test_environment_record_names_the_machine():
    env = machine.environment(resolve_precision("auto"))
    for key in ("cpu_model", "torch_cpu_capability", "native_bf16", "precision", "precision_reason", "threads",
                "torch", "onnxruntime", "openvino"):
        assert key in env
    import torch

    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    json.dumps(env)  # plain data for metrics.json
    assert env["precision"] in ("32", "bf16-mixed")


def test_doctor_prints_the_machine_and_the_choices():
    import torch
    from typer.testing import CliRunner

    from defectscope.cli import app

    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert torch.backends.cpu.get_cpu_capability() in out
    assert "fp32 matmul" in out and "GFLOP/s" in out
    p = resolve_precision("auto")
    assert f"precision {p.value}" in out and "serve / inspect" in out
    if not p.bf16:
        assert "not measured: bf16 is emulated here" in out
