"""Helpers of the per-task deploy tests: train a tiny run through the CLI, query the service over HTTP,
and drive the operator page in headless Chromium (Debian's /usr/bin/chromium through Playwright)."""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("DEFECTSCOPE_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[2]


def train_cli(recipe: str | Path, out: Path, overrides: list[str]) -> Path:
    """``defectscope train RECIPE --out OUT -o ...`` through the CLI (Typer's runner); returns the run folder."""
    from typer.testing import CliRunner

    from defectscope.cli import app

    args = ["train", str(recipe), "--out", str(out)]
    for o in overrides:
        args += ["-o", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "model.ckpt").is_file()
    return out


def png_array(b64: str) -> np.ndarray:
    """Decode a base64 PNG (``overlay_png``) to ``uint8 [H, W, 3]``."""
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def post_image(predictor, image: Path) -> dict:
    """POST one real image file to ``/v1/predict`` of a service around ``predictor`` (FastAPI TestClient);
    checks the common fields and returns the JSON body."""
    from fastapi.testclient import TestClient

    from defectscope.deploy.service import create_app

    with TestClient(create_app(predictor)) as c:
        health = c.get("/healthz").json()
        assert health["status"] == "ok" and health["model"]["task"] == predictor.info.task
        r = c.post("/v1/predict", files={"file": (image.name, image.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["backend"] == predictor.backend and body["model"]["task"] == predictor.info.task
    assert body["latency_ms"] > 0 and body["total_ms"] >= body["latency_ms"] and body["file"] == image.name
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_service(predictor, **app_options):
    """The service on 127.0.0.1:<free port> (uvicorn in a thread); yields its URL.
    ``app_options`` go to :func:`~defectscope.deploy.service.create_app` (e.g. ``max_bytes``)."""
    import httpx
    import uvicorn

    from defectscope.deploy.service import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, **app_options), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("service did not start within 30 s")
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def page_screenshot(predictor, image: Path, shot: Path, expect_testids: tuple[str, ...], spectra: Path | None = None) -> dict:
    """Upload ``image`` on the operator page in headless Chromium (with ``spectra``: that signals file chosen
    first in the page's signals field, as for weld models), wait for the answer, check that every
    ``data-testid`` in ``expect_testids`` is shown and that the overlay image decoded (its natural size is
    the request image's), save a screenshot to ``shot``; returns ``{testid: shown text}``.

    Skips (with the reason) when chromium or playwright is missing."""
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found at {CHROMIUM}; run .ci/install-browser.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
    texts: dict[str, str] = {}
    with live_service(predictor) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            sync_api.expect(page.locator("#model")).to_contain_text(predictor.info.model_name, timeout=30_000)
            if spectra is not None:
                page.locator("#spectra-row").wait_for(state="visible", timeout=10_000)
                page.set_input_files("#spectra", str(spectra))
            page.set_input_files("#file", str(image))
            page.get_by_test_id("predicted-class").wait_for(timeout=60_000)
            for tid in ("predicted-class", *expect_testids):
                el = page.get_by_test_id(tid).first
                el.wait_for(state="visible", timeout=10_000)
                texts[tid] = el.inner_text().strip() if tid != "overlay" else el.get_attribute("alt")
            if "overlay" in expect_testids:
                size = page.get_by_test_id("overlay").first.evaluate("img => [img.naturalHeight, img.naturalWidth]")
                with Image.open(image) as im:
                    assert size == [im.height, im.width], (size, im.size)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 5_000
    return texts
