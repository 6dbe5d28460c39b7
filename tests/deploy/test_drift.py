"""Drift alarm on real features: EfficientNet-Lite0 (ImageNet) pooled features of NEU and KolektorSDD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defectscope.deploy.drift import (DriftAlarm, DriftMonitor, DriftReference, image_statistics, random_windows,
                                     window_scan)

SIZE = 112      # px, small to keep the features fast
N_REF = 100     # reference ("training") NEU images
N_HELD = 150    # held-out NEU images
WINDOW = 32
ALPHA = 0.01


@pytest.fixture(scope="module")
def feats(neu_root, ksdd_root) -> dict[str, np.ndarray]:
    """Pooled features [N, 1280] of 100 reference + 150 held-out NEU images (random order, seed 0),
    the held-out ones darkened by 40 %, and 32 KolektorSDD images, all at 112 x 112 px; ``*_stats``:
    their image statistics [N, 3]."""
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
    dark = np.round(held.astype(np.float32) * 0.6).astype(np.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"ref": pooled(neu[:N_REF]), "held": pooled(held), "dark": pooled(dark), "ksdd": pooled(ksdd),
                "ref_stats": image_statistics(neu[:N_REF]), "held_stats": image_statistics(held),
                "dark_stats": image_statistics(dark), "ksdd_stats": image_statistics(ksdd)}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(feats) -> DriftReference:
    return DriftReference.fit(feats["ref"], window=WINDOW, alpha=ALPHA, seed=0)


def _stream(reference: DriftReference, x: np.ndarray, batch: int = 8) -> list[dict]:
    mon = DriftMonitor(reference)
    return [mon.update(features=x[i:i + batch]) for i in range(0, len(x), batch)]


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
        DriftMonitor(reference).update(features=np.zeros((3, 10)))
    with pytest.raises(ValueError, match="at least 2 \\* window = 64"):
        DriftReference.fit(feats["ref"][:50], window=WINDOW)


def test_held_out_neu_stream_gives_no_alarm(reference, feats):
    states = _stream(reference, feats["held"])
    assert states[0]["status"] == "filling" and states[0]["ratio"] is None
    assert states[0]["window_fill"] == pytest.approx(8 / WINDOW)
    full = [s for s in states if s["status"] != "filling"]
    assert len(full) == -(-N_HELD // 8) - WINDOW // 8 + 1  # every batch once the window is full
    print(f"held-out stream: max statistic / threshold {max(s['ratio'] for s in full):.3f}")
    assert not any(s["alarm"] for s in full), [round(s["ratio"], 3) for s in full]
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
    print(f"kolektor: statistic / threshold {first_full['ratio']:.2f} at the first full window")
    assert first_full["ratio"] > 5 and first_full["channels"]["features"]["statistic"] > 5 * reference.threshold


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


# ---------------------------------------------------------------------------------------------
# the second channel: image statistics, and the Bonferroni-combined alarm


def test_image_statistics_by_hand():
    """A 4 x 6 image, left half black, right half white: mean 0.5, standard deviation 0.5, one
    horizontal step of 1 in 5 horizontal neighbour pairs and no vertical step: gradient (1/5 + 0) / 2."""
    img = np.zeros((1, 3, 4, 6), np.uint8)
    img[..., 3:] = 255
    s = image_statistics(img)
    np.testing.assert_allclose(s, [[0.5, 0.5, 0.1]])
    np.testing.assert_allclose(image_statistics(img.astype(np.float32) / 255), s, atol=1e-7)
    dark = image_statistics(np.round(img * 0.6).astype(np.uint8))
    np.testing.assert_allclose(dark, [[0.3, 0.3, 0.06]], atol=0.002)
    with pytest.raises(ValueError, match=r"expected \[B, C, H >= 2, W >= 2\], got shape \(3, 4, 6\)"):
        image_statistics(img[0])


@pytest.fixture(scope="module")
def alarm(feats) -> DriftAlarm:
    return DriftAlarm.fit(feats["ref"], feats["ref_stats"], window=WINDOW, alpha=ALPHA, seed=0)


def _alarm_stream(alarm: DriftAlarm, f: np.ndarray, s: np.ndarray, batch: int = 8) -> list[dict]:
    mon = DriftMonitor(alarm)
    return [mon.update(features=f[i:i + batch], image_statistics=s[i:i + batch]) for i in range(0, len(f), batch)]


def _alarm_rate(alarm: DriftAlarm, f: np.ndarray, s: np.ndarray, n: int, seed: int) -> float:
    coords = alarm.project({"features": f, "image_statistics": s})
    return random_windows(alarm, coords, n_windows=n, seed=seed)["rate"]


def test_each_channel_is_calibrated_at_half_alpha_and_the_alarm_round_trips(alarm, feats):
    assert set(alarm.channels) == {"features", "image_statistics"}
    assert all(r.alpha == pytest.approx(ALPHA / 2) and r.window == WINDOW for r in alarm.channels.values())
    stats_ref = alarm.channels["image_statistics"]
    assert stats_ref.dim == 3 and stats_ref.scale is not None and (stats_ref.scale > 0).all()
    back = DriftAlarm.from_dict(json.loads(json.dumps(alarm.to_dict())), source="ckpt")
    win = {"features": feats["dark"][:WINDOW], "image_statistics": feats["dark_stats"][:WINDOW]}
    a, b = alarm.statistics(win), back.statistics(win)
    for k in a:
        assert b[k]["statistic"] == pytest.approx(a[k]["statistic"], rel=1e-4, abs=1e-7) and b[k]["alarm"] == a[k]["alarm"]
    # a version-1 reference (features only) still loads, as a one-channel alarm
    old = DriftAlarm.from_dict(alarm.channels["features"].to_dict())
    assert list(old.channels) == ["features"] and old.alpha == pytest.approx(ALPHA / 2)
    with pytest.raises(ValueError, match="ckpt: field 'format'/'version' is 'x'/2"):
        DriftAlarm.from_dict({**alarm.to_dict(), "format": "x"}, source="ckpt")
    with pytest.raises(ValueError, match=r"channel\(s\) \['image_statistics'\] missing"):
        DriftMonitor(alarm).update(features=feats["held"][:2])


def test_darkened_images_raise_the_two_channel_alarm_and_in_distribution_windows_do_not(alarm, feats):
    held = _alarm_stream(alarm, feats["held"], feats["held_stats"])
    assert held[-1]["n_alarms"] == 0, [round(s["ratio"], 3) for s in held if s["ratio"] is not None]
    far = _alarm_rate(alarm, feats["held"], feats["held_stats"], 600, seed=1)
    dark = _alarm_stream(alarm, feats["dark"], feats["dark_stats"])
    full = [s for s in dark if s["status"] != "filling"]
    first = full[0]
    dark_rate = _alarm_rate(alarm, feats["dark"], feats["dark_stats"], 300, seed=2)
    print(f"two channels: false-alarm rate {far:.4f} (alpha {ALPHA}); darkened: first full window ratio "
          f"{first['ratio']:.2f} triggered by {first['triggered_by']}, {dark[-1]['n_alarms']}/{len(full)} windows, "
          f"resampled {dark_rate:.3f}")
    assert far <= ALPHA + 0.02
    assert first["alarm"] and "image_statistics" in first["triggered_by"]
    assert dark[-1]["n_alarms"] == len(full) and dark_rate > 0.95


def test_window_scan_finds_where_the_stream_changes(alarm, feats):
    f = np.concatenate([feats["held"][:3 * WINDOW], feats["dark"][:3 * WINDOW], feats["held"][:5]])
    s = np.concatenate([feats["held_stats"][:3 * WINDOW], feats["dark_stats"][:3 * WINDOW], feats["held_stats"][:5]])
    coords = alarm.project({"features": f, "image_statistics": s})
    assert coords.shape == (len(f), 32 + 3) and coords.dtype == np.float32
    names = [f"img{i:03d}" for i in range(len(f))]
    scan = window_scan(alarm, coords, names)
    assert scan["windows"] == 6 and scan["images_not_tested"] == 5
    assert [bool(w["triggered_by"]) for w in scan["per_window"]] == [False] * 3 + [True] * 3
    assert scan["first_alarm_window"] == 3 and scan["alarms"] == 3
    assert scan["per_window"][3]["first"] == "img096" and scan["per_window"][3]["last"] == "img127"
    # the stored float32 coordinates give the same decisions as the full vectors
    win = slice(3 * WINDOW, 4 * WINDOW)
    full = alarm.statistics({"features": f[win], "image_statistics": s[win]})
    assert scan["per_window"][3]["ratio"] == pytest.approx(max(v["ratio"] for v in full.values()), rel=1e-3)
    with pytest.raises(ValueError, match=r"expected \[B, 35\]"):
        window_scan(alarm, coords[:, :32])


def test_random_windows_answer_for_the_archive_whatever_its_order(alarm, feats):
    """The held-out images sorted by their mean intensity (an archive sorted by something that matters):
    path-order windows alarm, random windows of the same images stay near alpha; darkened images
    alarm in random windows too."""
    order = np.argsort(feats["held_stats"][:, 0])
    coords = alarm.project({"features": feats["held"][order], "image_statistics": feats["held_stats"][order]})
    assert window_scan(alarm, coords)["alarms"] >= 2
    rnd = random_windows(alarm, coords, n_windows=300, seed=3)
    assert rnd["windows"] == 300 and rnd["rate"] <= ALPHA + 0.02, rnd
    dark = alarm.project({"features": feats["dark"], "image_statistics": feats["dark_stats"]})
    assert random_windows(alarm, dark, n_windows=100, seed=3)["rate"] > 0.95
    assert random_windows(alarm, coords[:WINDOW - 1])["windows"] == 0
