"""Box annotations: VOC and COCO readers/writers on real NEU-DET files, and every malformed case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from defectscope.data.boxes import (
    BoxFormatError,
    ImageBoxes,
    image_class,
    read_boxes,
    read_coco,
    read_voc_folder,
    read_voc_xml,
    write_coco,
    write_voc_xml,
)
from defectscope.data.images import DatasetError
from defectscope.engine.detection import load_record_images

NAMES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]
STEMS = ["crazing_1", "inclusion_2", "patches_155", "pitted_surface_279", "rolled-in_scale_3", "scratches_228"]


@pytest.fixture()
def voc_subset(tmp_path, neu_root) -> Path:
    """A real VOC subset (6 images, one per class, two of them with mixed classes), copied."""
    root = tmp_path / "voc"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for s in STEMS:
        shutil.copy(neu_root / "images" / f"{s}.jpg", root / "images")
        shutil.copy(neu_root / "annotations" / f"{s}.xml", root / "annotations")
    return root


def xml(objects: str, width: str = "200", height: str = "200") -> str:
    return (f"<annotation><filename>a.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def obj(name="crazing", xmin="10", ymin="20", xmax="50", ymax="60") -> str:
    return (f"<object><name>{name}</name><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
            f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def test_voc_reads_a_real_neu_annotation(neu_root):
    r = read_voc_xml(neu_root / "annotations" / "crazing_1.xml", neu_root / "images" / "crazing_1.jpg", NAMES)
    assert (r.width, r.height) == (200, 200)
    np.testing.assert_array_equal(r.boxes, [[2, 2, 193, 194]])
    assert r.labels == ["crazing"]
    np.testing.assert_allclose(r.normalised(), [[0.01, 0.01, 0.965, 0.97]])


def test_voc_folder_to_coco_and_back_is_lossless(voc_subset, tmp_path):
    records, names = read_boxes(voc_subset)
    assert names == NAMES and len(records) == 6
    mixed = next(r for r in records if Path(r.image).stem == "scratches_228")
    assert set(mixed.labels) == {"scratches", "patches", "pitted_surface"}
    out = write_coco(tmp_path / "ann.json", records, names, relative_to=voc_subset)
    back, back_names = read_coco(out, image_root=voc_subset)
    assert back_names == names
    for a, b in zip(records, back):
        assert Path(a.image).resolve() == Path(b.image).resolve()
        assert (a.width, a.height, a.labels) == (b.width, b.height, b.labels)
        np.testing.assert_allclose(a.boxes, b.boxes)
    # and COCO -> VOC -> read
    for r in back:
        write_voc_xml(tmp_path / "voc2" / f"{Path(r.image).stem}.xml", r)
    again = read_voc_xml(tmp_path / "voc2" / "scratches_228.xml", mixed.image, NAMES)
    np.testing.assert_allclose(again.boxes, mixed.boxes)
    assert again.labels == mixed.labels


def test_image_class_uses_the_file_prefix_then_the_majority(voc_subset):
    records, names = read_boxes(voc_subset)
    by_stem = {Path(r.image).stem: r for r in records}
    assert names[image_class(by_stem["patches_155"], names)] == "patches"  # holds inclusion boxes too
    r = ImageBoxes(Path("x/img7.jpg"), 10, 10, np.zeros((3, 4)), ["b", "a", "a"])
    assert image_class(r, ["a", "b"]) == 0


@pytest.mark.parametrize("body, field", [
    ("<annotation><size>", "malformed XML"),
    (xml(obj(xmin="50", xmax="50")), "xmin (50) must be smaller than xmax (50)"),
    (xml(obj(ymin="70", ymax="60")), "ymin (70) must be smaller than ymax (60)"),
    (xml(obj(xmax="201")), "outside the image"),
    (xml(obj(xmin="-1")), "outside the image"),
    (xml(obj(name="rust")), "<name> 'rust' is not a known class"),
    (xml(obj(xmin="ten")), "field <bndbox/xmin> is not a number"),
    (xml(obj().replace("<ymax>60</ymax>", "")), "missing field <bndbox/ymax>"),
    (xml(obj(), width=""), "missing field <size/width>"),
    ("<notvoc/>", "expected <annotation>"),
])
def test_malformed_voc_is_an_error_naming_file_and_field(tmp_path, body, field):
    f = tmp_path / "bad_1.xml"
    f.write_text(body)
    with pytest.raises(BoxFormatError) as exc:
        read_voc_xml(f, tmp_path / "a.jpg", NAMES)
    assert str(f) in str(exc.value) and field in str(exc.value)
    if "object" in body and "malformed" not in field and "<size" not in field:
        assert "object 0" in str(exc.value)


def test_image_without_annotation_is_an_error_or_a_named_warning(voc_subset):
    (voc_subset / "annotations" / "inclusion_2.xml").unlink()
    with pytest.raises(BoxFormatError, match=r"inclusion_2\.jpg: image has no annotation file"):
        read_voc_folder(voc_subset)
    with pytest.warns(UserWarning, match=r"inclusion_2\.jpg: image has no annotation file .*left out"):
        records = read_voc_folder(voc_subset, missing="warn")
    assert len(records) == 5


def test_annotation_without_image_is_an_error(voc_subset):
    (voc_subset / "images" / "crazing_1.jpg").unlink()
    with pytest.raises(BoxFormatError, match=r"crazing_1\.xml: annotation has no image"):
        read_voc_folder(voc_subset)


def test_voc_folder_layout_error(tmp_path):
    with pytest.raises(DatasetError, match="expected sub-folders images/"):
        read_voc_folder(tmp_path)


def test_image_size_must_match_the_annotation(voc_subset, tmp_path):
    r = read_voc_xml(voc_subset / "annotations" / "crazing_1.xml", voc_subset / "images" / "crazing_1.jpg")
    r.width = 300
    with pytest.raises(BoxFormatError, match=r"crazing_1\.xml: size says 300x200 .* is 200x200"):
        load_record_images([r], 64)


def coco_doc() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30]}],
            "categories": [{"id": 1, "name": "crazing"}]}


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["annotations"][0].update(bbox=[10, 10, 0, 30]), "xmin (10) must be smaller than xmax (10)"),
    (lambda d: d["annotations"][0].update(bbox=[90, 10, 20, 30]), "outside the image"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "field 'bbox' must be 4 numbers"),
    (lambda d: d["annotations"][0].update(category_id=7), "category_id 7 is not among the categories"),
    (lambda d: d["annotations"][0].update(image_id=9), "image_id 9 is not among the images"),
    (lambda d: d["annotations"][0].pop("bbox"), "annotations[0]: missing field 'bbox'"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id 1"),
    (lambda d: d["categories"][0].update(name="rust"), "name 'rust' is not a known class"),
    (lambda d: d["images"][0].update(width="100"), "field 'width' has type str"),
    (lambda d: d.pop("categories"), "missing field 'categories'"),
])
def test_malformed_coco_is_an_error_naming_file_and_field(tmp_path, mutate, field):
    (tmp_path / "a.jpg").write_bytes(b"")
    d = coco_doc()
    mutate(d)
    f = tmp_path / "ann.json"
    f.write_text(json.dumps(d))
    with pytest.raises(BoxFormatError) as exc:
        read_coco(f, class_names=NAMES)
    assert str(f) in str(exc.value) and field in str(exc.value)


def test_coco_malformed_json_and_missing_image(tmp_path):
    f = tmp_path / "ann.json"
    f.write_text("{not json")
    with pytest.raises(BoxFormatError, match="malformed JSON"):
        read_coco(f)
    f.write_text(json.dumps(coco_doc()))
    with pytest.raises(BoxFormatError, match=r"images\[0\]: image file .*a\.jpg not found"):
        read_coco(f)
    with pytest.warns(UserWarning, match=r"a\.jpg not found; left out"):
        records, _ = read_coco(f, missing="warn")
    assert records == []
