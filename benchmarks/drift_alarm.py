"""The service's drift alarm on real streams: in-distribution, darkened, another product.

    python benchmarks/drift_alarm.py RUN [--onnx] [--images 200] [--windows 500]

RUN is a classification run with a stored drift reference (NEU, e.g. configs/neu_baseline.yaml).
Through the service (FastAPI test client, ``POST /v1/predict``, then ``GET /v1/drift``), one
fresh service per stream:

1. the run's held-out NEU test images (``RUN/split/test.txt``), ``--images`` of them;
2. the same images darkened by 40 % (pixel values x 0.6);
3. KolektorSDD images (another product, ``../shared/datasets/kolektorsdd/images``).

Printed per stream: alarms raised, the first image at which the alarm fired, the largest MMD²
against the threshold per channel (pooled features; image statistics) and which channel fired.
Then the false-alarm rate: ``--windows`` windows of ``window`` images drawn at random (seeded) from
the held-out test images (both channels), each tested once; the share that alarms (in any channel)
is compared with the configured rate ``alpha`` per window.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from defectscope.deploy.drift import random_windows
from defectscope.deploy.predictor import load_predictor
from defectscope.deploy.service import create_app

KSDD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "kolektorsdd" / "images"


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def stream(predictor, images: list[np.ndarray]) -> dict:
    client = TestClient(create_app(predictor))
    first, alarms, peak, fired = None, 0, {}, set()
    for i, img in enumerate(images):
        r = client.post("/v1/predict", files={"file": (f"{i}.png", _png(img), "image/png")})
        r.raise_for_status()
        d = r.json()["drift"]
        for k, c in d["channels"].items():
            peak[k] = max(peak.get(k, float("-inf")), c["ratio"])
        if d["alarm"]:
            alarms += 1
            fired.update(d["triggered_by"])
            first = i + 1 if first is None else first
    state = client.get("/v1/drift").json()
    return {"images": len(images), "alarms": alarms, "first_alarm_at_image": first,
            "max_statistic_over_threshold": {k: round(v, 3) for k, v in peak.items()}, "triggered_by": sorted(fired),
            "window": state["window"], "alpha": state["alpha"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--onnx", type=Path, help="serve this exported .onnx of RUN instead of the PyTorch run")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--windows", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    predictor = load_predictor(args.onnx or args.run)
    files = [line.rsplit(",", 1)[0] for line in (args.run / "split" / "test.txt").read_text().splitlines() if line]
    rng = np.random.default_rng(args.seed)
    pick = [files[i] for i in rng.permutation(len(files))[: args.images]]
    neu = [np.asarray(Image.open(f).convert("RGB")) for f in pick]
    dark = [(im.astype(np.float32) * 0.6).astype(np.uint8) for im in neu]
    ksdd = [np.asarray(Image.open(f).convert("RGB")) for f in sorted(KSDD.glob("*.jpg"))[:64]]
    rows = {"neu_test": stream(predictor, neu), "neu_test_darkened_40": stream(predictor, dark),
            "kolektorsdd": stream(predictor, ksdd)}
    ref = predictor.drift_alarm()
    answers = predictor.answers([np.asarray(Image.open(f).convert("RGB")) for f in files], with_features=True)
    coords = ref.project({"features": np.stack([a["features"] for a in answers]),
                          "image_statistics": np.stack([a["image_statistics"] for a in answers])})
    w = ref.window
    far = random_windows(ref, coords, n_windows=args.windows, seed=args.seed)["rate"]
    out = {"run": str(args.run), "backend": predictor.backend, "streams": rows,
           "false_alarm_rate": {"windows": args.windows, "window": w, "held_out_images": len(files),
                                "rate": far, "alpha": ref.alpha},
           "load_average_1min": os.getloadavg()[0]}
    print(json.dumps(out, indent=2))
    print("| stream | images | alarms | first alarm at image | max MMD² / threshold: features | image statistics | fired |\n"
          "|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        m = r["max_statistic_over_threshold"]
        print(f"| {k} | {r['images']} | {r['alarms']} | {r['first_alarm_at_image']} | {m.get('features')} | "
              f"{m.get('image_statistics')} | {', '.join(r['triggered_by']) or '-'} |")
    print(f"false-alarm rate on {args.windows} random windows of {w} held-out images: {far:.4f} (configured alpha {ref.alpha})")


if __name__ == "__main__":
    main()
