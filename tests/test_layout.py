"""The layout guesser on each layout (real NEU / KolektorSDD files where possible), and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectscope.data.boxes import ImageBoxes, read_boxes, write_coco, write_voc_xml
from defectscope.data.images import DatasetError, discover_labelled_images
from defectscope.data.layout import guess_layout
from defectscope.data.masks import read_manifest
from defectscope.data.mvtec import mvtec_from_kolektor, read_mvtec
from defectscope.data.rle import RLERecord, read_rle_csv, write_rle_csv


def _copy_neu(neu_root: Path, out: Path, classes=("crazing", "patches", "scratches"), n=3, folders=True) -> Path:
    for c in classes:
        for i in range(1, n + 1):
            src = neu_root / "images" / f"{c}_{i}.jpg"
            dst = out / c / src.name if folders else out / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    return out


def test_class_folders(neu_small_folders):
    g = guess_layout(neu_small_folders)
    assert (g.task, g.layout) == ("classification", "folder")
    assert g.details["class_counts"] == {"crazing": 4, "patches": 4, "scratches": 4}
    assert g.details["image_hw"] == (200, 200)
    items, names, layout = discover_labelled_images(g.details["root"], g.layout)  # the reader agrees
    assert len(items) == 12 and layout == "folder" and names == ["crazing", "patches", "scratches"]


def test_class_folders_with_an_empty_class_folder(neu_root, tmp_path):
    root = _copy_neu(neu_root, tmp_path / "d")
    (root / "inclusion").mkdir()
    g = guess_layout(root)
    assert (g.task, g.layout) == ("classification", "folder")
    assert g.details["empty_classes"] == ["inclusion"]
    assert any("inclusion" in e for e in g.evidence)


def test_neu_prefix_layout(neu_small):
    g = guess_layout(neu_small)
    assert (g.task, g.layout) == ("classification", "prefix")
    assert len(g.details["class_counts"]) == 6 and set(g.details["class_counts"].values()) == {8}
    items, names, _ = discover_labelled_images(g.details["root"], g.layout)
    assert len(items) == 48 and len(names) == 6


def test_neu_det_is_detection_with_classification_as_the_alternative(neu_root):
    """The documented NEU-DET rule: VOC boxes win over the class prefixes; --task classification reads the prefixes."""
    g = guess_layout(neu_root)
    assert (g.task, g.layout) == ("detection", "voc")
    assert "classification" in g.details["alternatives"][0]
    g2 = guess_layout(neu_root, task="classification")
    assert (g2.task, g2.layout) == ("classification", "prefix")
    assert g2.details["n_images"] == 1800


def test_voc_folder_is_readable(neu_root, tmp_path):
    root = tmp_path / "voc"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for name in ("img_a", "img_b"):  # no class prefix: plainly detection
        shutil.copy(neu_root / "images" / "patches_1.jpg", root / "images" / f"{name}.jpg")
        shutil.copy(neu_root / "annotations" / "patches_1.xml", root / "annotations" / f"{name}.xml")
    g = guess_layout(root)
    assert (g.task, g.layout) == ("detection", "voc") and "alternatives" not in g.details
    recs, names = read_boxes(g.details["root"])
    assert len(recs) == 2 and names == ["patches"]


def test_coco_json_folder_and_file(neu_root, tmp_path):
    root = tmp_path / "coco"
    (root / "images").mkdir(parents=True)
    shutil.copy(neu_root / "images" / "inclusion_1.jpg", root / "images" / "a.jpg")
    rec = ImageBoxes(root / "images" / "a.jpg", 200, 200, np.array([[10.0, 20.0, 50.0, 60.0]]), ["inclusion"])
    write_coco(root / "train.json", [rec], ["inclusion"], relative_to=root)
    for target in (root, root / "train.json"):
        g = guess_layout(target)
        assert (g.task, g.layout) == ("detection", "coco")
        assert g.details["class_counts"] == {"inclusion": 1}
    recs, _ = read_boxes(guess_layout(root).details["root"])
    assert len(recs) == 1 and recs[0].boxes.shape == (1, 4)


def test_kolektor_manifest_layout(ksdd_root):
    g = guess_layout(ksdd_root)
    assert (g.task, g.layout) == ("segmentation", "kolektor")
    assert g.details["class_counts"] == {"good": 347, "defective": 52}
    assert len(read_manifest(g.details["root"])) == 399


def test_images_and_masks_without_manifest(ksdd_root, tmp_path):
    root = tmp_path / "seg"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for sid in ("000", "005", "010"):
        (root / "images" / f"{sid}.jpg").symlink_to(ksdd_root / "images" / f"{sid}.jpg")
        (root / "masks" / f"{sid}.png").symlink_to(ksdd_root / "masks" / f"{sid}.png")
    g = guess_layout(root)
    assert (g.task, g.layout) == ("segmentation", "images_masks")
    assert g.details["n_images"] == 3 and g.details["unpaired"] == []


def test_rle_csv(neu_root, tmp_path):
    root = tmp_path / "sev"
    (root / "train_images").mkdir(parents=True)
    shutil.copy(neu_root / "images" / "scratches_1.jpg", root / "train_images" / "a.jpg")
    write_rle_csv(root / "train.csv", [RLERecord("a.jpg", 1, "1 10 300 5"), RLERecord("a.jpg", 2, "")])
    g = guess_layout(root)
    assert (g.task, g.layout) == ("segmentation", "rle_csv")
    assert g.details["n_images"] == 1 and g.details["class_counts"] == {"class_1": 1}
    assert len(read_rle_csv(g.details["csv"], (200, 200))) == 2


def test_mvtec_layout_from_kolektor(ksdd_root, tmp_path):
    root = mvtec_from_kolektor(ksdd_root, tmp_path / "mv", n_train_good=6, n_test_good=3, n_defect=4)
    g = guess_layout(root)
    assert (g.task, g.layout) == ("anomaly", "mvtec")
    assert g.details["defect_types"] == ["defect"] and g.details["masks_for"] == ["defect"]
    assert g.details["class_counts"] == {"train/good": 6, "test/good": 3, "defect": 4}  # fitting vs test normals apart
    assert len(read_mvtec(g.details["root"])) == 13


def test_several_mvtec_categories_name_them(ksdd_root, tmp_path):
    mvtec_from_kolektor(ksdd_root, tmp_path / "all" / "commutator", 2, 1, 1)
    mvtec_from_kolektor(ksdd_root, tmp_path / "all" / "other", 2, 1, 1)
    with pytest.raises(DatasetError, match=r"2 MVTec AD categories \(commutator, other\)"):
        guess_layout(tmp_path / "all")


def test_weld_manifest(tmp_path):
    from defectscope.data.weld.simulate import simulate_weld_dataset

    root = tmp_path / "weld"
    simulate_weld_dataset(root, n_samples=14, seed=0, image_size=64)
    g = guess_layout(root)
    assert (g.task, g.layout) == ("weld", "weld")
    assert g.details["n_images"] == 14 and sum(g.details["class_counts"].values()) == 14


def test_voc_and_class_folders_is_ambiguous_and_lists_both(neu_root, tmp_path):
    root = _copy_neu(neu_root, tmp_path / "amb")
    (root / "images").mkdir()
    (root / "annotations").mkdir()
    shutil.copy(neu_root / "images" / "crazing_1.jpg", root / "images" / "x.jpg")
    shutil.copy(neu_root / "annotations" / "crazing_1.xml", root / "annotations" / "x.xml")
    with pytest.raises(DatasetError) as exc:
        guess_layout(root)
    msg = str(exc.value)
    assert "ambiguous" in msg and "detection (voc)" in msg and "classification (folder)" in msg
    assert "crazing" in msg and "--task" in msg
    assert guess_layout(root, task="classification").layout == "folder"  # --task settles it


def test_xml_beside_images_in_class_folders_is_ambiguous(neu_root, tmp_path):
    root = _copy_neu(neu_root, tmp_path / "amb2")
    shutil.copy(neu_root / "annotations" / "crazing_1.xml", root / "crazing" / "crazing_1.xml")
    with pytest.raises(DatasetError, match=r"class folders .* also hold 1 \.xml"):
        guess_layout(root)


def test_nothing_recognisable_lists_what_is_there(tmp_path):
    root = tmp_path / "junk"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "readme.txt").write_text("x")
    (root / "notes.txt").write_text("x")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "single.png")  # no class prefix
    with pytest.raises(DatasetError) as exc:
        guess_layout(root)
    msg = str(exc.value)
    assert "no known data layout" in msg and "docs/ (1 entries)" in msg and ".txt" in msg and ".png" in msg


def test_missing_folder_and_wrong_task(tmp_path, neu_small_folders):
    with pytest.raises(DatasetError, match="not found"):
        guess_layout(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"no segmentation layout found .*classification \(folder\)"):
        guess_layout(neu_small_folders, task="segmentation")
    with pytest.raises(DatasetError, match="unknown"):
        guess_layout(neu_small_folders, task="regression")


def test_json_file_that_is_not_coco(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": 1}))
    with pytest.raises(DatasetError, match="not a COCO json"):
        guess_layout(p)
