"""Load run of the inference service (not a test): N concurrent clients for T seconds on 127.0.0.1.

Starts ``defectscope serve MODEL`` on a free local port as a child process, waits for
``/healthz``, lets ``--clients`` asyncio clients (httpx) POST a real NEU image to
``/v1/predict`` in closed loops until ``--seconds`` have passed, then stops the
service and prints requests/s, latency p50/p95/p99, errors by kind, and the
service's peak resident memory (``VmHWM`` of ``/proc/PID/status``).

    python benchmarks/load_service.py RUN_DIR_OR_MODEL.onnx --clients 50 --seconds 60

Every loop is bounded: the clients stop at the deadline, each request times out
after ``--timeout`` seconds, and the service is terminated at the end.

``--mix`` runs a hostile mixed load instead (issue 17): of the ``--clients`` clients,
``--bad-frac`` send bad requests (not an image, a truncated PNG, a form without a ``file``
part, the image under an unknown field name, a declared Content-Length of 1 TB), ``--oversize-frac``
send uploads over ``--max-mb`` (1.5 x the limit with Content-Length, which the handler refuses
after spooling it; 3 x with Content-Length, refused from the header; 4 x streamed with
``Transfer-Encoding: chunked`` from a generator, refused while it streams), ``--stall-frac``
open raw sockets, send the headers and part of the body and then wait without finishing
(``--stall-seconds`` each), and the rest send good requests. The service runs with
``TMPDIR`` set to a fresh folder whose disk use (files in it plus open deleted/unnamed
temporary files of the service process, counted per inode) is sampled every 50 ms, together
with the service's RSS. At the end a table gives requests and status codes per kind, the
errors on good requests (goal 0), whether every bad and oversized request got a 4xx (goal yes),
the peak RSS (``VmHWM``), the largest temporary disk use and the good requests/s. A client that
sees ``ReadError`` / ``WriteError`` on an oversized upload did not get the service's 413: the
service answered and closed the connection while the client was still sending, and the reset
(unread data at close) reached the client before the answer; it counts as "not a 4xx".

    python benchmarks/load_service.py MODEL.onnx --mix --clients 50 --seconds 60 --json loadmix.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


# ----------------------------------------------------------------------------------------------
# --mix: good, bad, oversized and stalled clients at once
# ----------------------------------------------------------------------------------------------

BOUNDARY = "loadmixboundary7d1f"
BAD_KINDS = ("not_an_image", "corrupt_png", "no_file_part", "unknown_field", "huge_content_length")
OVERSIZE_KINDS = ("oversize_1.5x_length", "oversize_3x_length", "oversize_4x_chunked")
CHUNK = 64 * 1024


def multipart(parts: list[tuple[str, str | None, bytes, str]]) -> bytes:
    """A multipart/form-data body (boundary :data:`BOUNDARY`) from ``(field, filename or None, data,
    content type)`` parts, built by hand so that bad forms can be sent too."""
    out = io.BytesIO()
    for field, filename, data, ctype in parts:
        disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"--{BOUNDARY}\r\nContent-Disposition: {disp}\r\nContent-Type: {ctype}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return out.getvalue()


def part_head(field: str, filename: str, ctype: str) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n").encode()


class Tally:
    """Outcomes per kind: an HTTP status (int) or an exception name (str); latencies of good 200s, s."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter] = {}
        self.good_latencies: list[float] = []
        self.stall_held: list[float] = []

    def add(self, kind: str, outcome: int | str) -> None:
        self.outcomes.setdefault(kind, Counter())[outcome] += 1


