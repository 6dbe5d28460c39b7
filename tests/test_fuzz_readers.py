"""Fuzzing every reader (issue 17): a generated bad input ends in the reader's own error type with a
message naming the file, or is read correctly; never another exception type.

Inputs are random bytes/text and random mutations (byte flips, truncation, field replacement) of
valid files the tests write. Hypothesis keeps the examples small (about 40 s in all here).
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from defectscope.config import BaseRecipe, ConfigError, load_raw, validate
from defectscope.data.boxes import BoxFormatError, ImageBoxes, read_coco, read_voc_xml
from defectscope.data.images import DatasetError, ImageReadError, load_image
from defectscope.data.masks import read_manifest
from defectscope.data.rle import RLEError, read_rle_csv
from defectscope.data.weld.format import WeldDataError, read_weld_dataset, write_weld_dataset
from defectscope.deploy.images import decode_image_bytes
from defectscope.engine.run import RunError, RunFolder

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _mutate(data: bytes, draw_ops: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, val in draw_ops:
        if buf:
            buf[pos % len(buf)] = val
    if cut is not None and buf:
        buf = buf[: cut % (len(buf) + 1)]
    return bytes(buf)


mutations = st.tuples(st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
                      st.none() | st.integers(0, 10**6))


def _png(size=(12, 9), mode="L") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(size[0] * size[1] * (3 if mode == "RGB" else 1), dtype=np.uint8).reshape(
        (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])), mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


SEEDS = {"png": _png(), "jpeg": _jpeg(), "rgb": _png(mode="RGB")}


def _names(exc: BaseException, path: Path) -> bool:
    return str(path) in str(exc) or path.name in str(exc)


# ---------------------------------------------------------------- images


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), mut=mutations, raw=st.none() | st.binary(max_size=64))
def test_images(seed, mut, raw):
    data = raw if raw is not None else _mutate(SEEDS[seed], *mut)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "img.png"
        f.write_bytes(data)
        try:
            img = load_image(f)
        except ImageReadError as exc:
            assert _names(exc, f), exc
        else:
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    try:
        arr = decode_image_bytes(data, "upload.png")
    except ImageReadError as exc:
        assert "upload.png" in str(exc)
    else:
        assert arr.dtype == np.uint8 and arr.shape[2] == 3


# ---------------------------------------------------------------- VOC and COCO

VOC = ("<annotation><filename>a.jpg</filename><size><width>40</width><height>30</height><depth>3</depth></size>"
       "<object><name>crazing</name><bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>"
       "</annotation>")


@FUZZ
@given(mut=mutations, text=st.none() | st.text(max_size=80), field=st.none() | st.sampled_from(
    ["40", "-1", "inf", "nan", "1e400", "", "x", "20.5", "99999999999999999999"]))
def test_voc(mut, text, field):
    if text is not None:
        data = text.encode("utf-8", "surrogatepass")
    elif field is not None:
        data = VOC.replace("<xmax>20</xmax>", f"<xmax>{field}</xmax>").replace("<width>40</width>", f"<width>{field}</width>").encode()
    else:
        data = _mutate(VOC.encode(), *mut)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "a.xml"
        f.write_bytes(data)
        try:
            rec = read_voc_xml(f, image=Path(d) / "a.jpg")
        except BoxFormatError as exc:
            assert _names(exc, f), exc
        else:
            assert isinstance(rec, ImageBoxes) and rec.boxes.shape[1] == 4 and np.isfinite(rec.boxes).all()
            assert ((rec.boxes[:, :2] >= 0) & (rec.boxes[:, 2:] <= [rec.width, rec.height])).all()


def _coco() -> dict:
    return {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 12]}],
            "categories": [{"id": 1, "name": "crazing"}]}


COCO_SLOTS = [("images", 0, "width"), ("images", 0, "height"), ("images", 0, "id"), ("images", 0, "file_name"),
              ("annotations", 0, "bbox"), ("annotations", 0, "image_id"), ("annotations", 0, "category_id"),
              ("annotations", 0, "score"), ("categories", 0, "id"), ("categories", 0, "name")]


@FUZZ
@given(slot=st.sampled_from(COCO_SLOTS + [None]), value=json_values, mut=mutations, whole=st.booleans())
def test_coco(slot, value, mut, whole):
    doc = _coco()
    if slot is not None:
        doc[slot[0]][slot[1]][slot[2]] = value
    elif whole:
        doc = value
    data = json.dumps(doc).encode() if slot is not None or whole else _mutate(json.dumps(doc).encode(), *mut)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "a.jpg").write_bytes(b"")
        f = Path(d) / "c.json"
        f.write_bytes(data)
        try:
            records, names = read_coco(f)
        except BoxFormatError as exc:
            assert _names(exc, f), exc
        else:
            for r in records:
                assert np.isfinite(r.boxes).all() and r.width > 0 and r.height > 0 and len(r.labels) == len(r.boxes)


# ---------------------------------------------------------------- run-length csv, KolektorSDD manifest

RLE_CSV = "ImageId,ClassId,EncodedPixels\na.jpg,1,1 3 10 5\nb.jpg,2,\n"


@FUZZ
@given(mut=mutations, cell=st.none() | st.text(max_size=20), text=st.none() | st.text(max_size=60))
def test_rle_csv(mut, cell, text):
    if text is not None:
        data = text.encode("utf-8", "surrogatepass")
    elif cell is not None:
        data = RLE_CSV.replace("1 3 10 5", cell.replace("\n", " ").replace(",", " ")).encode("utf-8", "surrogatepass")
    else:
        data = _mutate(RLE_CSV.encode(), *mut)
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "masks.csv"
        f.write_bytes(data)
        try:
            recs = read_rle_csv(f, shapes=(8, 6))
        except RLEError as exc:
            assert _names(exc, f), exc
        else:
            assert all(r.class_id >= 1 and r.image_id for r in recs)


MANIFEST = "id,split,defective\n000,train,0\n001,val,1\n"


@FUZZ
@given(mut=mutations, value=st.none() | st.text(max_size=10), col=st.sampled_from([0, 1, 2]))
def test_kolektor_manifest(mut, value, col):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        for i in ("000", "001"):
            (root / "images" / f"{i}.jpg").write_bytes(SEEDS["jpeg"])
            (root / "masks" / f"{i}.png").write_bytes(_png((16, 16)))
        if value is not None:
            rows = [r.split(",") for r in MANIFEST.strip().split("\n")]
            rows[2][col] = value.replace(",", ";").replace("\n", " ").replace("\r", " ")
            data = "\n".join(",".join(r) for r in rows).encode("utf-8", "surrogatepass")
        else:
            data = _mutate(MANIFEST.encode(), *mut)
        f = root / "manifest.csv"
        f.write_bytes(data)
        try:
            items = read_manifest(root)
        except DatasetError as exc:
            assert _names(exc, f), exc
        else:
            assert all(it.split in ("train", "val", "test", "") and it.image.is_file() and it.mask.is_file() for it in items)


# ---------------------------------------------------------------- weld manifest and arrays


@pytest.fixture(scope="module")
def weld_root(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    samples = [{"id": f"s{i}", "label": ["good", "bad"][i % 2], "image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                "spectra": [rng.random((3, 80)) for _ in range(2)]} for i in range(2)]
    root = tmp_path_factory.mktemp("weld") / "w"
    write_weld_dataset(root, samples, ["good", "bad"], [400.0, 500.0, 600.0], 10000.0)
    return root


WELD_SLOTS = [("classes",), ("welds_per_sample",), ("wavelengths_nm",), ("sample_rate_hz",), ("samples",),
              ("samples", 0), ("samples", 0, "id"), ("samples", 0, "label"), ("samples", 0, "image"),
              ("samples", 0, "welds"), ("samples", 0, "welds", 0), ("samples", 0, "welds", 0, "spectra"),
              ("samples", 0, "welds", 1, "sample_rate_hz"), ("samples", 1, "welds", 0, "wavelengths_nm"),
              # format version 2 (the simulator writes it)
              ("channels",), ("channels", 0), ("channels", 0, "wavelength_nm"), ("samples", 0, "images"),
              ("samples", 0, "welds", 0, "signals"), ("samples", 0, "metadata"), ("samples", 0, "group")]


def _copy_tree(src: Path, dst: Path) -> None:
    import shutil

    shutil.copytree(src, dst)


@FUZZ
@given(slot=st.sampled_from(WELD_SLOTS), value=json_values, array=st.none() | st.sampled_from(
    ["nan", "inf", "1d", "3d", "short", "object", "text", "empty", "channels"]))
def test_weld_manifest_and_arrays(weld_root, slot, value, array):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "w"
        _copy_tree(weld_root, root)
        mpath = root / "manifest.json"
        man = json.loads(mpath.read_text())
        if array is None:
            node = man
            for k in slot[:-1]:
                node = node[k]
            node[slot[-1]] = value
            mpath.write_text(json.dumps(man))
        else:
            weld = man["samples"][1]["welds"][0]
            spath = root / (weld.get("spectra") or weld["signals"])
            good = np.load(spath)
            bad = {"nan": np.where(np.arange(good.size).reshape(good.shape) == 7, np.nan, good),
                   "inf": np.full_like(good, np.inf), "1d": good[0], "3d": good[None], "short": good[:, :5],
                   "channels": good[:2]}.get(array)
            if array == "object":
                spath.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 60 + b"\n")
            elif array == "text":
                spath.write_text("1,2,3")
            elif array == "empty":
                spath.write_bytes(b"")
            else:
                np.save(spath, bad)
        try:
            ds = read_weld_dataset(root, length=64, min_length=16)
        except WeldDataError as exc:
            assert str(mpath) in str(exc) or "sample '" in str(exc), exc
        else:
            assert all(np.isfinite(s.spectra).all() and s.spectra.shape == (2, 3, 64) for s in ds.samples)
            assert all(np.isfinite(r) and r > 0 for s in ds.samples for r in s.sample_rates_hz)


# ---------------------------------------------------------------- recipes and run folders


@FUZZ
@given(text=st.text(max_size=80), key=st.sampled_from(["train.lr", "train.epochs", "seed", "train.logger", "train"]),
       value=json_values)
def test_recipes(text, key, value):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "recipe.yaml"
        f.write_bytes(text.encode("utf-8", "surrogatepass"))
        try:
            validate(load_raw(f), BaseRecipe, str(f))
        except ConfigError as exc:
            assert _names(exc, f), exc
        f.write_text("task: classification\n")
        try:
            cfg = validate(load_raw(f, [f"{key}={json.dumps(value)}"]), BaseRecipe, str(f))
        except ConfigError as exc:
            assert _names(exc, f), exc
        else:
            assert cfg.train.lr > 0 and np.isfinite(cfg.train.lr) and cfg.train.epochs >= 1


@FUZZ
@given(config=st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
       mut=mutations)
def test_run_folders(config, mut):
    with tempfile.TemporaryDirectory() as d:
        run = RunFolder(Path(d) / "run").create()
        run.save_model("classification", "m", {"k": 1}, {"w": torch.arange(6.0)}, class_names=["a", "b"])
        run.model_path.write_bytes(_mutate(run.model_path.read_bytes(), *mut))
        run.config_path.write_bytes(config)
        try:
            cfg = run.read_config()
        except RunError as exc:
            assert _names(exc, run.config_path), exc
        else:
            assert isinstance(cfg["task"], str)
        try:
            payload = run.load_model_payload()
        except RunError as exc:
            assert _names(exc, run.model_path), exc
        else:
            assert payload["format"].startswith("defectscope-model/")
