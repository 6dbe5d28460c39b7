"""`defectscope data check` on a real NEU folder with injected problems, and annotation checks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.check import check_dataset, find_duplicates, warn_on_leaks

CLASSES = ("crazing", "patches", "scratches")


@pytest.fixture(scope="module")
def dirty(neu_root, tmp_path_factory) -> Path:
    """6 NEU images per class in class folders, then: an exact duplicate across classes, a re-encoded
    (near) duplicate across classes, an empty class folder, a truncated JPEG and a 16-bit PNG."""
    root = tmp_path_factory.mktemp("dirty")
    for c in CLASSES:
        (root / c).mkdir()
        for i in range(1, 7):
            shutil.copy(neu_root / "images" / f"{c}_{i}.jpg", root / c / f"{c}_{i}.jpg")
    shutil.copy(neu_root / "images" / "crazing_1.jpg", root / "patches" / "copied.jpg")
    Image.open(neu_root / "images" / "scratches_2.jpg").save(root / "crazing" / "reencoded.jpg", quality=70)
    (root / "inclusion").mkdir()
    data = (neu_root / "images" / "crazing_7.jpg").read_bytes()
    (root / "crazing" / "broken.jpg").write_bytes(data[: len(data) // 2])
    grey = np.asarray(Image.open(neu_root / "images" / "patches_7.jpg").convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(root / "scratches" / "deep.png")
    assert Image.open(root / "scratches" / "deep.png").mode.startswith("I;16")
    return root


@pytest.fixture(scope="module")
def checked(dirty, tmp_path_factory):
    out = tmp_path_factory.mktemp("check_out")
    return check_dataset(dirty, out), out


def test_each_injected_problem_is_listed(checked, dirty):
    r, out = checked
    saved = json.loads((out / "data_check.json").read_text())
    for key in ("classes", "duplicates", "empty_classes", "unreadable", "converted", "too_small", "imbalance", "warnings"):
        assert key in saved
    assert saved["empty_classes"] == ["inclusion"]
    assert [Path(u["file"]).name for u in saved["unreadable"]] == ["broken.jpg"]
    assert "broken.jpg" in saved["unreadable"][0]["reason"] and "truncated" in saved["unreadable"][0]["reason"]
    conv = saved["converted"]
    assert [Path(c["file"]).name for c in conv] == ["deep.png"] and conv[0]["bits"] == 16
    assert "16-bit" in conv[0]["conversion"]
    groups = {(d["kind"], frozenset(Path(f).name for f in d["files"])) for d in saved["duplicates"]}
    assert ("exact", frozenset({"crazing_1.jpg", "copied.jpg"})) in groups
    assert ("near", frozenset({"scratches_2.jpg", "reencoded.jpg"})) in groups
    assert all(d["cross_class"] for d in saved["duplicates"])
    assert len(saved["duplicates"]) == 2  # no distinct NEU image is taken for a duplicate


def test_per_class_statistics(checked):
    r, _ = checked
    cls = r["classes"]
    assert cls["crazing"]["images"] == 7 and cls["crazing"]["unreadable"] == 1  # 6 + re-encoded; broken
    assert cls["patches"]["images"] == 7 and cls["scratches"]["images"] == 7
    assert cls["inclusion"]["images"] == 0
    assert cls["scratches"]["modes"] == {"RGB": 6, "I;16": 1} and cls["scratches"]["bit_depths"] == {"8": 6, "16": 1}
    assert cls["crazing"]["sizes"] == {"200x200": 7}
    assert r["too_small"] == [] and r["imbalance"]["ratio"] == 1.0


def test_report_and_thumbnails(checked):
    _, out = checked
    html = (out / "report.html").read_text()
    assert "broken.jpg" in html and "copied.jpg" in html and "deep.png" in html
    for c in CLASSES:
        assert (out / "thumbnails" / f"{c}.png").is_file() and f"thumbnails/{c}.png" in html
    sheet = Image.open(out / "thumbnails" / "crazing.png")
    assert sheet.height == 96 and sheet.width > 96 * 6


def test_warn_on_leaks_is_loud(checked):
    r, _ = checked
    lines = warn_on_leaks(r)
    text = "\n".join(lines)
    assert text.count("DUPLICATE ACROSS CLASSES") == 2
    assert "copied.jpg [patches]" in text and "crazing_1.jpg [crazing]" in text
    assert "EMPTY CLASS FOLDER 'inclusion'" in text and "unreadable" in text
    assert all(line in r["warnings"] for line in lines)


def test_clean_folder_has_no_leak_warnings(neu_small_folders):
    r = check_dataset(neu_small_folders)
    assert warn_on_leaks(r) == [] and r["duplicates"] == [] and r["unreadable"] == []


def test_too_small_and_imbalance(neu_root, tmp_path):
    for c, n in (("crazing", 40), ("patches", 3)):
        (tmp_path / c).mkdir()
        for i in range(1, n + 1):
            (tmp_path / c / f"{c}_{i}.jpg").symlink_to(neu_root / "images" / f"{c}_{i}.jpg")
    r = check_dataset(tmp_path)
    assert [t["class"] for t in r["too_small"]] == ["patches"]
    assert r["imbalance"]["ratio"] == pytest.approx(40 / 3, abs=1e-3) and r["imbalance"]["extreme"]
    assert any("extreme class imbalance" in w for w in r["warnings"])


def test_real_neu_duplicates_are_found(neu_root, tmp_path):
    """NEU itself holds an exact duplicate (patches_101 = patches_105) and a re-exposed shifted copy."""
    for name in ("patches_101", "patches_105", "inclusion_88", "inclusion_125", "patches_103", "patches_80"):
        (tmp_path / f"{name}.jpg").symlink_to(neu_root / "images" / f"{name}.jpg")
    r = check_dataset(tmp_path)
    groups = {(d["kind"], frozenset(Path(f).name for f in d["files"])) for d in r["duplicates"]}
    assert groups == {("exact", frozenset({"patches_101.jpg", "patches_105.jpg"})),
                      ("near", frozenset({"inclusion_88.jpg", "inclusion_125.jpg"}))}
    assert not any(d["cross_class"] for d in r["duplicates"])
    assert any("duplicate images within a class" in w for w in warn_on_leaks(r))


def test_find_duplicates_threshold():
    groups = find_duplicates(["a", "b", "c"], ["x", "x", "y"], ["1", "2", "3"], [0b1111, 0b0111, 0xFFFF000000000000], 1)
    assert len(groups) == 1 and groups[0]["files"] == ["a", "b"] and groups[0]["max_distance"] == 1
    assert not groups[0]["cross_class"]


def test_annotation_problems_voc(neu_root, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    for name in ("crazing_1", "patches_1"):
        shutil.copy(neu_root / "images" / f"{name}.jpg", tmp_path / "images")
        shutil.copy(neu_root / "annotations" / f"{name}.xml", tmp_path / "annotations")
    xml = tmp_path / "annotations" / "patches_1.xml"
    text = xml.read_text()
    start = text.index("<xmax>") + len("<xmax>")
    xml.write_text(text[:start] + "250" + text[text.index("</xmax>"):])
    r = check_dataset(tmp_path)
    assert r["task"] == "detection" and len(r["annotations"]) == 1
    assert "patches_1.xml" in r["annotations"][0]["file"] and "outside the image" in r["annotations"][0]["problem"]


def test_annotation_problems_masks(ksdd_root, tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    rows = [("000", "0"), ("001", "1")]  # 001 is good in KolektorSDD: its mask is empty
    for sid, _ in rows:
        (tmp_path / "images" / f"{sid}.jpg").symlink_to(ksdd_root / "images" / f"{sid}.jpg")
        (tmp_path / "masks" / f"{sid}.png").symlink_to(ksdd_root / "masks" / f"{sid}.png")
    with (tmp_path / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "split", "defective"])
        w.writerows([(sid, "train", d) for sid, d in rows])
    r = check_dataset(tmp_path)
    assert r["layout"] == "kolektor"
    assert [Path(a["file"]).name for a in r["annotations"]] == ["001.jpg"]
    assert "empty mask" in r["annotations"][0]["problem"]


def test_cli_data_check(dirty, tmp_path):
    res = CliRunner().invoke(app, ["data", "check", str(dirty), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "crazing" in res.output and "DUPLICATE ACROSS CLASSES" in res.output
    assert (tmp_path / "o" / "data_check.json").is_file()
    res = CliRunner().invoke(app, ["data", "check", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not found" in res.output