class Sampler(threading.Thread):
    """Samples the service's ``VmRSS`` and the disk use of its temporary folder every ``period`` s.

    Disk use = sizes of the regular files under ``tmpdir`` plus those of the files the process holds
    open under ``tmpdir`` (``tempfile.TemporaryFile`` uses ``O_TMPFILE`` or unlinks at once, so the
    spooled uploads never show in a directory listing), each inode counted once. Bytes.
    """

    def __init__(self, pid: int, tmpdir: Path, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.tmpdir, self.period = pid, str(tmpdir), period
        self.stop_event = threading.Event()
        self.max_disk = 0
        self.max_rss_kib = 0
        self.samples = 0

    def disk_bytes(self) -> int:
        sizes: dict[tuple[int, int], int] = {}
        for root, _dirs, files in os.walk(self.tmpdir):
            for f in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(root, f))
                    sizes[(st.st_dev, st.st_ino)] = st.st_size
        fd_dir = f"/proc/{self.pid}/fd"
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    if os.readlink(os.path.join(fd_dir, fd)).startswith(self.tmpdir):
                        st = os.stat(os.path.join(fd_dir, fd))
                        sizes[(st.st_dev, st.st_ino)] = st.st_size
        return sum(sizes.values())

    def run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.max_rss_kib = max(self.max_rss_kib, proc_memory_kib(self.pid)["VmRSS"])
            self.max_disk = max(self.max_disk, self.disk_bytes())
            self.samples += 1
            self.stop_event.wait(self.period)


