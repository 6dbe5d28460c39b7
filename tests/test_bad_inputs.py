"""The last bad inputs of issue 27, each built by its test: a one-line error (exit 2) naming the file
and the field, or a stated warning; and large (line-scan) images behind a guard the user can raise."""

from __future__ import annotations

import csv
import fractions
import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.data.images import MAX_MEGAPIXELS_ENV

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_pixel_limit_leak(monkeypatch):
    """``--max-megapixels`` sets ``DEFECTSCOPE_MAX_MEGAPIXELS`` in this process: restore it after each test
    (``setenv`` records the previous state, ``delenv`` of an absent variable records nothing; empty = unset)."""
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "")


def _one_line_error(res) -> str:
    """The CLI's answer to a user error: exit status 2 and one line starting with ``error:``, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and (res.exception is None or isinstance(res.exception, SystemExit)), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, res.output
    return " ".join(res.output.split())  # rich wraps long lines at the terminal width: compare without it


def _texture(rng: np.random.Generator, side: int = 40) -> Image.Image:
    """A grey texture (smoothed noise); two calls give images far apart in pHash."""
    x = rng.normal(size=(side // 4, side // 4))
    return Image.fromarray((255 * (x - x.min()) / (np.ptp(x) + 1e-9)).astype(np.uint8)).resize((side, side), Image.BILINEAR)


def _class_folders(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _texture(rng).save(root / cls / f"{cls}_{i}.png")
    return root


def _recipe(path: Path, root: Path, **model) -> Path:
    path.write_text(yaml.safe_dump({
        "task": "classification", "data": {"root": str(root), "image_size": 32},
        "model": {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": False, **model},
        "train": {"epochs": 1, "batch_size": 8, "precision": "32", "logger": ["csv"], "progress": False,
                  "early_stopping_patience": 0, "augment": False}}))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A classification run folder made without training (random weights, 32 px, classes a, b)."""
    from defectscope.engine.run import RunFolder
    from defectscope.models import create_model

    run = RunFolder(tmp_path_factory.mktemp("bad_inputs_run")).create()
    run.write_config({"task": "classification", "seed": 0})
    kwargs = {"backbone": "efficientnet_lite0", "num_classes": 2}
    torch.manual_seed(0)
    model = create_model("classifier", pretrained=False, **kwargs)
    run.save_model("classification", "classifier", kwargs, model.state_dict(), class_names=["a", "b"], image_size=32)
    return run.path


# ---------------------------------------------------------------- 1. tracebacks -> one line


def test_weights_file_holding_a_pickled_object_is_refused_naming_file_and_field(tmp_path):
    from defectscope.models.backbones import create_backbone
    from defectscope.models.weights import WeightsFileError

    bad = tmp_path / "backbone.pt"
    torch.save({"state_dict": {"conv_stem.weight": torch.zeros(1)}, "note": fractions.Fraction(1, 3)}, bad)
    with pytest.raises(WeightsFileError, match=r"backbone\.pt: refused to load the weights file \(model\.weights\): "
                                               r"it holds a pickled Python object \(fractions\.Fraction\)"):
        create_backbone("efficientnet_lite0", weights=bad)
    data = _class_folders(tmp_path / "data", {"a": 3, "b": 3})
    res = runner.invoke(app, ["train", str(_recipe(tmp_path / "r.yaml", data)), "--out", str(tmp_path / "run"),
                              "-o", f"model.weights={bad}"])
    text = _one_line_error(res)
    assert f"{bad}: refused to load the weights file (model.weights)" in text and "fractions.Fraction" in text
    assert not (tmp_path / "run").exists()


def test_weights_file_that_does_not_fit_is_a_one_line_error(tmp_path):
    from defectscope.models.backbones import create_backbone
    from defectscope.models.weights import WeightsFileError

    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsFileError, match=r"other\.pt: weights file \(model\.weights\): no key matches the model"):
        create_backbone("efficientnet_lite0", weights=other)
    with pytest.raises(WeightsFileError, match=r"nothing\.pt: weights file \(model\.weights\) not found"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "nothing.pt")


