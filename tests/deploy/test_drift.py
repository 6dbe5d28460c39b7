"""Drift alarm on real features: EfficientNet-Lite0 (ImageNet) pooled features of NEU and KolektorSDD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectscope.deploy.drift import DriftMonitor, DriftReference

SIZE = 112      # px, small to keep the features fast
N_REF = 100     # reference ("training") NEU images
N_HELD = 150    # held-out NEU images
WINDOW = 32
ALPHA = 0.01


@pytest.fixture(scope="module")
def feats(neu_root, ksdd_root) -> dict[str, np.ndarray]:
    """Pooled features [N, 1280] of 100 reference + 150 held-out NEU images (random order, seed 0),
    the held-out ones darkened by 40 %, and 32 KolektorSDD images, all at 112 x 112 px."""
    from defectscope.data.images import load_stack
    from defectscope.models.backbones import create_backbone

    files = sorted((neu_root / "images").glob("*.jpg"))
    order = np.random.default_rng(0).permutation(len(files))[: N_REF + N_HELD]
    neu = load_stack([files[i] for i in order], SIZE)
    ksdd = load_stack(sorted((ksdd_root / "images").glob("*.jpg"))[:32], SIZE)
    bb = create_backbone("efficientnet_lite0", pretrained=True).eval()

    def pooled(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # one thread: the fastest on a shared 2-core machine
            t = torch.from_numpy(x).float() / 255
            return torch.cat([bb(t[i:i + 64]).mean((2, 3)) for i in range(0, len(t), 64)]).numpy()

    held = neu[N_REF:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"ref": pooled(neu[:N_REF]), "held": pooled(held),
                "dark": pooled(np.round(held.astype(np.float32) * 0.6).astype(np.uint8)), "ksdd": pooled(ksdd)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(feats) -> DriftReference:
    return DriftReference.fit(feats["ref"], window=WINDOW, alpha=ALPHA, seed=0)


def _stream(reference: DriftReference, x: np.ndarray, batch: int = 8) -> list[dict]:
    mon = DriftMonitor(reference)
    return [mon.update(x[i:i + batch]) for i in range(0, len(x), batch)]


def _resampled_alarm_rate(reference: DriftReference, x: np.ndarray, n: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    q = reference.project(x)
    return float(np.mean([reference.statistic_projected(q[rng.choice(len(q), WINDOW, replace=False)])
                          > reference.threshold for _ in range(n)]))


def test_reference_is_compact_and_round_trips_through_json(reference, feats):
    d = reference.to_dict()
    assert np.asarray(d["basis"]).shape == (32, 1280) and np.asarray(d["points"]).shape == (N_REF, 32)
    back = DriftReference.from_dict(json.loads(json.dumps(d)))
    w = feats["held"][:WINDOW]
    assert back.statistic(w) == pytest.approx(reference.statistic(w), rel=1e-4, abs=1e-7)
    assert (back.threshold, back.window, back.alpha) == (reference.threshold, WINDOW, ALPHA)
    with pytest.raises(ValueError, match="ckpt: missing field 'points'"):
        DriftReference.from_dict({k: v for k, v in d.items() if k != "points"}, source="ckpt")
    with pytest.raises(ValueError, match="field 'basis' has 1279 columns"):
        DriftReference.from_dict({**d, "basis": np.asarray(d["basis"])[:, 1:]})
    with pytest.raises(ValueError, match=r"expected 1280 features per vector"):
        DriftMonitor(reference).update(np.zeros((3, 10)))
    with pytest.raises(ValueError, match="at least 2 \\* window = 64"):
        DriftReference.fit(feats["ref"][:50], window=WINDOW)


def test_held_out_neu_stream_gives_no_alarm(reference, feats):
    states = _stream(reference, feats["held"])
    assert states[0]["status"] == "filling" and states[0]["statistic"] is None
    assert states[0]["window_fill"] == pytest.approx(8 / WINDOW)
    full = [s for s in states if s["status"] != "filling"]
    assert len(full) == -(-N_HELD // 8) - WINDOW // 8 + 1  # every batch once the window is full
    print(f"held-out stream: max statistic {max(s['statistic'] for s in full):.4f}, threshold {reference.threshold:.4f}")
    assert not any(s["alarm"] for s in full), [round(s["statistic"], 4) for s in full]
    assert states[-1]["n_seen"] == N_HELD and states[-1]["n_alarms"] == 0


def test_false_alarm_rate_on_in_distribution_windows(reference, feats):
    """600 windows resampled from the 150 held-out images: alarm rate <= alpha + 0.02."""
    rate = _resampled_alarm_rate(reference, feats["held"], 600, seed=1)
    print(f"in-distribution false-alarm rate {rate:.4f} (alpha {ALPHA})")
    assert rate <= ALPHA + 0.02


def test_darkened_images_raise_the_alarm(reference, feats):
    states = _stream(reference, feats["dark"])
    first = next(s["n_seen"] for s in states if s["alarm"])
    dark_rate = _resampled_alarm_rate(reference, feats["dark"], 300, seed=2)
    print(f"darkened: first alarm after {first} images, {states[-1]['n_alarms']}/"
          f"{sum(s['status'] != 'filling' for s in states)} stream windows alarm, resampled alarm rate {dark_rate:.3f}")
    assert states[-1]["n_alarms"] >= 3
    # per window, darkening alarms far more often than in-distribution windows
    assert dark_rate > 10 * max(
        _resampled_alarm_rate(reference, feats["held"], 300, seed=2), ALPHA)


def test_kolektor_images_raise_the_alarm_at_the_first_full_window(reference, feats):
    states = _stream(reference, feats["ksdd"])
    first_full = next(s for s in states if s["status"] != "filling")
    assert first_full["alarm"] and first_full["status"] == "drift"
    print(f"kolektor: statistic {first_full['statistic']:.4f} at the first full window")
    assert first_full["statistic"] > 5 * reference.threshold


def test_calibration_holds_on_gaussian_features():
    """Known distribution: fresh windows from the reference's own Gaussian alarm at about alpha,
    a mean shift of 1 sd along the main axis alarms in most windows."""
    rng = np.random.default_rng(0)
    scales = np.linspace(3.0, 0.3, 64)
    ref = DriftReference.fit(rng.normal(size=(400, 64)) * scales, window=WINDOW, alpha=0.05, seed=0)
    fresh = [ref.statistic(rng.normal(size=(WINDOW, 64)) * scales) > ref.threshold for _ in range(600)]
    print(f"gaussian: false-alarm rate {np.mean(fresh):.3f} at alpha 0.05")
    assert np.mean(fresh) <= 0.05 + 0.025
    shift = np.zeros(64)
    shift[0] = scales[0]
    moved = [ref.statistic(rng.normal(size=(WINDOW, 64)) * scales + shift) > ref.threshold for _ in range(200)]
    print(f"gaussian: 1 sd shift alarm rate {np.mean(moved):.3f}")
    assert np.mean(moved) > 0.5
