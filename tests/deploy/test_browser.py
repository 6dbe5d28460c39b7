"""The operator page in a real browser: Playwright drives Debian's chromium, uploads a real NEU image
and reads the predicted class off the page. Skips (with the reason) when chromium or playwright is missing;
`.ci/install-browser.sh` installs chromium."""

from __future__ import annotations

import pytest
import task_helpers


@pytest.fixture(scope="module")
def live_service(onnx_predictor):
    """The service on 127.0.0.1:<free port> in a background thread (uvicorn), stopped after the module."""
    with task_helpers.live_service(onnx_predictor) as url:
        yield url


def test_page_uploads_a_real_image_and_shows_the_class(live_service, onnx_predictor, neu_files):
    if not task_helpers.CHROMIUM.exists():
        pytest.skip(f"chromium not found at {task_helpers.CHROMIUM}; run .ci/install-browser.sh (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[test]')")
    image = neu_files[6]  # patches_1.jpg
    expected = onnx_predictor.predict([image])[0]["class"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(task_helpers.CHROMIUM), headless=True,
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
