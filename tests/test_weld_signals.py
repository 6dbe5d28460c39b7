"""Weld format v2 and the recordings importer: a messy CSV + photo + FLAC set written by the tests,
imported with a spec; the errors for bad input; v1 folders; the simulator's v2 output."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.weld import WeldDataError, read_weld_dataset
from defectscope.data.weld.channels import (
    group_quotas,
    groups_from_wavelengths,
    pearson_matrix,
    select_channels,
    select_channels_by_group,
)
from defectscope.data.weld.format import resample_series, write_weld_dataset
from defectscope.data.weld.importer import RecordingError, SpecError, import_recordings, load_spec
from defectscope.data.weld.simulate import WAVELENGTHS_NM, simulate_sample, simulate_weld_dataset
from weld_fixtures import HEADER, write_messy_recordings, write_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """20 messy runs imported once: (recordings, import result, dataset read at T=560)."""
    root = tmp_path_factory.mktemp("messy")
    rec = write_messy_recordings(root, n_runs=20, seed=0)
    res = import_recordings(rec.spec_path, root / "welds")
    return rec, res, read_weld_dataset(root / "welds", length=560)


def test_import_reads_the_messy_layout_into_a_v2_folder(imported):
    rec, res, ds = imported
    assert ds.format_version == 2 and ds.synthetic
    assert [s.id for s in ds.samples] == rec.run_ids
    assert [s.label for s in ds.samples] == rec.labels and ds.classes == ["ok", "porosity"]
    assert res.class_counts == {"ok": 10, "porosity": 10}
    assert ds.groups == rec.groups and ds.group_field == "batch" and ds.has_groups
    assert ds.metadata[0]["material"] == "AlMg3" and ds.metadata[0]["date"] == rec.run_ids[0][:8]
    assert ds.channel_names == ["current", "voltage", "wire_feed", "gas_flow", "photodiode", "audio_rms",
                                "audio_50_400hz", "audio_400_1500hz", "audio_1500_3500hz"]
    assert ds.channel_units[:5] == ["A", "V", "m/s", "l/min", "V"]
    assert ds.channel_groups == ["electrical", "electrical", "wire", "gas", "optical"] + ["acoustic"] * 4
    assert ds.wavelengths_nm is None and ds.channel_labels[0] == "current (A)"
    for s, n_weld in zip(ds.samples, rec.weld_rows):
        assert s.spectra.shape == (1, 9, 560)
        assert s.raw_lengths == [n_weld]  # the idle rows before and after the weld are cut away
        assert 2 <= len(s.views) <= 3 and s.view_names[0] == "coupon_top" and s.views[0] is s.image
        assert s.views[0].shape == (96, 128, 3) and s.mask is None
    man = json.loads(res.manifest.read_text())
    assert man["min_length"] == 30 and man["resampling"]["function"] == "numpy.interp"
    assert man["import"]["spec"]["csv"]["decimal"] == ","


def test_imported_series_keep_irregular_time_and_are_resampled_by_time(imported):
    rec, _, ds = imported
    root = ds.root
    entry = json.loads((root / "manifest.json").read_text())["samples"][3]
    raw = np.load(root / entry["welds"][0]["signals"])
    t = np.load(root / entry["welds"][0]["time_s"])
    steps = np.diff(t)
    assert t[0] == 0 and (steps > 0).all() and steps.min() >= 0.11 and steps.max() <= 0.33 and steps.std() > 0.03
    assert raw[0].min() > 20  # window: current above 20 A only
    assert 140 < raw[0].mean() < 160 and 21 < raw[1].mean() < 23  # decimal commas read as decimals
    assert 7.0 / 60 < raw[2].mean() < 9.0 / 60  # wire counter differenced to a rate (m/s)
    grid = np.linspace(t[0], t[-1], 560)
    np.testing.assert_allclose(ds.samples[3].spectra[0], np.stack([np.interp(grid, t, r) for r in raw.astype(np.float64)]),
                               rtol=1e-6, atol=1e-5)
    assert ds.samples[3].durations_s[0] == pytest.approx(t[-1])


def test_fixture_classes_are_separable_in_each_modality(imported):
    from scipy.ndimage import median_filter
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, _, ds = imported
    y = ds.labels
    x = np.stack([s.spectra[0] for s in ds.samples])
    acoustic = np.array([g == "acoustic" for g in ds.channel_groups])

    def loo(f):
        return cross_val_score(make_pipeline(StandardScaler(), LogisticRegression()), f, y, cv=LeaveOneOut()).mean()

    for idx in (~acoustic, acoustic):
        assert loo(np.concatenate([x[:, idx].mean(2), x[:, idx].std(2)], 1)) >= 0.9
    dark = [[float(((s.image.mean(2) - median_filter(s.image.mean(2), 9)) < -40).sum())] for s in ds.samples]
    assert loo(np.array(dark)) >= 0.9  # pores on the bead


def test_cli_signals_import(tmp_path):
    rec = write_messy_recordings(tmp_path / "rec", n_runs=4, seed=1)
    res = runner.invoke(app, ["signals", "import", str(rec.spec_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "imported 4 runs" in res.output and "gas_flow" in res.output
    assert read_weld_dataset(tmp_path / "out").format_version == 2
    res = runner.invoke(app, ["signals", "import", str(rec.spec_path), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "not an empty folder" in res.output


# ----------------------------------------------------------------------------------- bad input


def _data_lines(path):
    return path.read_text(encoding="utf-8-sig").splitlines()


def _put(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")


def _first_weld_line(lines):
    """1-based line number of the first row with current above 20 A."""
    return next(i + 1 for i, ln in enumerate(lines) if i and float(ln.split(";")[2].replace(",", ".")) > 20)


@pytest.mark.parametrize("case", ["non_numeric", "backwards", "no_label", "bad_audio", "short", "counter", "header"])
def test_bad_recordings_name_file_line_and_column(tmp_path, case):
    rec = write_messy_recordings(tmp_path, n_runs=4, seed=2)
    run = rec.run_dir(1)
    csv_path = run / rec.csv_name
    lines = _data_lines(csv_path)
    w = _first_weld_line(lines)
    if case == "non_numeric":
        f = lines[w + 4].split(";"); f[3] = "n/a"; lines[w + 4] = ";".join(f)
        _put(csv_path, lines)
        words = [csv_path.name, f"line {w + 5}", "column 'Voltage [V]'", "'n/a' is not a number"]
    elif case == "backwards":
        a, b = lines[w + 2].split(";"), lines[w + 3].split(";")
        a[1], b[1] = b[1], a[1]
        lines[w + 2], lines[w + 3] = ";".join(a), ";".join(b)
        _put(csv_path, lines)
        words = [csv_path.name, f"line {w + 4}", "column 'Date + Time'", "time goes backwards"]
    elif case == "no_label":
        new = run.with_name(run.name.rsplit("_", 1)[0])
        run.rename(new)
        words = [new.name, "has no label", "label.regex"]
    elif case == "bad_audio":
        (run / rec.audio_name).write_bytes(b"fLaC this is not audio at all" * 10)
        words = [str(run / rec.audio_name), "cannot decode the audio"]
    elif case == "short":
        _put(csv_path, lines[: w - 1 + 12])
        words = [csv_path.name, "shorter than the minimum", "12 row(s)", "min_rows", "at least 30"]
    elif case == "counter":
        f = lines[w + 6].split(";"); f[4] = "100,000"; lines[w + 6] = ";".join(f)
        _put(csv_path, lines)
        words = [csv_path.name, f"line {w + 7}", "column 'Wire total [m]'", "counter decreases"]
    else:
        spec = dict(rec.spec)
        spec["channels"] = [dict(c) for c in spec["channels"]]
        spec["channels"][0]["column"] = "Current [mA]"
        write_spec(rec.spec_path, spec)
        words = [rec.csv_name, "line 1", "no column 'Current [mA]'", "channels.0.column"]
    with pytest.raises(RecordingError) as exc:
        import_recordings(rec.spec_path, tmp_path / "out")
    for word in words:
        assert word in str(exc.value), (word, str(exc.value))
    assert not (tmp_path / "out").exists()  # nothing written before every run was checked


def test_messy_csv_details_are_handled(tmp_path):
    """Header longer than the rows, trailing spaces, BOM, decimal commas, blank lines, repeated time stamps."""
    rec = write_messy_recordings(tmp_path, n_runs=2, seed=3)
    csv_path = rec.run_dir(0) / rec.csv_name
    lines = _data_lines(csv_path)
    assert len(lines[0].split(";")) == len(HEADER) and len(lines[1].split(";")) == len(HEADER) - 2
    w = _first_weld_line(lines)
    first = float(lines[w + 2].split(";")[2].replace(",", "."))  # the current of the 4th weld row
    dup = lines[w + 2].split(";")
    dup[2] = "300,00"  # a second row with the same time stamp: averaged with the first
    lines.insert(w + 3, ";".join(dup))
    lines.insert(2, "")  # a blank line
    _put(csv_path, lines)
    ds = read_weld_dataset(import_recordings(rec.spec_path, tmp_path / "out").manifest.parent, length=560)
    raw = np.load(ds.root / f"signals/{ds.samples[0].id}_w1.npy")
    assert ds.samples[0].raw_lengths == [rec.weld_rows[0]]
    assert raw[0, 3] == pytest.approx((first + 300.0) / 2, rel=1e-5)


@pytest.mark.parametrize("edit, key", [
    (lambda s: s.update(chanels=s.pop("channels")), "key 'chanels': unknown key"),
    (lambda s: s["channels"][1].pop("unit"), "key 'channels.1.unit'"),
    (lambda s: s["time"].update(unit="s"), "key 'time'"),
    (lambda s: s["window"].update(channel="Current [A]"), "key 'window.channel'"),
    (lambda s: s["label"].update(regex=r"_(?P<cls>[a-z]+)$"), "key 'label.regex'"),
    (lambda s: s["csv"].update(delimiter=","), "key 'csv'"),
    (lambda s: s["audio"].update(bands_hz=[[500, 100]]), "key 'audio.bands_hz'"),
])
def test_spec_errors_name_the_key(tmp_path, edit, key):
    from weld_fixtures import messy_spec

    spec = json.loads(json.dumps(messy_spec()))
    edit(spec)
    path = write_spec(tmp_path / "bad.yaml", spec)
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert str(path) in str(exc.value) and key in str(exc.value), str(exc.value)


def test_spec_without_matching_runs(tmp_path):
    from weld_fixtures import messy_spec

    path = write_spec(tmp_path / "s.yaml", messy_spec())
    with pytest.raises(SpecError, match="key 'runs': no folder matches"):
        import_recordings(path, tmp_path / "out")


def test_labels_csv_and_group_column(tmp_path):
    rec = write_messy_recordings(tmp_path, n_runs=4, seed=4)
    rows = ["run;class;part;operator"] + [f"{r};{lab};P{i % 2};op{i}" for i, (r, lab) in enumerate(zip(rec.run_ids, rec.labels))]
    (tmp_path / "labels.csv").write_text("\n".join(rows[:-1]) + "\n")  # the last run is missing
    spec = json.loads(json.dumps(rec.spec))
    spec["label"] = {"csv": "labels.csv", "id_column": "run", "label_column": "class", "metadata_columns": ["operator"]}
    spec["group"] = {"name": "part", "column": "part"}
    spec["runs"] = str(rec.runs_dir / "*")  # an absolute glob
    write_spec(rec.spec_path, spec)
    with pytest.raises(RecordingError, match=f"run '{rec.run_ids[-1]}' has no label in labels.csv"):
        import_recordings(rec.spec_path, tmp_path / "out")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = read_weld_dataset(import_recordings(rec.spec_path, tmp_path / "out").manifest.parent)
    assert [s.label for s in ds.samples] == rec.labels and ds.groups == ["P0", "P1", "P0", "P1"]
    assert ds.group_field == "part" and ds.metadata[2]["operator"] == "op2"


# ------------------------------------------------------------------------------- format v1 / v2


def _tiny_samples(n=3, channels=3, length=80, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(0, 255, (32, 48), dtype=np.uint8)
        mask = np.zeros((32, 48), np.uint8); mask[10:14, 4:40] = 1
        out.append({"id": f"c{i}", "label": ["good", "bad"][i % 2], "image": img, "mask": mask,
                    "spectra": [rng.random((channels, length)).astype(np.float32) for _ in range(2)]})
    return out


def test_v1_folders_still_read(tmp_path):
    samples = _tiny_samples()
    write_weld_dataset(tmp_path, samples, ["good", "bad"], [400.0, 800.0, 1200.0], 5000.0, 2, version=1)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["format"] == "defectscope-weld/1" and "channels" not in man
    ds = read_weld_dataset(tmp_path, length=64)
    assert ds.format_version == 1 and ds.wavelengths_nm == [400.0, 800.0, 1200.0] and ds.sample_rate_hz == 5000.0
    assert ds.channel_groups == ["VIS", "VIS", "NIR"] and ds.channel_names == ["400 nm", "800 nm", "1200 nm"]
    assert ds.groups == [None] * 3 and ds.metadata == [{}] * 3 and not ds.has_groups
    s = ds.samples[1]
    assert s.views[0] is s.image and s.view_names == ["image"] and s.view_masks[0] is s.mask and s.mask.sum() == 4 * 36
    np.testing.assert_array_equal(s.spectra[1], resample_series(samples[1]["spectra"][1], 64))
    assert s.durations_s[0] == pytest.approx(79 / 5000)


def test_v2_reader_resamples_irregular_series_by_time_and_validates_time(tmp_path):
    rng = np.random.default_rng(0)
    t = np.cumsum(rng.uniform(0.05, 0.5, 100))
    series = np.stack([2.0 * t, np.sin(t)])  # channel 0 is linear in time
    img = np.zeros((20, 30, 3), np.uint8)
    write_weld_dataset(tmp_path, [{"id": "a", "label": "x", "images": [img, img[:10]], "view_names": ["top", "side"],
                                   "signals": [series], "times_s": [t], "metadata": {"material": "Cu"}, "group": 7}],
                       ["x"], welds_per_sample=1,
                       channels=[{"name": "ramp", "unit": "V"}, {"name": "sine", "unit": "", "group": "optical"}])
    ds = read_weld_dataset(tmp_path, length=50)
    x = ds.samples[0].spectra[0]
    np.testing.assert_allclose(x[0], 2.0 * np.linspace(t[0], t[-1], 50), rtol=1e-5)
    assert not np.allclose(resample_series(series, 50)[0], x[0], rtol=1e-3)  # index-based would be wrong here
    assert ds.channel_groups == ["other", "optical"] and ds.sample_rate_hz is None
    assert ds.samples[0].group == "7" and ds.samples[0].metadata == {"material": "Cu"}
    assert ds.samples[0].view_names == ["top", "side"] and ds.samples[0].views[1].shape == (10, 30, 3)
    assert ds.resampling["function"] == "numpy.interp" and ds.resampling["length"] == 50
    bad = t.copy(); bad[40] = bad[38]
    np.save(tmp_path / "signals" / "a_w1_time.npy", bad)
    with pytest.raises(WeldDataError, match=r"sample 'a', field 'welds\[0\].time_s': time stamps must increase strictly: step 40"):
        read_weld_dataset(tmp_path, length=50)


@pytest.mark.parametrize("channels, words", [
    ([{"name": "a", "unit": "V"}, {"name": "a", "unit": "V"}], "field 'channels[1].name': duplicate channel name 'a'"),
    ([{"name": "a"}, {"name": "b", "unit": "V"}], "field 'channels[0].unit': a string is required"),
    ([{"name": "a", "unit": "V", "wavelenght_nm": 3}, {"name": "b", "unit": "V"}], "unknown key(s) ['wavelenght_nm']"),
])
def test_v2_channel_errors(tmp_path, channels, words):
    write_weld_dataset(tmp_path, [{"id": "a", "label": "x", "image": np.zeros((8, 8), np.uint8),
                                   "signals": [np.zeros((2, 70))]}], ["x"], sample_rate_hz=100.0, welds_per_sample=1,
                       channels=[{"name": "a", "unit": "V"}, {"name": "b", "unit": "V"}])
    man = json.loads((tmp_path / "manifest.json").read_text())
    man["channels"] = channels
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(WeldDataError) as exc:
        read_weld_dataset(tmp_path, length=64)
    assert words in str(exc.value)


def test_simulator_writes_v2_with_the_same_data(tmp_path):
    manifest = simulate_weld_dataset(tmp_path / "v2", 7, seed=5, image_size=64)
    man = json.loads(manifest.read_text())
    assert man["format"] == "defectscope-weld/2"
    assert man["channels"][0] == {"name": "VIS 317", "unit": "counts", "wavelength_nm": 317.0, "group": "VIS"}
    assert man["channels"][16]["name"] == "NIR 1017" and len(man["channels"]) == 32
    ds2 = read_weld_dataset(tmp_path / "v2", length=560)
    assert ds2.wavelengths_nm == WAVELENGTHS_NM.tolist() and ds2.channel_groups == ["VIS"] * 16 + ["NIR"] * 16
    # the same samples, simulated again and written in the old layout, read back identically
    samples = [simulate_sample(s.id, s.label, 5, i, 64) for i, s in enumerate(ds2.samples)]
    for s, entry in zip(samples, man["samples"]):
        for k in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / "v2" / entry["welds"][k]["signals"]), s["spectra"][k])
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "v2" / entry["images"][0]["path"])), s["image"])
    write_weld_dataset(tmp_path / "v1", samples, man["classes"], WAVELENGTHS_NM.tolist(), 10_000.0, 2, version=1)
    ds1 = read_weld_dataset(tmp_path / "v1", length=560)
    assert ds1.wavelengths_nm == ds2.wavelengths_nm and ds1.channel_groups == ds2.channel_groups
    for a, b in zip(ds1.samples, ds2.samples):
        np.testing.assert_array_equal(a.spectra, b.spectra)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        assert a.raw_lengths == b.raw_lengths and a.sample_rates_hz == b.sample_rates_hz


# ------------------------------------------------------------------------------ channel selection


def test_group_selection_equals_the_vis_nir_split_on_spectrometer_data():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_vis, n_nir = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        wl = list(rng.uniform(300, 990, n_vis)) + list(rng.uniform(1010, 1900, n_nir))
        order = rng.permutation(n_vis + n_nir)
        wl = [wl[i] for i in order]
        corr = pearson_matrix(rng.normal(size=(n_vis + n_nir, 50)) + rng.normal(size=50) * rng.uniform(0, 2))
        for k in range(1, n_vis + n_nir + 1):
            assert select_channels_by_group(corr, k, groups_from_wavelengths(wl)) == select_channels(corr, k, wl, per_band=True)


def test_group_selection_balances_process_signal_groups():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(4, 2000))
    # 4 groups of 3 channels; within a group the channels are noisy copies of one source, group 0 has 6
    x = np.stack([src[g] + rng.normal(0, 0.3, 2000) for g in (0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3)])
    groups = ["electrical"] * 6 + ["gas"] * 3 + ["optical"] * 3 + ["acoustic"] * 3
    corr = pearson_matrix(x)
    sel = select_channels_by_group(corr, 4, groups)
    assert sorted(groups[i] for i in sel) == sorted(["electrical", "gas", "optical", "acoustic"])
    assert len(select_channels_by_group(corr, 3, groups)) == 3  # fewer than the groups: global selection
    assert group_quotas([2, 10], 5) == [2, 3] and group_quotas([1, 1, 5], 4) == [1, 1, 2] and group_quotas([3, 3, 3], 7) == [2, 2, 3]
    with pytest.raises(ValueError, match="groups: 3 labels for 15 channels"):
        select_channels_by_group(corr, 4, groups[:3])
