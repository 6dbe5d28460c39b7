"""Load run of the inference service (not a test): N concurrent clients for T seconds on 127.0.0.1.

Starts ``defectscope serve MODEL`` on a free local port as a child process, waits for
``/healthz``, lets ``--clients`` asyncio clients (httpx) POST a real NEU image to
``/v1/predict`` in closed loops until ``--seconds`` have passed, then stops the
service and prints requests/s, latency p50/p95/p99, errors by kind, and the
service's peak resident memory (``VmHWM`` of ``/proc/PID/status``).

    python benchmarks/load_service.py RUN_DIR_OR_MODEL.onnx --clients 50 --seconds 60

Every loop is bounded: the clients stop at the deadline, each request times out
after ``--timeout`` seconds, and the service is terminated at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DEFECTSCOPE_SHARED", REPO.parent / "shared"))
DEFAULT_IMAGE = SHARED / "datasets" / "neu-det" / "images" / "scratches_1.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_memory_kib(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of a process, KiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out


async def client_loop(client: httpx.AsyncClient, url: str, image: bytes, name: str, deadline: float,
                      latencies: list[float], errors: Counter) -> None:
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            r = await client.post(url, files={"file": (name, image, "image/jpeg")})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors[f"HTTP {r.status_code} {r.json().get('error', '')}"] += 1
        except httpx.HTTPError as exc:
            errors[exc.__class__.__name__] += 1


async def drive(base: str, image: bytes, name: str, clients: int, seconds: float, timeout: float):
    latencies: list[float] = []
    errors: Counter = Counter()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await asyncio.gather(*[client_loop(client, base + "/v1/predict", image, name, deadline, latencies, errors)
                               for _ in range(clients)])
        wall = time.perf_counter() - t0
    return latencies, errors, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run folder or .onnx file")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--workers", type=int, default=1, help="service inference threads")
    ap.add_argument("--queue", type=int, default=64, help="service queue places (503 beyond workers + queue)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the model")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--startup", type=float, default=600.0, help="seconds to wait for the service to answer /healthz")
    args = ap.parse_args()
    image = args.image.read_bytes()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from defectscope.cli import app; app()", "serve", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(args.workers), "--queue", str(args.queue), "--threads", str(args.threads)]
    service = subprocess.Popen(cmd)
    try:
        t_start = time.perf_counter()
        while True:
            if service.poll() is not None:
                sys.exit(f"service exited with status {service.returncode} before answering")
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t_start > args.startup:
                sys.exit(f"service did not answer /healthz within {args.startup:g} s")
            time.sleep(0.5)
        health = httpx.get(base + "/healthz").json()
        mem0 = proc_memory_kib(service.pid)
        httpx.post(base + "/v1/predict", files={"file": (args.image.name, image, "image/jpeg")}, timeout=args.timeout)
        print(f"service: {health['model']} workers={health['workers']} capacity={health['capacity']}; "
              f"{args.clients} clients for {args.seconds:g} s with {args.image.name}", flush=True)
        latencies, errors, wall = asyncio.run(drive(base, image, args.image.name, args.clients, args.seconds, args.timeout))
        mem1 = proc_memory_kib(service.pid)
        rejected = httpx.get(base + "/healthz").json()["rejected"]
    finally:
        service.terminate()
        try:
            service.wait(20)
        except subprocess.TimeoutExpired:
            service.kill()
    lat = np.array(latencies) * 1000.0
    n_err = sum(errors.values())
    pct = (lambda q: f"{np.percentile(lat, q):.0f}") if len(lat) else (lambda q: "-")
    print(f"{'requests ok':<28}{len(lat)}")
    print(f"{'errors':<28}{n_err} {dict(errors) if errors else ''}")
    print(f"{'requests/s':<28}{len(lat) / wall:.2f}  (wall {wall:.1f} s)")
    print(f"{'latency p50 / p95 / p99 ms':<28}{pct(50)} / {pct(95)} / {pct(99)}")
    print(f"{'service RSS start / end MiB':<28}{mem0['VmRSS'] / 1024:.0f} / {mem1['VmRSS'] / 1024:.0f}")
    print(f"{'service peak RSS MiB':<28}{mem1['VmHWM'] / 1024:.0f}  (VmHWM)")
    print(f"{'503 rejected by the pool':<28}{rejected}")


if __name__ == "__main__":
    main()
