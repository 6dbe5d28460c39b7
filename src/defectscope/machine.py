"""The machine a run executes on: numeric precision, threads and an environment record.

One place decides what the processor is good at, so that no recipe, feature cache or benchmark
hard-codes a precision or a thread count written for one machine:

- :func:`resolve_precision` turns a recipe's ``precision`` (``auto``, ``32``, ``bf16-mixed``) into
  the precision a run uses, with the reason. ``auto`` is bf16 mixed precision only where this CPU
  computes bf16 natively **and** a short measured probe (well under a second, cached per process)
  shows bf16 matrix products faster than fp32; fp32 everywhere else. On a CPU with AVX2 but no
  AVX512-BF16 / AMX (most line-side industrial PCs), bf16 is emulated and about 24x slower than fp32
  (../shared/FACTS.md, 2026-12-06), so ``auto`` chooses fp32 there.
- :func:`autocast` is the one autocast context every module uses (training wrappers get theirs from
  Lightning's ``precision``; feature caches and benchmarks call this).
- :func:`resolve_threads` turns ``num_threads`` (``auto`` or a count) into torch's intra-op threads:
  ``auto`` = the CPUs this process may use (scheduler affinity and cgroup quota), never a constant.
- :func:`environment` is the record written into ``metrics.json`` and the report, and printed by
  ``defectscope doctor``.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: Measured bf16 / fp32 matrix-product rate ratio above which bf16 counts as faster. The reference
#: host with AVX512-BF16 measured ~4x (436 vs 102 GFLOP/s); an AVX512 host without bf16 hardware
#: emulates it and measures below 1.
BF16_SPEEDUP_NEEDED = 1.3
PRECISION_CHOICES = ("auto", "32", "32-true", "bf16-mixed")


@dataclass(frozen=True)
class CpuFacts:
    """What this processor offers, read without running any heavy computation.

    Attributes:
        model: the CPU model name (``/proc/cpuinfo`` ``model name``, else ``platform.processor()``).
        capability: ``torch.backends.cpu.get_cpu_capability()`` (``AVX2``, ``AVX512``, ...).
        bf16_flags: bf16 instruction-set flags the kernel reports (``avx512_bf16``, ``amx_bf16``).
        mkldnn_bf16: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` (oneDNN would run bf16 kernels;
            true on any AVX512 CPU, also where bf16 is only emulated).
        logical_cpus: CPUs this process may run on (affinity, cgroup quota).
        physical_cores: distinct (socket, core) pairs among them, when ``/proc/cpuinfo`` tells.
    """

    model: str
    capability: str
    bf16_flags: tuple[str, ...]
    mkldnn_bf16: bool
    logical_cpus: int
    physical_cores: int | None

    @property
    def bf16_hardware(self) -> bool:
        """True when the CPU has bf16 instructions (AVX512-BF16 or AMX-BF16), or, where the kernel
        lists no flags (not Linux), when oneDNN reports bf16 support."""
        return bool(self.bf16_flags) or (self.mkldnn_bf16 and not Path("/proc/cpuinfo").is_file())


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``value`` is a Lightning precision string (``32`` or ``bf16-mixed``)."""

    value: str
    requested: str
    reason: str

    @property
    def bf16(self) -> bool:
        """Whether bf16 autocast is on."""
        return self.value == "bf16-mixed"


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def usable_cpus() -> int:
    """CPUs this process may use: scheduler affinity, reduced by a cgroup v2/v1 CPU quota (>= 1)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = None
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            quota = float(text[0]) / float(text[1])
    except (OSError, ValueError, IndexError):
        try:
            q = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
            p = float(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            if q > 0 and p > 0:
                quota = q / p
        except (OSError, ValueError):
            pass
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


@functools.cache
def cpu_facts() -> CpuFacts:
    """The processor's facts (cached per process); see :class:`CpuFacts`."""
    import torch

    info = _cpuinfo()
    m = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    model = m.group(1).strip() if m else (platform.processor() or platform.machine())
    flags_line = re.search(r"^flags\s*:\s*(.+)$", info, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    bf16_flags = tuple(sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16")))
    try:
        mkldnn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        mkldnn = False
    cores = None
    pairs = re.findall(r"^processor\s*:\s*(\d+).*?^physical id\s*:\s*(\d+).*?^core id\s*:\s*(\d+)", info, re.M | re.S)
    if pairs:
        try:
            allowed = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            allowed = {int(p) for p, _, _ in pairs}
        cores = len({(s, c) for p, s, c in pairs if int(p) in allowed}) or None
    return CpuFacts(model=model, capability=str(torch.backends.cpu.get_cpu_capability()), bf16_flags=bf16_flags,
                    mkldnn_bf16=mkldnn, logical_cpus=usable_cpus(), physical_cores=cores)


def matmul_gflops(dtype_name: str = "float32", n: int = 512, seconds: float = 0.1, min_reps: int = 3) -> float:
    """Measured rate of ``n x n`` matrix products in GFLOP/s (``2 n^3`` flops each), best of the
    repetitions that fit in ``seconds`` (at least ``min_reps``), after one warm-up product.

    Args:
        dtype_name: ``float32`` or ``bfloat16``.
        n: matrix side.
        seconds: time budget of the measurement.
        min_reps: fewest timed products.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection)
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        reps += 1
        if reps >= 200:
            break
    return 2.0 * n**3 / max(best, 1e-9) / 1e9


@functools.cache
def bf16_probe() -> dict[str, float]:
    """Measured fp32 and bf16 matrix-product rates (512 x 512, ~0.1 s each; cached per process).

    Only called where the CPU has bf16 instructions: on an emulating CPU a bf16 probe alone would
    take seconds. Returns ``{"fp32_gflops", "bf16_gflops", "ratio"}``.
    """
    f32 = matmul_gflops("float32")
    b16 = matmul_gflops("bfloat16")
    return {"fp32_gflops": round(f32, 1), "bf16_gflops": round(b16, 1), "ratio": round(b16 / max(f32, 1e-9), 2)}


def matmul_rates(n: int = 2048, seconds: float = 0.0, min_reps: int = 5) -> dict[str, float | None]:
    """``{"fp32": GFLOP/s, "bf16": GFLOP/s or None}`` of ``n x n`` products (:func:`matmul_gflops`);
    bf16 is measured only where ``auto`` chooses it (native bf16): on an emulating CPU one 2048^3 bf16
    product takes seconds. Used by ``benchmark`` (the peak its rows are compared with) and ``doctor``."""
    f32 = matmul_gflops("float32", n, seconds, min_reps)
    return {"fp32": f32, "bf16": matmul_gflops("bfloat16", n, seconds, min_reps) if resolve_precision("auto").bf16 else None}


def compact_features(t):
    """Cached feature maps stored in bf16: half the memory of fp32 (NEU-DET's 4 x 1296 cached maps: about
    0.6 GB). A storage cast, not bf16 arithmetic, so it costs no more on an AVX2 CPU; readers convert back
    with ``.float()`` before computing."""
    import torch

    return t.to(torch.bfloat16).contiguous()


@functools.cache
def _cpu_auto() -> tuple[bool, str]:
    facts = cpu_facts()
    if not facts.bf16_hardware:
        why = (f"fp32: this CPU ({facts.capability}, no AVX512-BF16/AMX) emulates bf16, which is far slower "
               "than fp32")
        return False, why
    if not facts.mkldnn_bf16:
        return False, "fp32: the CPU lists bf16 instructions but torch's oneDNN does not use them"
    probe = bf16_probe()
    if probe["ratio"] < BF16_SPEEDUP_NEEDED:
        return False, (f"fp32: bf16 matrix products measured {probe['bf16_gflops']:.0f} vs fp32 "
                       f"{probe['fp32_gflops']:.0f} GFLOP/s here (ratio {probe['ratio']:.2f} < {BF16_SPEEDUP_NEEDED})")
    return True, (f"bf16-mixed: native bf16 ({', '.join(facts.bf16_flags) or 'oneDNN'}); bf16 matrix products measured "
                  f"{probe['bf16_gflops']:.0f} vs fp32 {probe['fp32_gflops']:.0f} GFLOP/s ({probe['ratio']:.1f}x)")


def _cuda_requested(accelerator: str) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def resolve_precision(requested: str | int | None = "auto", accelerator: str = "cpu") -> Precision:
    """The precision a run uses: ``auto`` decided by this machine, explicit settings kept.

    Args:
        requested: ``auto`` (or ``None``), ``32`` / ``32-true`` (fp32) or ``bf16-mixed``.
        accelerator: the trainer's accelerator (``cpu``, ``gpu``, ``cuda`` or ``auto``).

    Returns:
        :class:`Precision` with ``value`` ``32`` or ``bf16-mixed`` and the reason.

    Raises:
        ValueError: an unknown precision string.
    """
    req = "auto" if requested is None else str(requested)
    if req not in PRECISION_CHOICES:
        raise ValueError(f"precision {req!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    if req in ("32", "32-true"):
        return Precision("32", req, "fp32: set explicitly")
    if req == "bf16-mixed":
        facts = cpu_facts()
        note = "" if facts.bf16_hardware or _cuda_requested(accelerator) else (
            f" (this CPU, {facts.capability}, emulates bf16: expect it to be far slower than fp32)")
        return Precision("bf16-mixed", req, "bf16-mixed: set explicitly" + note)
    if _cuda_requested(accelerator):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return Precision("bf16-mixed", req, "bf16-mixed: the GPU computes bf16 natively")
        return Precision("32", req, "fp32: no GPU bf16 support found")
    use, why = _cpu_auto()
    return Precision("bf16-mixed" if use else "32", req, why)


def use_bf16(requested: str | int | None = "auto", accelerator: str = "cpu") -> bool:
    """Whether bf16 autocast is on for ``requested`` on this machine (:func:`resolve_precision`)."""
    return resolve_precision(requested, accelerator).bf16


def autocast(requested: str | int | None = "auto", accelerator: str = "cpu"):
    """The autocast context of :func:`resolve_precision` (``torch.autocast`` with bf16, or a no-op).

    Every place outside Lightning's trainer that computes in reduced precision (feature caches,
    benchmarks) enters this, so the decision is made once.
    """
    if not use_bf16(requested, accelerator):
        return nullcontext()
    import torch

    device = "cuda" if _cuda_requested(accelerator) else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16)


def resolve_threads(requested: int | str | None = "auto") -> int:
    """torch intra-op threads for ``num_threads``: ``auto`` / ``0`` / ``None`` = the CPUs this
    process may use (:func:`usable_cpus`; on the 2-vCPU reference machine 2 threads trained
    EfficientNet-Lite0 1.5x faster than 1), else the given count.

    Raises:
        ValueError: a count below 1 or text other than ``auto``.
    """
    if requested in (None, 0, "0", "auto"):
        return usable_cpus()
    try:
        n = int(requested)
    except (TypeError, ValueError):
        raise ValueError(f"num_threads {requested!r}: expected 'auto' or a count >= 1") from None
    if n < 1:
        raise ValueError(f"num_threads {requested!r}: expected 'auto' or a count >= 1")
    return n


def loader_workers(in_memory: bool = True) -> int:
    """DataLoader worker processes: 0 for data already decoded in memory (every task's samples are
    decoded once into arrays, and a worker process would only copy them), else one per usable CPU
    beyond the first, at most 4."""
    return 0 if in_memory else min(4, max(0, usable_cpus() - 1))


def environment(precision: Precision | None = None, threads: int | None = None) -> dict[str, Any]:
    """The machine record of a run (``metrics.json`` ``environment``, the report, ``doctor``).

    Returns:
        ``cpu_model``, ``torch_cpu_capability``, ``bf16_instructions``, ``native_bf16`` (the
        precision decision's verdict), ``logical_cpus``, ``physical_cores``, ``threads``,
        ``precision`` and ``precision_reason``, and the versions of python, torch, onnxruntime,
        openvino (``None`` when not installed).
    """
    import torch

    facts = cpu_facts()
    auto = resolve_precision("auto")
    prec = precision or auto
    env: dict[str, Any] = {
        "cpu_model": facts.model,
        "torch_cpu_capability": facts.capability,
        "bf16_instructions": list(facts.bf16_flags),
        "native_bf16": auto.bf16,
        "logical_cpus": facts.logical_cpus,
        "physical_cores": facts.physical_cores,
        "threads": int(threads if threads is not None else torch.get_num_threads()),
        "precision": prec.value,
        "precision_requested": prec.requested,
        "precision_reason": prec.reason,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("onnxruntime", "openvino"):
        try:
            from importlib.metadata import version

            env[mod] = version(mod)
        except Exception:  # noqa: BLE001 - not installed
            env[mod] = None
    return env


def describe(env: dict[str, Any]) -> str:
    """One line for logs and reports: CPU, capability, precision and threads of an :func:`environment`."""
    return (f"{env['cpu_model']} ({env['torch_cpu_capability']}, native bf16 {'yes' if env['native_bf16'] else 'no'}), "
            f"{env['threads']} threads, precision {env['precision']} ({env['precision_reason']})")


def as_dict(p: Precision) -> dict[str, str]:
    """A :class:`Precision` as plain data."""
    return asdict(p)
