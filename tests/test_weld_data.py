"""Weld data: simulator determinism, reader validation errors, resampling, channel selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from defectscope.data.weld import WeldDataError, read_weld_dataset, resample_series
from defectscope.data.weld.channels import minmax_normalise, minmax_stats, pearson_matrix, select_channels
from defectscope.data.weld.simulate import (
    CONDITIONS,
    WAVELENGTHS_NM,
    simulate_sample,
    simulate_spectra,
    condition_parameters,
    simulate_weld_dataset,
)


def test_wavelength_grid_matches_the_paper():
    assert len(WAVELENGTHS_NM) == 32
    assert WAVELENGTHS_NM[0] == 317 and WAVELENGTHS_NM[2] == 393  # vis_1, vis_3
    assert WAVELENGTHS_NM[16] == 1017 and WAVELENGTHS_NM[26] == 1587  # nir_1, nir_11 (paper: 1590)


def test_simulator_is_deterministic_per_seed(tmp_path):
    a = simulate_weld_dataset(tmp_path / "a", 14, seed=3, image_size=64).parent
    b = simulate_weld_dataset(tmp_path / "b", 14, seed=3, image_size=64).parent
    c = simulate_weld_dataset(tmp_path / "c", 14, seed=4, image_size=64).parent
    da, db, dc = (read_weld_dataset(p, length=100) for p in (a, b, c))
    assert [s.label for s in da.samples] == [s.label for s in db.samples]
    for sa, sb in zip(da.samples, db.samples):
        np.testing.assert_array_equal(sa.image, sb.image)
        np.testing.assert_array_equal(sa.spectra, sb.spectra)
        np.testing.assert_array_equal(sa.mask, sb.mask)
    assert any(not np.array_equal(sa.spectra, sc.spectra) for sa, sc in zip(da.samples, dc.samples))
    assert da.synthetic and sorted({s.label for s in da.samples}) == sorted(CONDITIONS)


def test_simulated_physics_defocus_lowers_nir_and_cold_weld_loses_plume():
    rng = np.random.default_rng(0)
    mean, burst = {}, {}
    nir1, vis3, c2 = 16, 2, 5  # 1017 nm, 393 nm (Al I doublet), 507 nm (C2 Swan 516.5)
    for cond in ("baseline", "defocus", "cold_weld", "oil_treatment"):
        xs = [simulate_spectra(condition_parameters(cond, rng), rng, 600) for _ in range(12)]
        mean[cond] = np.mean([x[:, 50:500].mean(1) for x in xs], axis=0)
        burst[cond] = np.mean([np.percentile(x[c2, 50:500], 99) / np.median(x[c2, 50:500]) for x in xs])
    assert mean["defocus"][nir1] < 0.9 * mean["baseline"][nir1]
    assert mean["cold_weld"][vis3] < 0.2 * mean["baseline"][vis3]
    assert burst["oil_treatment"] > 1.2 * burst["baseline"]  # C2 / soot bursts


def test_defocus_is_subtle_in_the_image():
    widths = {}
    for cond in ("baseline", "defocus", "low_power"):
        w = []
        for i in range(6):
            s = simulate_sample("x", cond, 0, i, 128)
            w.append(s["mask"][:64].sum(0).max())
        widths[cond] = np.mean(w)
    assert abs(widths["defocus"] - widths["baseline"]) < 0.25 * widths["baseline"]
    assert widths["low_power"] < widths["baseline"]


def test_resample_and_crop():
    x = np.vstack([np.linspace(0, 1, 700), np.ones(700)])
    r = resample_series(x, 560)
    assert r.shape == (2, 560) and r[0, 0] == 0 and abs(r[0, -1] - 1) < 1e-6
    c = resample_series(x, 560, "crop")
    np.testing.assert_allclose(c[0], x[0, 70:630])
    with pytest.raises(ValueError):
        resample_series(x[:, :100], 560, "crop")


def _write_folder(root, n_samples=2, channels=3, length=80, wavelengths=None, welds=2, mask=True):
    """A weld folder written by hand (no simulator)."""
    (root / "images").mkdir(parents=True)
    (root / "spectra").mkdir()
    (root / "masks").mkdir()
    samples = []
    rng = np.random.default_rng(0)
    for i in range(n_samples):
        sid = f"c{i}"
        img = np.full((64, 64), 90, np.uint8)
        m = np.zeros((64, 64), np.uint8)
        m[14:18, 8:56] = 255
        m[46:50, 8:56] = 255
        img[m > 0] = 200
        Image.fromarray(img).save(root / "images" / f"{sid}.png")
        entry = {"id": sid, "label": ["good", "bad"][i % 2], "image": f"images/{sid}.png", "welds": []}
        if mask:
            Image.fromarray(m).save(root / "masks" / f"{sid}.png")
            entry["mask"] = f"masks/{sid}.png"
        for k in range(welds):
            np.save(root / "spectra" / f"{sid}_{k}.npy", rng.random((channels, length)).astype(np.float32))
            entry["welds"].append({"spectra": f"spectra/{sid}_{k}.npy"})
        samples.append(entry)
    man = {"format": "defectscope-weld/1", "classes": ["good", "bad"], "welds_per_sample": welds,
           "wavelengths_nm": wavelengths or [400.0, 800.0, 1200.0][:channels], "sample_rate_hz": 5000, "samples": samples}
    (root / "manifest.json").write_text(json.dumps(man))
    return man


def _edit(root, fn):
    man = json.loads((root / "manifest.json").read_text())
    fn(man)
    (root / "manifest.json").write_text(json.dumps(man))


def test_reader_reads_a_hand_written_folder(tmp_path):
    _write_folder(tmp_path)
    ds = read_weld_dataset(tmp_path, length=64)
    assert ds.samples[0].spectra.shape == (2, 3, 64)
    assert ds.samples[0].image.shape == (64, 64, 3) and ds.has_masks
    assert ds.samples[0].raw_lengths == [80, 80] and list(ds.labels) == [0, 1]


@pytest.mark.parametrize("case, field, words", [
    ("nan", "welds[1].spectra", "NaN"),
    ("inf", "welds[0].spectra", "inf"),
    ("channels", "welds[0].spectra", "4 channels but 3 wavelengths"),
    ("short", "welds[0].spectra", "at least 64"),
    ("image", "image", "not found"),
    ("label", "label", "unknown label 'porous'"),
    ("welds", "welds", "has 1 weld(s)"),
])
def test_reader_errors_name_sample_and_field(tmp_path, case, field, words):
    _write_folder(tmp_path)
    sp = tmp_path / "spectra"
    if case == "nan":
        a = np.load(sp / "c1_1.npy"); a[1, 5] = np.nan; np.save(sp / "c1_1.npy", a)
    elif case == "inf":
        a = np.load(sp / "c1_0.npy"); a[0, 2] = np.inf; np.save(sp / "c1_0.npy", a)
    elif case == "channels":
        np.save(sp / "c1_0.npy", np.ones((4, 80), np.float32))
    elif case == "short":
        np.save(sp / "c1_0.npy", np.ones((3, 20), np.float32))
    elif case == "image":
        (tmp_path / "images" / "c1.png").unlink()
    elif case == "label":
        _edit(tmp_path, lambda m: m["samples"][1].update(label="porous"))
    elif case == "welds":
        _edit(tmp_path, lambda m: m["samples"][1].update(welds=m["samples"][1]["welds"][:1]))
    with pytest.raises(WeldDataError) as exc:
        read_weld_dataset(tmp_path, length=64, min_length=64)
    msg = str(exc.value)
    assert "sample 'c1'" in msg and f"field '{field}'" in msg and words in msg


def test_reader_rejects_missing_manifest(tmp_path):
    with pytest.raises(WeldDataError, match="manifest.json"):
        read_weld_dataset(tmp_path)


def test_pearson_selection_picks_one_channel_per_correlated_group():
    rng = np.random.default_rng(0)
    sources = rng.normal(size=(4, 2000))
    # 12 channels: groups {0,1,2}, {3,4,5}, {6,7,8}, {9,10,11} are noisy copies of four sources;
    # channel 1, 4, 7, 10 carry the least noise but any one per group is "least redundant"
    x = np.stack([sources[g] * (1 + 0.1 * j) + rng.normal(0, 0.3, 2000) for g in range(4) for j in range(3)])
    r = pearson_matrix(x[None])
    np.testing.assert_allclose(r, np.corrcoef(x), atol=1e-9)
    sel = select_channels(r, 4, per_band=False)
    assert sorted(i // 3 for i in sel) == [0, 1, 2, 3]
    # per band: 2 VIS + 2 NIR even if all VIS channels were in one group
    wl = [400 + 10 * i for i in range(6)] + [1100 + 50 * i for i in range(6)]
    assert [int(wl[i] >= 1000) for i in select_channels(r, 4, wl, per_band=True)] == [0, 0, 1, 1]


def test_pearson_selection_on_a_constructed_set_picks_the_independent_channels():
    rng = np.random.default_rng(1)
    base = rng.normal(size=3000)
    chans = [base + rng.normal(0, 0.05, 3000) for _ in range(6)]  # 0-5: redundant copies
    chans[2] = rng.normal(size=3000)  # independent
    chans[5] = rng.normal(size=3000)  # independent
    sel = select_channels(pearson_matrix(np.stack(chans)), 2, per_band=False)
    assert sel == [2, 5]


def test_minmax_uses_training_statistics():
    x = np.array([[[[0.0, 10.0], [5.0, 5.0]]]])  # [1, 1, C=2, T=2]
    lo, hi = minmax_stats(x)
    np.testing.assert_allclose(lo, [0, 5]) ; np.testing.assert_allclose(hi, [10, 5])
    y = minmax_normalise(np.array([[[[20.0, 5.0], [5.0, 6.0]]]]), lo, hi)
    np.testing.assert_allclose(y[0, 0, 0], [2.0, 0.5])  # intensity above the training range stays visible
