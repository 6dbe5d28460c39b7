"""Lightning's DDP strategy: two CPU processes (gloo) for one short epoch on a tiny real subset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml


def test_two_process_ddp_run(tmp_path, neu_small):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "classification",
        "data": {"root": str(neu_small), "image_size": 64},
        "model": {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": True},
        "train": {"epochs": 1, "batch_size": 8, "strategy": "ddp", "devices": 2, "precision": "32",
                  "val_fraction": 0.25, "logger": ["csv"]},
    }))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "defectscope.cli", "train", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1" in log or "world_size=2" in log.replace(" ", "") or "distributed_backend=gloo" in log
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == 10 and m["epochs_run"] >= 1
    assert (out / "model.ckpt").is_file()