async def raw_request(host: str, port: int, head: bytes, body_part: bytes, timeout: float) -> int | str:
    """Send ``head`` + ``body_part`` over a raw socket (the body may be shorter than declared) and
    return the status of the answer, or ``"closed"`` / the exception name."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        writer.write(head + body_part)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return int(line.split()[1]) if line.startswith(b"HTTP/") else "closed"
    except (OSError, asyncio.TimeoutError, ValueError, IndexError) as exc:
        return exc.__class__.__name__
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def http_head(host: str, port: int, length: int | None, chunked: bool = False) -> bytes:
    lines = [f"POST /v1/predict HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def good_loop(client, url, image, name, deadline, tally: Tally) -> None:
    body = multipart([("file", name, image, "image/jpeg")])
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        try:
            r = await client.post(url, content=body, headers=headers)
            tally.add("good", r.status_code)
            if r.status_code == 200:
                tally.good_latencies.append(time.perf_counter() - t0)
        except (httpx.HTTPError, OSError) as exc:
            tally.add("good", exc.__class__.__name__)


async def bad_loop(client, url, host, port, image, png, deadline, timeout, tally: Tally, offset: int) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    bodies = {
        "not_an_image": multipart([("file", "notes.jpg", b"this is a text file, not an image\n" * 50, "image/jpeg")]),
        "corrupt_png": multipart([("file", "broken.png", png[: len(png) // 2], "image/png")]),
        "no_file_part": multipart([("comment", None, b"no image here", "text/plain")]),
        "unknown_field": multipart([("image", "scratches.jpg", image, "image/jpeg"), ("colour", None, b"blue", "text/plain")]),
    }
    i = offset
    while time.perf_counter() < deadline:
        kind = BAD_KINDS[i % len(BAD_KINDS)]
        i += 1
        if kind == "huge_content_length":  # declares 1 TB, sends 1 KiB
            head = http_head(host, port, 10**12)
            tally.add(kind, await raw_request(host, port, head, part_head("file", "big.jpg", "image/jpeg") + image[:1024], timeout))
            continue
        try:
            r = await client.post(url, content=bodies[kind], headers=headers)
            tally.add(kind, r.status_code)
        except (httpx.HTTPError, OSError) as exc:
            tally.add(kind, exc.__class__.__name__)


async def oversize_loop(client, url, max_bytes, deadline, tally: Tally, offset: int) -> None:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    chunk = os.urandom(CHUNK)
    fixed = {"oversize_1.5x_length": multipart([("file", "big.jpg", os.urandom(int(1.5 * max_bytes)), "image/jpeg")]),
             "oversize_3x_length": multipart([("file", "huge.jpg", os.urandom(3 * max_bytes), "image/jpeg")])}

    async def chunked_body():
        yield part_head("file", "stream.jpg", "image/jpeg")
        for _ in range(4 * max_bytes // CHUNK + 1):
            yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    i = offset
    while time.perf_counter() < deadline:
        kind = OVERSIZE_KINDS[i % len(OVERSIZE_KINDS)]
        i += 1
        try:
            content = chunked_body() if kind.endswith("chunked") else fixed[kind]
            r = await client.post(url, content=content, headers=headers)
            tally.add(kind, r.status_code)
        except (httpx.HTTPError, OSError) as exc:
            tally.add(kind, exc.__class__.__name__)


async def stalled_loop(host, port, image, deadline, hold, timeout, tally: Tally) -> None:
    """Open a socket, send the headers and part of a body declared 200 kB long, then wait (at most
    ``hold`` s) without finishing; record ``held`` or what the server did (status, ``closed``)."""
    declared = 200_000
    partial = part_head("file", "slow.jpg", "image/jpeg") + image[:2000]
    while time.perf_counter() < deadline - 0.2:
        t0 = time.perf_counter()
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(http_head(host, port, declared) + partial)
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), max(0.0, min(deadline, t0 + hold) - time.perf_counter()))
                outcome: int | str = int(line.split()[1]) if line.startswith(b"HTTP/") else "closed_by_server"
            except asyncio.TimeoutError:
                outcome = "held"
        except (OSError, asyncio.TimeoutError, ValueError, IndexError) as exc:
            outcome = exc.__class__.__name__
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        tally.add("stalled", outcome)
        tally.stall_held.append(time.perf_counter() - t0)


def split_clients(clients: int, bad: float, oversize: float, stall: float) -> dict[str, int]:
    """Clients per group; at least one good client; each non-zero fraction gets at least one client."""
    n = {k: (max(1, round(f * clients)) if f > 0 else 0) for k, f in (("bad", bad), ("oversize", oversize), ("stalled", stall))}
    n["good"] = clients - sum(n.values())
    if n["good"] < 1:
        raise SystemExit(f"--clients {clients} leaves no good client with these fractions ({n}); use more clients")
    return n


async def drive_mix(host: str, port: int, image: bytes, png: bytes, name: str, groups: dict[str, int], seconds: float,
                    timeout: float, max_bytes: int, stall_seconds: float) -> tuple[Tally, float]:
    tally = Tally()
    url = f"http://{host}:{port}/v1/predict"
    total = sum(groups.values())
    limits = httpx.Limits(max_connections=total, max_keepalive_connections=total)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as good_client, \
            httpx.AsyncClient(timeout=timeout, limits=limits) as bad_client:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        tasks = [good_loop(good_client, url, image, name, deadline, tally) for _ in range(groups["good"])]
        tasks += [bad_loop(bad_client, url, host, port, image, png, deadline, timeout, tally, i) for i in range(groups["bad"])]
        tasks += [oversize_loop(bad_client, url, max_bytes, deadline, tally, i) for i in range(groups["oversize"])]
        tasks += [stalled_loop(host, port, image, deadline, stall_seconds, timeout, tally) for _ in range(groups["stalled"])]
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return tally, wall


def mix_report(tally: Tally, wall: float, groups: dict[str, int], sampler: Sampler, mem0: dict, mem1: dict,
               tmp_end: int, health: dict, args) -> dict:
    """The result of a mixed run as a JSON-compatible dict (see the module docstring)."""
    kinds = {k: {"requests": sum(c.values()), "outcomes": {str(o): n for o, n in sorted(c.items(), key=str)}}
             for k, c in sorted(tally.outcomes.items())}
    good = tally.outcomes.get("good", Counter())
    good_errors = {str(o): n for o, n in good.items() if o != 200}
    hostile = [k for k in tally.outcomes if k in BAD_KINDS or k in OVERSIZE_KINDS]
    not_4xx = {k: {str(o): n for o, n in tally.outcomes[k].items() if not (isinstance(o, int) and 400 <= o < 500)}
               for k in hostile}
    not_4xx = {k: v for k, v in not_4xx.items() if v}
    lat = np.array(tally.good_latencies) * 1000.0
    return {
        "model": health["model"], "clients": groups, "seconds": args.seconds, "wall_s": round(wall, 2),
        "service": {"max_bytes": health["max_bytes"], "workers": health["workers"], "capacity": health["capacity"],
                    "threads": args.threads},
        "kinds": kinds,
        "good_ok": int(good.get(200, 0)), "good_errors": good_errors, "good_error_count": sum(good_errors.values()),
        "good_requests_per_s": round(good.get(200, 0) / wall, 2),
        "good_latency_ms": {f"p{q}": (round(float(np.percentile(lat, q)), 1) if len(lat) else None) for q in (50, 95, 99)},
        "all_bad_and_oversize_4xx": not not_4xx and bool(hostile), "not_4xx": not_4xx,
        "stalled_connections": sum(tally.outcomes.get("stalled", Counter()).values()),
        "stalled_mean_held_s": round(float(np.mean(tally.stall_held)), 2) if tally.stall_held else None,
        "rss_start_mib": round(mem0["VmRSS"] / 1024, 1), "rss_end_mib": round(mem1["VmRSS"] / 1024, 1),
        "rss_peak_mib": round(max(mem1["VmHWM"], sampler.max_rss_kib) / 1024, 1),
        "tmp_disk_max_mib": round(sampler.max_disk / 2**20, 2), "tmp_disk_end_mib": round(tmp_end / 2**20, 2),
        "disk_samples": sampler.samples,
    }


def print_mix(res: dict) -> None:
    print(f"{'kind':<24}{'requests':>9}  status codes / exceptions")
    for k, v in res["kinds"].items():
        print(f"{k:<24}{v['requests']:>9}  {', '.join(f'{o}: {n}' for o, n in v['outcomes'].items())}")
    rows = [
        ("good errors (goal 0)", f"{res['good_error_count']} {res['good_errors'] or ''}"),
        ("bad+oversize all 4xx", f"{'yes' if res['all_bad_and_oversize_4xx'] else 'NO'} {res['not_4xx'] or ''}"),
        ("good requests/s", f"{res['good_requests_per_s']:.2f}  (wall {res['wall_s']:.1f} s)"),
        ("good p50/p95/p99 ms", " / ".join(str(v) for v in res["good_latency_ms"].values())),
        ("stalled connections", f"{res['stalled_connections']} (mean held {res['stalled_mean_held_s']} s)"),
        ("service RSS start/end MiB", f"{res['rss_start_mib']:.0f} / {res['rss_end_mib']:.0f}"),
        ("service peak RSS MiB", f"{res['rss_peak_mib']:.0f}  (VmHWM)"),
        ("tmp disk max / end MiB", f"{res['tmp_disk_max_mib']:.2f} / {res['tmp_disk_end_mib']:.2f}  ({res['disk_samples']} samples)"),
    ]
    for k, v in rows:
        print(f"{k:<28}{v}")


def png_bytes(image: bytes) -> bytes:
    """The image re-encoded as PNG (its first half is the 'corrupt PNG' bad request)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(image)).save(buf, format="PNG")
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run folder or .onnx file")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--workers", type=int, default=1, help="service inference threads")
    ap.add_argument("--queue", type=int, default=64, help="service queue places (503 beyond workers + queue)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the model")
    ap.add_argument("--max-mb", type=float, default=10.0, help="service upload limit per file, MiB (serve --max-mb)")
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    ap.add_argument("--startup", type=float, default=600.0, help="seconds to wait for the service to answer /healthz")
    ap.add_argument("--mix", action="store_true", help="mixed load: good, bad, oversized and stalled clients")
    ap.add_argument("--bad-frac", type=float, default=0.3, help="--mix: share of clients sending bad requests")
    ap.add_argument("--oversize-frac", type=float, default=0.2, help="--mix: share of clients sending uploads over --max-mb")
    ap.add_argument("--stall-frac", type=float, default=0.1, help="--mix: share of stalled clients")
    ap.add_argument("--stall-seconds", type=float, default=15.0, help="--mix: how long a stalled client waits before giving up")
    ap.add_argument("--json", type=Path, default=None, help="write the result as JSON to this file")
    args = ap.parse_args()
    image = args.image.read_bytes()
    groups = split_clients(args.clients, args.bad_frac, args.oversize_frac, args.stall_frac) if args.mix else None
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", "from defectscope.cli import app; app()", "serve", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(args.workers), "--queue", str(args.queue), "--threads", str(args.threads),
           "--max-mb", f"{args.max_mb:g}"]
    tmpdir = Path(tempfile.mkdtemp(prefix="load-service-tmp-"))
    service = subprocess.Popen(cmd, env={**os.environ, "TMPDIR": str(tmpdir)})
    sampler = None
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
        what = f"mix {groups}" if args.mix else f"{args.clients} clients"
        print(f"service: {health['model']} workers={health['workers']} capacity={health['capacity']} "
              f"max_bytes={health['max_bytes']}; {what} for {args.seconds:g} s with {args.image.name}", flush=True)
        sampler = Sampler(service.pid, tmpdir)
        sampler.start()
        if args.mix:
            tally, wall = asyncio.run(drive_mix("127.0.0.1", port, image, png_bytes(image), args.image.name, groups,
                                                args.seconds, args.timeout, health["max_bytes"], args.stall_seconds))
        else:
            latencies, errors, wall = asyncio.run(drive(base, image, args.image.name, args.clients, args.seconds, args.timeout))
        time.sleep(0.2)
        sampler.stop_event.set()
        sampler.join()
        tmp_end = sampler.disk_bytes()
        mem1 = proc_memory_kib(service.pid)
        rejected = httpx.get(base + "/healthz").json()["rejected"]
    finally:
        if sampler is not None:
            sampler.stop_event.set()
        service.terminate()
        try:
            service.wait(20)
        except subprocess.TimeoutExpired:
            service.kill()
        shutil.rmtree(tmpdir, ignore_errors=True)
    if args.mix:
        res = mix_report(tally, wall, groups, sampler, mem0, mem1, tmp_end, health, args)
        res["rejected_503"] = rejected
        print_mix(res)
        print(f"{'503 rejected by the pool':<28}{rejected}")
    else:
        lat = np.array(latencies) * 1000.0
        n_err = sum(errors.values())
        pct = (lambda q: f"{np.percentile(lat, q):.0f}") if len(lat) else (lambda q: "-")
        print(f"{'requests ok':<28}{len(lat)}")
        print(f"{'errors':<28}{n_err} {dict(errors) if errors else ''}")
        print(f"{'requests/s':<28}{len(lat) / wall:.2f}  (wall {wall:.1f} s)")
        print(f"{'latency p50 / p95 / p99 ms':<28}{pct(50)} / {pct(95)} / {pct(99)}")
        print(f"{'service RSS start / end MiB':<28}{mem0['VmRSS'] / 1024:.0f} / {mem1['VmRSS'] / 1024:.0f}")
        print(f"{'service peak RSS MiB':<28}{mem1['VmHWM'] / 1024:.0f}  (VmHWM)")
        print(f"{'tmp disk max MiB':<28}{sampler.max_disk / 2**20:.2f}")
        print(f"{'503 rejected by the pool':<28}{rejected}")
        res = {"model": health["model"], "clients": args.clients, "seconds": args.seconds, "wall_s": round(wall, 2),
               "requests_ok": len(lat), "errors": {str(k): v for k, v in errors.items()},
               "requests_per_s": round(len(lat) / wall, 2),
               "latency_ms": {f"p{q}": (round(float(np.percentile(lat, q)), 1) if len(lat) else None) for q in (50, 95, 99)},
               "rss_peak_mib": round(mem1["VmHWM"] / 1024, 1), "tmp_disk_max_mib": round(sampler.max_disk / 2**20, 2),
               "rejected_503": rejected}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.partial")
        tmp.write_text(json.dumps(res, indent=2) + "\n")
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
