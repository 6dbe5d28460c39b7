"""Issue 17, finding 2: the upload limit holds for chunked bodies too (no Content-Length).

Through TestClient (a generator body is sent without Content-Length) and through a real uvicorn
server on a free port with a raw socket, which shows that the server stops reading at the limit.
"""

from __future__ import annotations

import select
import socket

import pytest
import task_helpers
from fastapi.testclient import TestClient

from defectscope.deploy.service import create_app

MAX_BYTES = 100_000  # per file; the request body limit is 2 * MAX_BYTES + 64 KiB


def _chunks(total: int, size: int = 16_384):
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"x" * n


def _multipart_stream(total: int, boundary: str = "b0undary"):
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n"
           "Content-Type: image/png\r\n\r\n").encode()
    yield from _chunks(total)
    yield f"\r\n--{boundary}--\r\n".encode()


def test_chunked_body_over_the_limit_is_413_through_testclient(onnx_predictor, neu_files):
    with TestClient(create_app(onnx_predictor, max_bytes=MAX_BYTES)) as c:
        r = c.post("/v1/predict", content=_multipart_stream(5_000_000),
                   headers={"content-type": "multipart/form-data; boundary=b0undary"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        assert "while streaming" in r.json()["detail"]
        # a good chunked upload under the limit is still answered
        data = neu_files[0].read_bytes()

        def small():
            yield b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpg\"\r\n\r\n"
            yield data
            yield b"\r\n--b0undary--\r\n"

        ok = c.post("/v1/predict", content=small(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
        assert ok.status_code == 200 and ok.json()["class"]


@pytest.fixture(scope="module")
def live_server(onnx_predictor):
    """The service with ``max_bytes=MAX_BYTES`` on a free port (uvicorn in a thread); yields the port."""
    with task_helpers.live_service(onnx_predictor, max_bytes=MAX_BYTES) as url:
        yield int(url.rsplit(":", 1)[1])


def test_real_server_stops_reading_a_chunked_body_at_the_limit(live_server):
    """Stream up to 256 MiB chunked; the 413 must arrive after the limit plus the bounded drain
    (``BodyLimitMiddleware.DRAIN_BYTES``, thrown away so the client gets the answer), not after the body."""
    limit = 2 * MAX_BYTES + 64 * 1024
    sock = socket.create_connection(("127.0.0.1", live_server), timeout=10)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n")
    head = b"--b0undary\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.png\"\r\n\r\n"
    sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
    chunk = b"y" * 65_536
    frame = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent, answer = len(head), b""
    while sent < 256 * 2**20:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(frame)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(chunk)
    sock.settimeout(10)
    try:
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            part = sock.recv(65_536)
            if not part:
                break
            answer += part
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"too_large" in answer
    # the server answered after about the limit; socket buffers allow a few MiB more on the way
    from defectscope.deploy.service import BodyLimitMiddleware

    bound = limit + BodyLimitMiddleware.DRAIN_BYTES + 16 * 2**20
    assert sent < bound, f"client sent {sent} bytes before the 413 (limit {limit}, bound {bound})"


def test_real_server_refuses_a_declared_length_before_reading(live_server):
    sock = socket.create_connection(("127.0.0.1", live_server), timeout=10)
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2147483648\r\n"
                 b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n")
    answer = b""
    while not answer.rstrip().endswith(b"}"):
        part = sock.recv(65_536)
        if not part:
            break
        answer += part
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"2147483648" in answer
