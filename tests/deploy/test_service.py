"""The inference service: success on both backends and every 4xx / 503, through FastAPI's TestClient."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from defectscope.deploy.service import ApiError, create_app, read_spectra


@pytest.fixture(scope="module")
def client(onnx_predictor):
    with TestClient(create_app(onnx_predictor, max_bytes=200_000, max_pixels=4_000_000)) as c:
        yield c


def _post(client, name: str, data: bytes, ctype: str = "image/jpeg", **extra):
    return client.post("/v1/predict", files={"file": (name, data, ctype), **extra})


def _error(r, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    return body["detail"]


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_predict_real_image(backend, onnx_predictor, torch_predictor, neu_files):
    pred = onnx_predictor if backend == "onnx" else torch_predictor
    f = neu_files[4]
    with TestClient(create_app(pred)) as c:
        r = _post(c, f.name, f.read_bytes())
    assert r.status_code == 200, r.text
    body = r.json()
    expected = pred.predict([f])[0]
    assert body["class"] == expected["class"]
    assert set(body["probabilities"]) == set(pred.info.class_names)
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert body["latency_ms"] > 0 and body["total_ms"] >= body["latency_ms"]
    assert body["model"]["backend"] == pred.backend and body["model"]["model"] == "multiscale"
    assert body["overlay_png"] is None  # classification has no map


def test_healthz_docs_and_page(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["classes"][0] == "crazing" and h["max_bytes"] == 200_000
    assert client.get("/docs").status_code == 200
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/predict" in page.text and 'data-testid' in page.text


def test_no_file_is_400(client):
    detail = _error(client.post("/v1/predict", data={"x": "1"}), 400, "no_file")
    assert "'file'" in detail


def test_not_an_image_is_415(client):
    detail = _error(_post(client, "notes.txt", b"this is plain text, not pixels", "text/plain"), 415, "not_an_image")
    assert "notes.txt" in detail


def test_empty_file_is_415(client):
    _error(_post(client, "empty.jpg", b""), 415, "not_an_image")


def test_truncated_jpeg_is_422(client, neu_files):
    data = neu_files[0].read_bytes()
    detail = _error(_post(client, "cut.jpg", data[: len(data) // 3]), 422, "corrupt_image")
    assert "cut.jpg" in detail and "JPEG" in detail


def test_too_many_bytes_is_413_with_the_limit(client):
    big = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000
    detail = _error(_post(client, "big.png", buf.getvalue(), "image/png"), 413, "too_large")
    assert "200000 bytes" in detail


def test_oversized_request_body_is_413_before_it_is_read(client):
    body = b"x" * 500_000  # over 2 * 200 000 + 64 KiB
    r = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    detail = _error(r, 413, "too_large")
    assert "500000 bytes" in detail and "200000 bytes" in detail
    assert client.get("/healthz").status_code == 200


def test_too_many_pixels_is_413(client):
    buf = io.BytesIO()
    Image.new("L", (2500, 2000)).save(buf, format="PNG")  # 5 Mpx of zeros compresses to a few kB
    detail = _error(_post(client, "huge.png", buf.getvalue(), "image/png"), 413, "too_large")
    assert "4000000 pixels" in detail


def test_spectra_sent_to_image_only_model_is_400(client, neu_files):
    f = neu_files[0]
    r = _post(client, f.name, f.read_bytes(), spectra=("s.csv", b"1,2,3\n4,5,6\n", "text/csv"))
    assert "image only" in _error(r, 400, "unexpected_spectra")


def test_wrong_spectra_shape_is_422_with_both_shapes():
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 50), np.float32))
    with pytest.raises(ApiError) as e:
        read_spectra(buf.getvalue(), "s.npy", (4, 100))
    assert e.value.status == 422 and "[3, 50]" in e.value.detail and "[4, 100]" in e.value.detail
    with pytest.raises(ApiError, match="cannot be read"):
        read_spectra(b"a,b\nc,d\n", "s.csv", (2, 2))
    ok = read_spectra(b"1,2,3\n4,5,6\n", "s.csv", (2, 3))
    assert ok.shape == (2, 3) and ok[1, 2] == 6


def test_wrong_spectra_shape_over_http_for_a_model_declaring_spectra(tiny_onnx, neu_files):
    """The weld-model path: a model whose metadata declares spectra ``[4, 100]`` gets a 400 without
    spectra and a 422 for a ``[3, 50]`` upload."""
    from defectscope.deploy.predictor import OnnxPredictor

    pred = OnnxPredictor(tiny_onnx)
    pred.info.extra["spectra_shape"] = [4, 100]
    f = neu_files[0]
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 50), np.float32))
    with TestClient(create_app(pred)) as c:
        _error(_post(c, f.name, f.read_bytes()), 400, "missing_spectra")
        r = _post(c, f.name, f.read_bytes(), spectra=("s.npy", buf.getvalue(), "application/octet-stream"))
        assert "[4, 100]" in _error(r, 422, "bad_spectra")
        assert c.get("/healthz").json()["spectra_shape"] == [4, 100]


def test_saturated_pool_answers_503_and_keeps_serving(tiny_onnx, neu_files):
    from defectscope.deploy.predictor import OnnxPredictor

    pred = OnnxPredictor(tiny_onnx, threads=1)
    gate, entered = threading.Event(), threading.Event()
    real_run = pred.run

    def slow_run(x):
        entered.set()
        gate.wait(30)
        return real_run(x)

    pred.run = slow_run
    data = neu_files[0].read_bytes()
    with TestClient(create_app(pred, workers=1, queue=0)) as c:
        first: dict = {}
        t = threading.Thread(target=lambda: first.setdefault("r", _post(c, "a.jpg", data)))
        t.start()
        assert entered.wait(30)
        detail = _error(_post(c, "b.jpg", data), 503, "busy")
        assert "1 inference places" in detail
        gate.set()
        t.join(30)
        assert first["r"].status_code == 200
        assert _post(c, "c.jpg", data).status_code == 200  # serving again
        assert c.get("/healthz").json()["rejected"] == 1


def test_a_text_field_instead_of_a_file_is_400(client):
    detail = _error(client.post("/v1/predict", data={"file": "not-a-file"}), 400, "bad_request")
    assert "body.file" in detail and "multipart/form-data" in detail


def test_a_non_multipart_body_is_400_no_file(client):
    r = client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"})
    assert "'file' part" in _error(r, 400, "no_file")
    assert client.get("/healthz").json()["status"] == "ok"  # still serving after the bad requests
