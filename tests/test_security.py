"""Issue 17: a run folder cannot run code, and every bad input gets one clear line naming the file.

Each test reproduces one finding of the issue (they fail on the code before the fix).
"""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from defectscope.cli import app
from defectscope.engine.run import RunError, RunFolder, load_lightning_state_dict

runner = CliRunner()
NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


class _Payload:
    """A pickled object whose unpickling creates a marker file (what an attacker's code would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory) -> Path:
    """A classification run folder (tiny multiscale model, random weights, 64 px)."""
    from defectscope.models import create_model

    run = RunFolder(tmp_path_factory.mktemp("sec_run")).create()
    run.write_config({"task": "classification", "seed": 0})
    kwargs = {"backbone": "efficientnet_lite0", "num_classes": 6, "image_size": 64, "low_res": 48,
              "embed_dim": 32, "num_heads": 4, "num_layers": 1, "dropout": 0.1}
    torch.manual_seed(0)
    model = create_model("multiscale", pretrained=False, **kwargs)
    run.save_model("classification", "multiscale", kwargs, model.state_dict(), class_names=NEU_CLASSES, image_size=64)
    return run.path


def _copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.yaml", "model.ckpt"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` grey pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- 1. checkpoints never run code


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path, cls_run):
    run = _copy_run(cls_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = torch.load(run / "model.ckpt", weights_only=True)
    payload["class_names"] = _Payload(marker)
    torch.save(payload, run / "model.ckpt")
    with pytest.raises(RunError, match=r"model\.ckpt: refused to load the checkpoint: it holds a pickled Python object"):
        RunFolder(run).load_model_payload()
    assert not marker.exists()
    for args in (["predict", str(run), str(tmp_path)], ["export", str(run), "--out", str(tmp_path / "m.onnx")]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert "refused to load" in res.output and "train it again" in res.output
        assert not marker.exists()


def test_load_predictor_and_serve_refuse_the_same_file(tmp_path, cls_run):
    from defectscope.deploy.predictor import load_predictor

    run = _copy_run(cls_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    payload = torch.load(run / "model.ckpt", weights_only=True)
    payload["image_size"] = _Payload(marker)
    torch.save(payload, run / "model.ckpt")
    with pytest.raises(RunError, match="refused"):
        load_predictor(run)
    res = runner.invoke(app, ["serve", str(run), "--port", "1"])
    assert res.exit_code == 2 and "refused" in res.output
    assert not marker.exists()


def test_save_model_stores_only_tensors_and_plain_data(tmp_path):
    from sklearn.preprocessing import StandardScaler

    run = RunFolder(tmp_path / "r").create()
    run.save_model("x", "m", {"k": (1, 2)}, {"w": torch.ones(2)}, lo=np.array([0.5, 1.5]), n=np.int64(3), p=Path("a/b"))
    back = torch.load(run.model_path, weights_only=True)
    assert torch.equal(back["lo"], torch.tensor([0.5, 1.5], dtype=torch.float64)) and back["n"] == 3 and back["p"] == "a/b"
    assert back["model_kwargs"] == {"k": (1, 2)}
    with pytest.raises(TypeError, match=r"payload\['scaler'\]: a sklearn.preprocessing._data.StandardScaler object"):
        run.save_model("x", "m", {}, {}, scaler=StandardScaler())


def test_one_class_scorer_round_trips_through_plain_tensors():
    from defectscope.models.grad_mobilenet.torch_model import OneClassScorer

    rng = np.random.default_rng(0)
    fit, test = rng.normal(size=(60, 12)), rng.normal(size=(25, 12)) * 1.5
    scorer = OneClassScorer(0.1, "scale").fit(fit)
    state = scorer.state_dict()
    assert all(isinstance(v, (torch.Tensor, float, str)) for v in state.values())
    rebuilt = OneClassScorer.from_state_dict(state)
    np.testing.assert_allclose(rebuilt.score(test), scorer.score(test), rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(rebuilt.predict(test), scorer.predict(test))
    with pytest.raises(ValueError, match="one-class SVM state lacks"):
        OneClassScorer.from_state_dict({"kind": "other"})


def test_an_old_unsafe_run_folder_is_refused_with_a_retrain_message(tmp_path, cls_run):
    """Nothing in defectscope reads a checkpoint with pickle, not even to convert an old run folder."""
    run = _copy_run(cls_run, tmp_path / "old")
    payload = torch.load(run / "model.ckpt", weights_only=True)
    payload.update(format="defectscope-model/1", minmax=np.arange(3.0), legacy=Path("x"))  # a pickled object
    torch.save(payload, run / "model.ckpt")
    with pytest.raises(RunError) as info:
        RunFolder(run).load_model_payload()
    assert "refused to load" in str(info.value) and f"defectscope train {run / 'config.yaml'}" in str(info.value)
    assert runner.invoke(app, ["convert-run", str(run)]).exit_code != 0  # no such command


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", "half"])
def test_empty_or_truncated_checkpoint_is_one_line_naming_the_file(tmp_path, cls_run, content):
    run = _copy_run(cls_run, tmp_path / "run")
    if content == "half":
        data = (run / "model.ckpt").read_bytes()
        content = data[: len(data) // 2]
    (run / "model.ckpt").write_bytes(content)
    with pytest.raises(RunError, match=r"model\.ckpt: (empty file|checkpoint cannot be read: truncated or corrupt)"):
        RunFolder(run).load_model_payload()
    res = runner.invoke(app, ["predict", str(run), str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "model.ckpt" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("text,expected", [("", "empty file"), ("task: [unclosed", "not valid YAML"),
                                           ("- a\n- b\n", "expected a mapping"), ("seed: 1\n", "field 'task'"),
                                           (b"\xff\xfe\x00", "not UTF-8")])
def test_corrupt_config_yaml_is_one_line_naming_the_file(tmp_path, cls_run, text, expected):
    run = _copy_run(cls_run, tmp_path / "run")
    (run / "config.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(RunError, match=expected):
        RunFolder(run).read_config()
    res = runner.invoke(app, ["predict", str(run), str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2 and "config.yaml" in res.output, res.output


def test_lightning_best_checkpoint_reads_with_weights_only(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 2)

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 2, (32,), generator=g))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="best", monitor="val_loss", mode="min")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt, EarlyStopping("val_loss", patience=2)])
    module = Tiny()
    trainer.fit(module, loader, loader)
    state = load_lightning_state_dict(ckpt.best_model_path)
    assert set(state) == {"net.weight", "net.bias"}
    fresh = Tiny()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.net.weight, torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]["net.weight"])
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload(tmp_path / "pwned")}, bad)
    with pytest.raises(RunError, match="refused"):
        load_lightning_state_dict(bad)
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- 4. decompression bombs


@pytest.mark.parametrize("side", [8000, 20000])  # 64 Mpx: over our limit; 400 Mpx: over PIL's own too
def test_decompression_bomb_is_an_image_read_error(tmp_path, side):
    from defectscope.data.images import ImageReadError, ImageTooLargeError, load_image
    from defectscope.deploy.images import decode_image_bytes

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(side, side))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png: .*pixels"):
        load_image(bomb)
    with pytest.raises(ImageReadError, match="pixels"):
        decode_image_bytes(bomb.read_bytes(), "bomb.png")


def test_predict_reports_a_bomb_and_a_non_utf8_name_and_keeps_the_batch(tmp_path, cls_run, neu_root):
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((neu_root / "images").glob("crazing_*.jpg"))[:2]
    for g in good:
        (folder / g.name).write_bytes(g.read_bytes())
    (folder / "bomb.png").write_bytes(_png_header(20000, 20000))
    odd = Path(folder.as_posix() + "/" + b"caf\xe9_1.jpg".decode("utf-8", "surrogateescape"))
    odd.write_bytes(good[0].read_bytes())
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(cls_run), str(folder), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "bomb.png" in res.output and "pixels" in res.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 4
    by_name = {Path(r["file"]).name: r for r in rows}
    assert by_name["bomb.png"]["class"] == "" and "pixels" in by_name["bomb.png"]["error"]
    assert by_name["caf\\udce9_1.jpg"]["class"] in NEU_CLASSES  # the undecodable byte is written as an escape


def test_service_answers_413_for_a_bomb(cls_run):
    from fastapi.testclient import TestClient

    from defectscope.deploy.predictor import load_predictor
    from defectscope.deploy.service import create_app

    with TestClient(create_app(load_predictor(cls_run, threads=1))) as c:
        r = c.post("/v1/predict", files={"file": ("bomb.png", _png_header(20000, 20000), "image/png")})
    assert r.status_code == 413 and r.json()["error"] == "too_large"


# ---------------------------------------------------------------- 5. silently wrong results


def test_kolektor_manifest_with_an_unknown_split_is_an_error(tmp_path):
    from defectscope.data.images import DatasetError
    from defectscope.data.masks import read_manifest

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in ("000", "001"):
        Image.new("L", (8, 8)).save(tmp_path / "images" / f"{i}.jpg")
        Image.new("L", (8, 8)).save(tmp_path / "masks" / f"{i}.png")
    (tmp_path / "manifest.csv").write_text("id,split,defective\n000,train,0\n001,tset,0\n")
    with pytest.raises(DatasetError, match=r"manifest.csv, row 2: field 'split' is 'tset'"):
        read_manifest(tmp_path)
    assert len(read_manifest(tmp_path, splits=None)) == 2


def _weld_folder(tmp_path: Path) -> Path:
    from defectscope.data.weld.format import write_weld_dataset

    rng = np.random.default_rng(0)
    samples = [{"id": f"s{i}", "label": "good", "image": rng.integers(0, 255, (16, 16, 3), dtype=np.uint8),
                "spectra": [rng.random((3, 80)) for _ in range(2)]} for i in range(2)]
    write_weld_dataset(tmp_path / "weld", samples, ["good", "bad"], [400.0, 500.0, 600.0], 10000.0)
    return tmp_path / "weld"


@pytest.mark.parametrize("edit,field", [
    (lambda m: m.update(sample_rate_hz=float("nan")), "sample_rate_hz"),
    (lambda m: m["samples"][0]["welds"][1].update(sample_rate_hz=float("inf")), "samples[0].welds[1].sample_rate_hz"),
    (lambda m: m.update(samples={"a": 1}), "samples"),
    (lambda m: m["samples"][1].update(welds={"spectra": "x.npy"}), "samples[1].welds"),
    (lambda m: m.update(wavelengths_nm="400"), "wavelengths_nm"),
])
def test_weld_manifest_nan_rate_and_mistyped_fields_are_errors(tmp_path, edit, field):
    from defectscope.data.weld.format import WeldDataError, read_weld_dataset

    root = _weld_folder(tmp_path)
    man = json.loads((root / "manifest.json").read_text())
    edit(man)
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(WeldDataError, match=rf"manifest.json: field '{__import__('re').escape(field)}' must be"):
        read_weld_dataset(root, length=64, min_length=16)


def test_serve_refuses_a_negative_upload_limit(cls_run):
    for value in ("-1", "0", "nan"):
        res = runner.invoke(app, ["serve", str(cls_run), "--max-mb", value])
        assert res.exit_code == 2 and "--max-mb" in res.output, res.output


def test_multi_frame_tiff_and_gif_warn_and_gif_is_found_in_folders(tmp_path):
    from defectscope.data.images import MultiFrameWarning, discover_labelled_images, load_image

    frames = [Image.new("L", (10, 10), v) for v in (10, 200, 90)]
    for name in ("a/x_1.tif", "a/x_2.gif", "b/y_1.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
    frames[0].save(tmp_path / "a/x_1.tif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "a/x_2.gif", save_all=True, append_images=frames[1:])
    frames[1].save(tmp_path / "b/y_1.png")
    for f in ("a/x_1.tif", "a/x_2.gif"):
        with pytest.warns(MultiFrameWarning, match="3 frames"):
            img = load_image(tmp_path / f)
        assert img.shape == (10, 10, 3) and int(img[0, 0, 0]) == 10
    items, names, layout = discover_labelled_images(tmp_path)
    assert layout == "folder" and names == ["a", "b"] and len(items) == 3


def test_empty_class_folder_warns_and_a_single_class_is_an_error(tmp_path):
    from defectscope.data.images import DatasetError, discover_labelled_images

    for c in ("ok", "other"):
        (tmp_path / c).mkdir()
        Image.new("L", (8, 8)).save(tmp_path / c / "1.png")
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match=r"empty: class folder holds no image file"):
        _, names, _ = discover_labelled_images(tmp_path)
    assert names == ["ok", "other"]
    (tmp_path / "other" / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"only one class \('ok'\) found .* at least 2 classes"):
        discover_labelled_images(tmp_path)
    assert discover_labelled_images(tmp_path, class_names=["ok", "other"])[1] == ["ok", "other"]  # evaluate: fine


# ---------------------------------------------------------------- 6/7. one clear line naming the file


def test_predict_checks_out_before_the_work(tmp_path, cls_run, monkeypatch):
    from defectscope.deploy.adapters.classification import ClassificationAdapter

    def _must_not_run(*a, **k):
        raise AssertionError("predict ran before the output path was checked")

    monkeypatch.setattr(ClassificationAdapter, "predict_files", _must_not_run)
    (tmp_path / "adir").mkdir()
    for out, expected in ((tmp_path / "adir", "is an existing folder"), (Path("/sys/preds.csv"), "is not writable")):
        res = runner.invoke(app, ["predict", str(cls_run), str(tmp_path), "--out", str(out)])
        assert res.exit_code == 2 and expected in res.output and str(out) in res.output, res.output


def test_export_and_evaluate_check_out_first(tmp_path, cls_run):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    res = runner.invoke(app, ["export", str(cls_run), "--out", str(tmp_path / "adir")])
    assert res.exit_code == 2 and "is an existing folder" in res.output
    res = runner.invoke(app, ["evaluate", str(cls_run), "--data", str(tmp_path), "--out", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is an existing file" in res.output


def test_serve_with_a_non_onnx_file_is_one_line(tmp_path):
    from defectscope.deploy.adapters import DeployError
    from defectscope.deploy.predictor import load_predictor

    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"this is not a protobuf\x00\x01")
    with pytest.raises(DeployError, match=r"model.onnx: not a readable ONNX model"):
        load_predictor(fake)
    res = runner.invoke(app, ["serve", str(fake)])
    assert res.exit_code == 2 and "not a readable ONNX model" in res.output


def test_coco_and_voc_infinite_sizes_are_box_format_errors(tmp_path):
    from defectscope.data.boxes import BoxFormatError, read_coco, read_voc_xml

    (tmp_path / "a.jpg").write_bytes(b"")
    coco = tmp_path / "c.json"
    coco.write_text('{"images": [{"id": 1, "file_name": "a.jpg", "width": Infinity, "height": 10}], '
                    '"annotations": [], "categories": [{"id": 1, "name": "x"}]}')
    with pytest.raises(BoxFormatError, match=r"c.json, images\[0\]: width and height must be positive finite"):
        read_coco(coco)
    voc = tmp_path / "a.xml"
    voc.write_text("<annotation><filename>a.jpg</filename><size><width>inf</width><height>5</height></size></annotation>")
    with pytest.raises(BoxFormatError, match=r"a.xml: field <size/width> must be a finite number"):
        read_voc_xml(voc)


def test_non_finite_override_is_a_config_error():
    from defectscope.config import BaseRecipe, ConfigError, load_raw, validate

    for value in (".inf", ".nan", "-.inf"):
        with pytest.raises(ConfigError, match=r"train.lr: .*finite"):
            validate({"task": "x", "train": {"lr": yaml.safe_load(value)}}, BaseRecipe, "r.yaml")
    assert load_raw  # the override path uses the same validation (exercised through the CLI below)


@pytest.mark.parametrize("encoded,expected", [("1 99999999999999999999999", "has 23 digits"),
                                              ("1 ²", "is not a positive integer"), ("١ 2", "is not a positive integer")])
def test_rle_csv_overflow_and_non_ascii_digits_name_file_and_row(tmp_path, encoded, expected):
    from defectscope.data.rle import RLEError, read_rle_csv

    f = tmp_path / "masks.csv"
    f.write_text(f"ImageId,ClassId,EncodedPixels\na.jpg,1,1 2\nb.jpg,1,{encoded}\n", encoding="utf-8")
    with pytest.raises(RLEError, match=rf"masks.csv, row 2 \(line 3\): value \d .*{expected}"):
        read_rle_csv(f)
    f.write_text("ImageId,ClassId,EncodedPixels\na.jpg,²,1 2\n", encoding="utf-8")
    with pytest.raises(RLEError, match=r"masks.csv, row 1 \(line 2\): ClassId '²'"):
        read_rle_csv(f)


def test_messages_with_square_brackets_are_printed_whole(tmp_path, cls_run):
    run = _copy_run(cls_run, tmp_path / "run")
    (run / "config.yaml").write_text("task: [10, 10, 5]\n")
    res = runner.invoke(app, ["predict", str(run), str(tmp_path)])
    assert res.exit_code == 2 and "[10, 10, 5]" in res.output, res.output


def test_unknown_task_in_a_recipe_is_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: clasification\n")
    res = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "r.yaml: field 'task': unknown task 'clasification'" in res.output, res.output


def test_an_internal_bug_keeps_its_traceback(tmp_path, cls_run, monkeypatch):
    from defectscope.deploy.adapters.classification import ClassificationAdapter

    def _bug(*a, **k):
        raise ValueError("internal: shapes (3,) and (4,) not aligned")

    monkeypatch.setattr(ClassificationAdapter, "predict_files", _bug)
    res = runner.invoke(app, ["predict", str(cls_run), str(tmp_path), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)  # not turned into a tidy line


def test_project_errors_share_one_base_and_stay_value_errors():
    from defectscope.config import ConfigError
    from defectscope.data.boxes import BoxFormatError
    from defectscope.data.images import DatasetError, ImageReadError, ImageTooLargeError
    from defectscope.data.rle import RLEError
    from defectscope.data.weld.format import WeldDataError
    from defectscope.deploy.adapters import DeployError
    from defectscope.errors import DefectscopeError, OutputPathError, UnknownNameError

    for cls in (ConfigError, BoxFormatError, DatasetError, ImageReadError, ImageTooLargeError, RLEError, WeldDataError,
                DeployError, RunError, OutputPathError):
        assert issubclass(cls, DefectscopeError) and issubclass(cls, ValueError), cls
    assert issubclass(UnknownNameError, KeyError) and str(UnknownNameError("unknown model 'x'")) == "unknown model 'x'"