def test_recipe_that_is_not_utf8_text_is_a_one_line_error(tmp_path):
    from defectscope.config import ConfigError, load_raw

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\xff\xfet\x00a\x00s\x00k\x00:\x00 \x00x\x00")  # UTF-16 with a BOM, as some editors save
    with pytest.raises(ConfigError, match=r"recipe\.yaml: not UTF-8 text \(byte 0xff at offset 0\)"):
        load_raw(recipe)
    text = _one_line_error(runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")]))
    assert f"{recipe}: not UTF-8 text" in text


@pytest.mark.parametrize("field,value,expected", [
    ("num_classes", -1, "-1 is impossible; expected an integer in 1..1000000 (a size or count)"),
    ("num_classes", 0, "0 is impossible"),
    ("num_classes", "six", "expected an integer, got 'six'"),
    ("dropout", 1.5, "a dropout rate is in [0, 1)"),
    ("backbone_size", 3, "not an argument of model 'classifier'"),
])
def test_run_folder_with_impossible_architecture_arguments_names_file_and_field(tmp_path, tiny_run, field, value, expected):
    from defectscope.engine.run import RunError, RunFolder

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes((tiny_run / "config.yaml").read_bytes())
    payload = torch.load(tiny_run / "model.ckpt", weights_only=True)
    payload["model_kwargs"] = {**payload["model_kwargs"], field: value}
    torch.save(payload, run / "model.ckpt")
    with pytest.raises(RunError) as err:
        RunFolder(run).load_model()
    msg = str(err.value)
    assert msg.startswith(f"{run / 'model.ckpt'}: field 'model_kwargs.{field}' of model 'classifier'") and expected in msg
    img = tmp_path / "x.png"
    Image.new("L", (40, 40), 90).save(img)
    text = _one_line_error(runner.invoke(app, ["predict", str(run), str(img), "--out", str(tmp_path / "p.csv")]))
    assert f"field 'model_kwargs.{field}'" in text and "model.ckpt" in text


def test_folds_larger_than_the_smallest_class_name_the_class_and_the_k_that_works(tmp_path):
    from defectscope.config import ConfigError
    from defectscope.data.weld.simulate import simulate_weld_dataset
    from defectscope.engine.crossval import cv_folds

    with pytest.raises(ConfigError, match=r"data: 5-fold .* but class 'rare' has only 3 samples; counts: 'common' 10, "
                                          r"'rare' 3; the most this data allows is 3: use --folds 3"):
        cv_folds(np.array([0] * 10 + [1] * 3), 5, class_names=["common", "rare"], source="data")
    with pytest.raises(ConfigError, match=r"too small for cross-validation: add samples, or use --folds 1"):
        cv_folds(np.array([0] * 10 + [1]), 3, class_names=["common", "rare"])
    # a weld folder of 14 coupons (2 per condition) and a recipe asking for 7 folds
    weld = tmp_path / "weld"
    simulate_weld_dataset(weld, 14, 0, 64)
    recipe = tmp_path / "weld.yaml"
    recipe.write_text(yaml.safe_dump({"task": "weld", "data": {"root": str(weld), "seg_size": 64, "crop_height": 32,
                                                                "crop_width": 64},
                                      "segmentation": {"enabled": False}, "model": {"name": "weld_dlinear"},
                                      "train": {"epochs": 1, "precision": "32"}, "eval": {"folds": 7}}))
    text = _one_line_error(runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")]))
    assert f"{weld}: 7-fold cross-validation (--folds / eval.folds) needs at least 7 samples of every class" in text
    assert "class 'baseline' has only 2 samples" in text and "use --folds 2 (or eval.folds: 2)" in text


# ---------------------------------------------------------------- 2. silent -> warned


def test_train_recipe_warns_about_the_same_image_in_two_classes(tmp_path):
    data = _class_folders(tmp_path / "data", {"a": 6, "b": 6})
    (data / "b" / "copy_of_a0.png").write_bytes((data / "a" / "a_0.png").read_bytes())
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", str(_recipe(tmp_path / "r.yaml", data)), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "warning: DUPLICATE ACROSS CLASSES (exact): a_0.png [a], copy_of_a0.png [b]" in text
    assert "leaks between train and test" in text
    check = json.loads((out / "data_check.json").read_text())
    assert [d["cross_class"] for d in check["duplicates"]] == [True]


def _gif(path: Path, n: int = 3) -> Path:
    frames = [Image.new("L", (40, 40), v) for v in (20, 200, 120, 60)[:n]]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    return path


def test_predict_says_which_frame_of_an_animated_gif_or_multipage_tiff_was_used(tmp_path, tiny_run):
    gif = _gif(tmp_path / "anim.gif")
    frames = [Image.new("L", (40, 40), v) for v in (30, 90)]
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    Image.new("L", (40, 40), 50).save(tmp_path / "plain.png")
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert f"warning: {gif}: GIF file has 3 frames (pages); frame 1 of 3 used" in text
    assert f"{tmp_path / 'pages.tif'}: TIFF file has 2 frames (pages); frame 1 of 2 used" in text
    assert "plain.png" not in text.split("predicted")[0]
    assert len(list(csv.DictReader(out.open()))) == 3


def test_service_answer_says_frame_1_of_n_used(tiny_run, tmp_path):
    from fastapi.testclient import TestClient

    from defectscope.deploy.predictor import load_predictor
    from defectscope.deploy.service import create_app

    gif = _gif(tmp_path / "anim.gif", 4)
    png = tmp_path / "one.png"
    Image.new("L", (40, 40), 50).save(png)
    with TestClient(create_app(load_predictor(tiny_run, threads=1))) as c:
        ans = c.post("/v1/predict", files={"file": ("anim.gif", gif.read_bytes(), "image/gif")})
        assert ans.status_code == 200, ans.text
        assert ans.json()["warnings"] == ["anim.gif: GIF file has 4 frames (pages); frame 1 of 4 used"]
        plain = c.post("/v1/predict", files={"file": ("one.png", png.read_bytes(), "image/png")})
        assert plain.status_code == 200 and "warnings" not in plain.json()


# ---------------------------------------------------------------- 3. unclear -> named


def test_a_class_with_a_single_image_is_named(tmp_path):
    data = _class_folders(tmp_path / "data", {"crazing": 6, "inclusion": 6, "patches": 6, "scratches": 1})
    text = _one_line_error(runner.invoke(app, ["train", str(_recipe(tmp_path / "r.yaml", data)),
                                               "--out", str(tmp_path / "run")]))
    assert (f"{data}: class 'scratches' has a single item; every class needs at least 2 items for a stratified split "
            "(one to train on, one to test); counts: 'crazing' 6, 'inclusion' 6, 'patches' 6, 'scratches' 1") in text


# ---------------------------------------------------------------- 4. large images


def _big_png(path: Path, width: int, height: int) -> Path:
    """A ``width x height`` grey PNG written row by row (a checkerboard of 1000 px squares): the pixels never
    exist in memory at once and the file is small (about 0.3 MB for 13000 x 13000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    cols = (np.arange(width) // 1000) % 2
    rows = [b"\x00" + ((cols ^ p) * 200 + 30).astype(np.uint8).tobytes() for p in (0, 1)]
    z = zlib.compressobj(6)
    parts = [z.compress(rows[(y // 1000) % 2]) for y in range(height)]
    idat = b"".join(parts) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def line_scan_png(tmp_path_factory) -> Path:
    """A 13000 x 13000 px grey PNG (169 Mpx), as a line-scan camera writes them."""
    return _big_png(tmp_path_factory.mktemp("big") / "linescan.png", 13000, 13000)


def test_a_169_mpx_image_is_refused_by_default_naming_the_option_and_predicted_once_raised(tmp_path, tiny_run,
                                                                                             line_scan_png):
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(tiny_run), str(line_scan_png), "--out", str(out)])
    assert res.exit_code == 0, res.output
    row = next(csv.DictReader(out.open()))
    assert row["class"] == "" and (f"{line_scan_png}: 13000x13000 = 169000000 pixels exceeds the limit of 40000000 "
                                   "pixels (40 Mpx, decompression-bomb guard); if the image is genuine, raise the limit "
                                   "with --max-megapixels 169 (or DEFECTSCOPE_MAX_MEGAPIXELS=169)") == row["error"]
    res = runner.invoke(app, ["predict", str(tiny_run), str(line_scan_png), "--out", str(out), "--max-megapixels", "170"])
    assert res.exit_code == 0, res.output
    row = next(csv.DictReader(out.open()))
    assert row["class"] in ("a", "b") and row["error"] == ""
    bad = runner.invoke(app, ["predict", str(tiny_run), str(line_scan_png), "--out", str(out), "--max-megapixels", "-3"])
    assert "--max-megapixels -3: expected a positive number of megapixels" in _one_line_error(bad)


def test_a_169_mpx_image_is_decoded_in_bounded_memory(line_scan_png):
    """The classifier's reader decodes the stored grey pixels once (169 MB) and reduces them; the full-size
    RGB copy of ``load_image`` (507 MB, and its resize) never exists. Measured in a fresh process."""
    code = ("import re, sys; from defectscope.data.images import {fn}; "
            "a = {fn}(sys.argv[1], {args}); "  # VmHWM: peak RSS of this program (ru_maxrss would include pytest's, kept over exec)
            "print(a.shape, int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024)")

    def peak_mb(fn: str, args: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", code.format(fn=fn, args=args), str(line_scan_png)], check=True,
                             capture_output=True, text=True, env={**__import__("os").environ, MAX_MEGAPIXELS_ENV: "170"})
        shape, mb = out.stdout.rsplit(" ", 1)
        return shape, int(mb)

    shape, reduced = peak_mb("load_image_resized", "(200, 200)")
    assert shape == "(200, 200, 3)"
    assert reduced < 169 + 150, f"peak RSS {reduced} MiB: more than the stored pixels and the interpreter"
    full_shape, full = peak_mb("load_image", "")
    assert full_shape == "(13000, 13000, 3)" and full > reduced + 400  # what it saves: the RGB copy (507 MB)


def test_pixel_limit_is_one_option_for_every_reader(tmp_path, monkeypatch, tiny_run):
    from fastapi.testclient import TestClient

    from defectscope.data.images import ImageTooLargeError, load_image, load_image_resized, load_stack, resize_uint8
    from defectscope.data.masks import load_mask
    from defectscope.deploy.predictor import load_predictor
    from defectscope.deploy.service import create_app

    img = tmp_path / "x.png"
    _texture(np.random.default_rng(1), 48).save(img)
    # within the default limit the resized reader is exactly load + resize (training figures unchanged)
    assert np.array_equal(load_image_resized(img, (20, 30)), resize_uint8(load_image(img), (20, 30)))
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "0.002")  # 2000 px: a 48 x 48 image (2304 px) is over it
    for read in (load_image, lambda p: load_stack([p], 32), load_mask):
        with pytest.raises(ImageTooLargeError, match=r"x\.png: 48x48 = 2304 pixels exceeds the limit of 2000 pixels"):
            read(img)
    with TestClient(create_app(load_predictor(tiny_run, threads=1))) as c:
        ans = c.post("/v1/predict", files={"file": ("x.png", img.read_bytes(), "image/png")})
        assert c.get("/healthz").json()["max_pixels"] == 2000
    assert ans.status_code == 413 and "--max-megapixels 1" in ans.json()["detail"]
    monkeypatch.setenv(MAX_MEGAPIXELS_ENV, "lots")
    with pytest.raises(ImageTooLargeError, match=r"DEFECTSCOPE_MAX_MEGAPIXELS='lots' \(--max-megapixels\): expected a "
                                                 r"positive number"):
        load_image(img)
