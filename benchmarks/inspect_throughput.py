"""Images/s of ``defectscope inspect`` on Ray Data vs a plain single-process loop, same model, files and threads.

    PYTHONPATH=src python benchmarks/inspect_throughput.py --model model.onnx \\
        --images ../shared/datasets/neu-det/images --threads 2 --workers 1 2

Plain loop: one process, ``load_predictor(model, threads=T)`` and ``predict`` over the files in
batches (read, decode, resize, ONNX Runtime, answer), results kept in memory. Ray: the full
``inspect_archive`` job (private local Ray with ``T`` CPUs, ``W`` actors of ``T / W`` threads each,
Parquet parts and the final merge). Every arm sees the same files (read once beforehand, so all
come from the page cache) and the same total thread budget ``T``. The plain loop runs first and
last; its mean is the reference, and both runs are printed, because the machine is shared.

Columns: ``steady images/s``: Ray: images finished after the first batch / (first -> last batch),
from the workers' own timestamps (start-up excluded); plain: images after the first batch / time
after it. ``images/s incl. actor start``: images / (job start -> last result), which includes
actor start and model load for Ray but not ``ray.init``. ``end-to-end s`` includes ``ray.init``
and the merge (plain: model load + loop). A plain loop with 1 thread is also measured, because
ONNX Runtime's spinning intra-op threads lose badly on an oversubscribed machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from defectscope.deploy.inspect import expand_sources, inspect_archive  # noqa: E402
from defectscope.deploy.predictor import load_predictor  # noqa: E402


def plain_loop(model: str, files: list[str], threads: int, batch_size: int) -> dict:
    """One process: load the model, then ``predict`` batch by batch; times in seconds."""
    t0 = time.perf_counter()
    p = load_predictor(model, threads=threads)
    t1 = time.perf_counter()
    n = 0
    first = None
    for i in range(0, len(files), batch_size):
        n += len(p.predict(files[i : i + batch_size], batch_size=batch_size))
        if first is None:
            first = (time.perf_counter(), n)
    t2 = time.perf_counter()
    steady = (n - first[1]) / (t2 - first[0]) if t2 > first[0] and n > first[1] else n / (t2 - t1)
    return {"run": n / (t2 - t1), "steady": steady, "total_s": t2 - t0, "n": n}


def ray_job(model: str, list_file: Path, workers: int, threads: int, batch_size: int, out: Path) -> dict:
    res = inspect_archive(model, [list_file], out, workers=workers, threads=threads, batch_size=batch_size, overwrite=True)
    assert res.rows == res.new and res.errors == 0, (res.rows, res.new, res.errors)
    return {"run": res.images_per_s, "steady": res.steady_images_per_s, "total_s": res.timings["total"], "n": res.new,
            "ray_init": res.timings.get("ray_init", 0.0), "first": res.timings.get("first_result", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help=".onnx file from 'defectscope export'")
    ap.add_argument("--images", default="../shared/datasets/neu-det/images", help="image folder, glob or .txt list")
    ap.add_argument("--limit", type=int, default=None, help="use the first N files")
    ap.add_argument("--threads", type=int, default=2, help="total threads for every arm")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray actor counts to measure")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    files = expand_sources([args.images])[: args.limit]
    for f in files:  # page cache: every arm reads the same warm files
        Path(f).read_bytes()
    con = Console()
    tmp = Path(tempfile.mkdtemp(prefix="inspect_bench_"))
    lst = tmp / "files.txt"
    lst.write_text("".join(f + "\n" for f in files))
    rows = []

    def load() -> str:
        return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())

    la = load()
    r = plain_loop(args.model, files, args.threads, args.batch_size)
    rows.append(("plain loop (run 1)", f"1 process x {args.threads} thread(s)", r, la))
    con.print(f"plain loop x{args.threads}: {r['run']:.1f} img/s  (load {la})")
    if args.threads > 1:
        la = load()
        r = plain_loop(args.model, files, 1, args.batch_size)
        rows.append(("plain loop, 1 thread", "1 process x 1 thread", r, la))
        con.print(f"plain loop x1: {r['run']:.1f} img/s  (load {la})")
    for w in args.workers:
        if args.threads % w:
            con.print(f"[yellow]skip workers={w}: {args.threads} threads do not split evenly[/]")
            continue
        la = load()
        r = ray_job(args.model, lst, w, args.threads // w, args.batch_size, tmp / f"ray{w}.parquet")
        rows.append((f"Ray inspect, {w} worker(s)", f"{w} actor(s) x {args.threads // w} thread(s)", r, la))
        con.print(f"ray w={w}: {r['steady']:.1f} img/s steady (ray.init {r['ray_init']:.1f} s, first block {r['first']:.1f} s)  (load {la})")
    la = load()
    r = plain_loop(args.model, files, args.threads, args.batch_size)
    rows.append(("plain loop (run 2)", f"1 process x {args.threads} thread(s)", r, la))
    same = [r for name, _, r, _ in rows if name.startswith("plain loop (run")]
    ref = sum(r["steady"] for r in same) / len(same)
    best = max(r["steady"] for name, _, r, _ in rows if name.startswith("plain"))

    table = Table(title=f"inspect throughput: {len(files)} images, {Path(args.model).name}, batch {args.batch_size}, "
                        f"{args.threads} threads in total, {os.cpu_count()} CPUs")
    for c in ("arm", "processes x threads", "steady images/s", "x plain (same threads)", "x best plain",
              "images/s incl. actor start", "end-to-end s", "load avg 1/5/15 min"):
        table.add_column(c, justify="left" if c in ("arm", "processes x threads") else "right")
    for name, layout, r, la in rows:
        table.add_row(name, layout, f"{r['steady']:.1f}", f"{r['steady'] / ref:.2f}", f"{r['steady'] / best:.2f}",
                      f"{r['run']:.1f}", f"{r['total_s']:.1f}", la)
    Console(width=220).print(table)
    con.print(f"plain loop with {args.threads} threads (mean of both runs): {ref:.1f} images/s; best plain: {best:.1f} images/s")
    for name, _, r, _ in rows:
        if name.startswith("Ray"):
            fixed = r["total_s"] - r["n"] / r["steady"]
            con.print(f"{name}: fixed start-up + merge ~ {fixed:.1f} s (ray.init {r['ray_init']:.1f} s, first result {r['first']:.1f} s)")
    con.print(
        "Scaling estimate: each Ray worker is a full copy of the pipeline (read, decode, resize, model) with no\n"
        "state shared between images, so W workers on W machines give about W x one worker's images/s, as long as\n"
        "(1) the storage delivers the files (NEU JPEGs are ~17 kB: 1000 images/s is ~17 MB/s per reader) and\n"
        "(2) the driver keeps up: it only receives the result rows (~0.45 kB each in memory, ~0.12 kB in Parquet)\n"
        "and merges the parts at the end (~45 us per row here), i.e. tens of thousands of images/s before the\n"
        "driver is the limit. On this machine (2 shared cores) 2 workers of 1 thread compete for the same cores as\n"
        "1 worker of 2 threads, so no gain is expected; what Ray adds here is a fixed start-up (ray.init, actor start\n"
        "with its torch import, model load: the seconds above) that a large archive amortises, and on a cluster the\n"
        "start-up of each node's workers runs in parallel.")

if __name__ == "__main__":
    main()
