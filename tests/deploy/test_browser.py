"""The operator page in a real browser: Playwright drives Debian's chromium, uploads a real NEU image
and reads the predicted class off the page. Skips (with the reason) when chromium or playwright is missing;
`.ci/install-browser.sh` installs chromium."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("DEFECTSCOPE_CHROMIUM", "/usr/bin/chromium"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_service(onnx_predictor):
    """The service on 127.0.0.1:<free port> in a background thread (uvicorn), stopped after the module."""
    import httpx
    import uvicorn

    from defectscope.deploy.service import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(onnx_predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        pytest.fail("service did not start within 20 s")
    yield url
    server.should_exit = True
    thread.join(10)


def test_page_uploads_a_real_image_and_shows_the_class(live_service, onnx_predictor, neu_files):
    if not CHROMIUM.exists():
        pytest.skip(f"chromium not found at {CHROMIUM}; run .ci/install-browser.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
    image = neu_files[6]  # patches_1.jpg
    expected = onnx_predictor.predict([image])[0]["class"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.goto(live_service + "/")
            sync_api.expect(page.locator("#model")).to_contain_text("multiscale", timeout=20_000)
            page.set_input_files("#file", str(image))
            cls = page.get_by_test_id("predicted-class")
            cls.wait_for(timeout=30_000)
            assert cls.inner_text().strip() == expected
            assert image.name in page.locator(".result .meta").first.inner_text()
            # a non-image gets the service's error shown on the page
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}])
            err = page.get_by_test_id("error")
            err.wait_for(timeout=30_000)
            assert "415 not_an_image" in err.inner_text()
        finally:
            browser.close()
