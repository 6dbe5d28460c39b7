"""``defectscope serve RUN_OR_ONNX``: the inference service (FastAPI + uvicorn) and its operator page.

Endpoints:

- ``POST /v1/predict`` (multipart): ``file`` = the image; ``spectra`` = the spectra file
  (``.npy`` or CSV, weld models only). Returns the adapter's answer (``class``,
  ``probabilities``, ``overlay_png`` base64 or ``null``, and the task's own fields:
  segmentation ``masks`` (run-length), ``threshold``, ``image_score_rule``; detection
  ``boxes`` (``class``, ``score``, pixel ``box``); anomaly ``threshold``, ``map_max``,
  ``map_scale``, ``member``) plus ``latency_ms`` (model time), ``total_ms`` (decode + queue +
  model) and ``model`` (identity); ``warnings`` (a list of sentences) when the answer rests on an
  assumption, e.g. ``"x.gif: GIF file has 3 frames (pages); frame 1 of 3 used"``.
- ``GET /healthz``: liveness, model identity and pool occupancy.
- ``GET /v1/drift``: the drift alarm (classification models with a stored drift reference,
  :class:`~defectscope.deploy.drift.DriftAlarm`): per channel (pooled features, image statistics)
  the MMD² of the last ``window`` incoming images against the reference, its calibrated threshold
  and whether it alarms; each ``/v1/predict`` answer also carries ``drift``.
- ``GET /``: the operator page (``deploy/static/index.html``); ``GET /docs``: OpenAPI.

Errors are JSON ``{"error": code, "detail": message}``:

==== ======================== =====================================================
400  ``no_file``              no ``file`` part in the form
400  ``unexpected_spectra``   spectra sent to an image-only model
400  ``missing_spectra``      a multimodal model got no spectra
413  ``too_large``            upload over ``max_bytes`` (stated), a request body over
                              ``2 * max_bytes + 64 KiB`` (refused from its Content-Length
                              before it is read; a chunked body is counted while it
                              streams and refused the moment it passes the limit), or
                              an image over the pixel limit (decompression bombs; 40 Mpx,
                              ``--max-megapixels`` / ``DEFECTSCOPE_MAX_MEGAPIXELS`` raise it)
415  ``not_an_image``         bytes are not an image format
422  ``corrupt_image``        recognised image format that cannot be decoded
422  ``bad_spectra``          spectra unreadable or of the wrong shape (expected shape stated)
503  ``busy``                 every inference slot and queue place is taken
==== ======================== =====================================================

Inference runs in a bounded pool: ``workers`` threads run the model and at most
``queue`` more requests wait; beyond that the service answers 503 at once
instead of piling requests up.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from starlette.exceptions import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

from defectscope.deploy.adapters import DeployError
from defectscope.deploy.images import CorruptImageError, ImageTooLargeError, NotAnImageError, decode_image_bytes
from defectscope.deploy.predictor import Predictor

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
FORM_OVERHEAD = 64 * 1024  # multipart headers and boundaries allowed on top of the files, bytes


class ApiError(Exception):
    """A request error with its HTTP status, code and message."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


class BodyTooLarge(HTTPException):
    """Raised from the request's ``receive`` when a streamed body passes the limit (an HTTP 413;
    an ``HTTPException`` so that FastAPI's body parsing passes it on instead of answering 400)."""

    def __init__(self, limit: int, note: str = "") -> None:
        super().__init__(413, f"request body passed the limit of {limit} bytes while streaming (chunked upload); "
                              "reading stopped there" + note)


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuse request bodies over ``max_body`` bytes on ``paths`` with 413.

    A declared ``Content-Length`` over the limit is refused before any byte is read. Every body
    (chunked or not) is also counted as it streams in: the moment the count passes
    ``max_body`` the request stops reading (the multipart parser never spools more than the
    limit to disk) and, if no response has started, a 413 JSON answer is sent.

    Args:
        app: the wrapped ASGI app. max_body: the limit, bytes. paths: URL paths it applies to.
    """

    #: before a refusal is answered, the rest of the body is read and thrown away (at most this many
    #: bytes or seconds; nothing is kept) so that the client, still sending, receives the 413 instead
    #: of a connection reset
    DRAIN_BYTES, DRAIN_SECONDS = 64 * 1024 * 1024, 3.0

    def __init__(self, app, max_body: int, paths: tuple[str, ...] = ("/v1/predict",), note: str = "") -> None:
        self.app, self.max_body, self.paths, self.note = app, int(max_body), tuple(paths), note

    async def _drain(self, receive) -> None:
        """Read and discard what the client still sends (bounded by :attr:`DRAIN_BYTES` / :attr:`DRAIN_SECONDS`)."""
        loop = asyncio.get_running_loop()
        deadline, got = loop.time() + self.DRAIN_SECONDS, 0
        while got < self.DRAIN_BYTES:
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            got += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, send, detail: str) -> None:
        body = json.dumps({"error": "too_large", "detail": detail + self.note}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1").strip()
        limit = self.max_body
        if length.isdigit() and int(length) > limit:
            await self._drain(receive)  # before answering: uvicorn stops reading once the answer is sent
            return await self._refuse(send, f"request body of {int(length)} bytes exceeds the limit of {limit} bytes")
        received = 0
        started = False
        more = True

        async def limited_receive():
            nonlocal received, more
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if received > limit:
                    if more:
                        await self._drain(receive)
                        more = False
                    raise BodyTooLarge(limit, self.note)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised where no handler turned it into a response
            if not started:
                await self._refuse(send, exc.detail)


class BoundedPool:
    """``workers`` inference threads plus at most ``queue`` waiting requests.

    :meth:`try_acquire` refuses (returns ``False``) when ``workers + queue`` requests
    are already admitted, so that a slow model cannot make requests pile up.
    """

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise ValueError(f"workers must be >= 1 and queue >= 0, got {workers}, {queue}")
        self.workers, self.capacity = workers, workers + queue
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="defectscope-infer")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.capacity:
                self.rejected += 1
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def read_spectra(data: bytes, name: str, expected: tuple[int, ...]) -> np.ndarray:
    """Parse a spectra upload (``.npy``, or CSV/whitespace text with one row per channel) and check its shape.

    Args:
        data: file bytes. name: its file name (``.npy`` selects NumPy format).
        expected: per-sample shape ``(C, L)`` from the model's metadata.

    Returns:
        ``float32`` array of shape ``expected``.

    Raises:
        ApiError: 422 ``bad_spectra`` when unreadable or of another shape (both shapes named).
    """
    try:
        if name.lower().endswith(".npy") or data[:6] == b"\x93NUMPY":
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            text = data.decode("utf-8").replace(",", " ")
            arr = np.loadtxt(io.StringIO(text), dtype=np.float32, ndmin=2)
    except (ValueError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise ApiError(422, "bad_spectra", f"{name}: spectra cannot be read ({exc.__class__.__name__}: {exc}); "
                       f"send a .npy array or CSV text of shape {list(expected)} (channels x samples)") from exc
    if tuple(arr.shape) != tuple(expected):
        raise ApiError(422, "bad_spectra", f"{name}: spectra shape {list(arr.shape)} does not match the model's "
                       f"expected shape {list(expected)} (channels x samples)")
    return arr.astype(np.float32)


def _jsonable(d: dict) -> dict:
    """Numpy scalars of a drift state as plain Python numbers."""
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in d.items()}


def create_app(predictor: Predictor, max_bytes: int = DEFAULT_MAX_BYTES, workers: int = 1, queue: int = 64,
               max_pixels: int | None = None):
    """Build the FastAPI application around one loaded predictor.

    Args:
        predictor: a :class:`~defectscope.deploy.predictor.Predictor` (PyTorch or ONNX Runtime).
        max_bytes: largest accepted upload per file, bytes.
        workers: inference threads; queue: requests allowed to wait for one (503 beyond).
        max_pixels: largest decoded image, pixels (``None``: :func:`~defectscope.data.images.pixel_limit`,
            40 Mpx unless ``--max-megapixels`` / ``DEFECTSCOPE_MAX_MEGAPIXELS`` says otherwise).
    """
    from defectscope.data.images import pixel_limit

    max_pixels = pixel_limit() if max_pixels is None else max_pixels
    if max_bytes < 1 or max_pixels < 1:
        raise ValueError(f"max_bytes and max_pixels must be >= 1, got {max_bytes}, {max_pixels}")
    pool = BoundedPool(workers, queue)
    info = predictor.info
    spectra_shape = predictor.adapter.spectra_shape(info)
    alarm = predictor.drift_alarm()
    monitor = None
    if alarm is not None:
        from defectscope.deploy.drift import DriftMonitor

        monitor = DriftMonitor(alarm)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown()

    app = FastAPI(title="defectscope inference", version="1", lifespan=lifespan,
                  description=f"{info.task} model '{info.model_name}' ({predictor.backend}); classes: {', '.join(info.class_names)}")
    app.state.pool, app.state.predictor = pool, predictor
    mb = max_bytes / (1024 * 1024)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError):
        return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge):
        return JSONResponse({"error": "too_large", "detail": exc.detail}, status_code=413, headers={"connection": "close"})

    # The multipart parser spools a whole upload before the handler sees it, so a request whose declared
    # size cannot fit (image + spectra + form overhead) is refused before its body is read.
    max_body = 2 * max_bytes + FORM_OVERHEAD

    app.add_middleware(BodyLimitMiddleware, max_body=max_body,
                       note=f" (image and spectra at most {max_bytes} bytes each)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        where = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"error": "bad_request", "detail": f"malformed request ({where}); send multipart/form-data "
                             "with the image in a 'file' part"}, status_code=400)

    async def _read_limited(upload: UploadFile) -> bytes:
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ApiError(413, "too_large", f"{upload.filename}: upload exceeds the limit of {max_bytes} bytes ({mb:g} MiB)")
        return data

    def _infer(data: bytes, name: str, spectra: np.ndarray | None) -> dict:
        notes: list[str] = []
        try:
            image = decode_image_bytes(data, name, max_pixels=max_pixels, notes=notes)
        except NotAnImageError as exc:
            raise ApiError(415, "not_an_image", str(exc)) from exc
        except ImageTooLargeError as exc:
            raise ApiError(413, "too_large", str(exc)) from exc
        except CorruptImageError as exc:
            raise ApiError(422, "corrupt_image", str(exc)) from exc
        try:
            ans = predictor.answers([image], None if spectra is None else [spectra], with_features=monitor is not None)[0]
        except DeployError as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc
        feats, stats = ans.pop("features", None), ans.pop("image_statistics", None)
        if monitor is not None and feats is not None:
            channels = {"features": feats[None], "image_statistics": None if stats is None else stats[None]}
            ans["drift"] = _jsonable(monitor.update(**{k: channels[k] for k in monitor.channels}))
        if notes:
            ans["warnings"] = notes
        return ans

    @app.post("/v1/predict", summary="Classify one image (plus spectra for weld models)")
    async def predict(file: UploadFile | None = File(None, description="the image (JPEG, PNG, BMP, TIFF, WebP)"),
                      spectra: UploadFile | None = File(None, description="weld models only: spectra (.npy or CSV), shape channels x samples")):
        t0 = time.perf_counter()
        if file is None:
            raise ApiError(400, "no_file", f"no image: send multipart/form-data with a 'file' part (max {mb:g} MiB)")
        data = await _read_limited(file)
        sp = None
        if spectra is not None and spectra_shape is None:
            raise ApiError(400, "unexpected_spectra", f"model '{info.model_name}' ({info.task}) takes an image only; remove the 'spectra' part")
        if spectra_shape is not None:
            if spectra is None:
                raise ApiError(400, "missing_spectra", f"model '{info.model_name}' needs a 'spectra' part of shape {list(spectra_shape)}")
            sp = read_spectra(await _read_limited(spectra), spectra.filename or "spectra", spectra_shape)
        if not pool.try_acquire():
            raise ApiError(503, "busy", f"all {pool.capacity} inference places are taken; retry shortly")
        try:
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(pool.executor, _infer, data, file.filename or "upload", sp)
        finally:
            pool.release()
        answer["total_ms"] = round((time.perf_counter() - t0) * 1000.0, 3)
        answer["model"] = predictor.identity()
        answer["file"] = file.filename
        return answer

    @app.get("/v1/drift", summary="Drift alarm: the latest window of incoming images against the training reference")
    async def drift():
        if monitor is None:
            return {"status": "unavailable", "alarm": False,
                    "detail": "this model carries no drift reference (classification runs trained with this version store one)"}
        return {**_jsonable(monitor.state()), "statistic_kind": "MMD^2 (RBF kernel) per channel (pooled backbone "
                "features; image statistics: mean intensity, contrast, sharpness), each threshold calibrated by "
                "resampling in-distribution windows of the reference at alpha / channels (Bonferroni)"}

    @app.get("/healthz", summary="Liveness, model identity and pool occupancy")
    async def healthz():
        return {"status": "ok", "model": predictor.identity(), "classes": info.class_names,
                "input_size": list(info.input_size), "spectra_shape": list(spectra_shape) if spectra_shape else None,
                "max_bytes": max_bytes, "max_pixels": max_pixels, "workers": pool.workers, "capacity": pool.capacity,
                "in_flight": pool.in_flight, "rejected": pool.rejected}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, queue: int = 64,
          max_bytes: int = DEFAULT_MAX_BYTES, threads: int | None = 2, member: str | None = None,
          max_pixels: int | None = None, runtime: str = "onnxruntime") -> None:
    """Load ``path`` (run folder or ``.onnx``; ``member``: which model of an anomaly run folder) and serve it
    with uvicorn until interrupted (``max_pixels``: see :func:`create_app`; ``runtime``: for an ``.onnx``
    file, ``onnxruntime`` (default here; the CLI's default is ``auto``), ``openvino`` or ``auto`` = the
    faster exact one measured at start (thresholded outputs may then differ from ONNX Runtime's in a few
    boundary pixels),
    :class:`~defectscope.deploy.predictor.OnnxPredictor`)."""
    import uvicorn

    from defectscope.deploy.predictor import load_predictor

    predictor = load_predictor(path, threads=threads, member=member, runtime=runtime)
    if getattr(predictor, "runtime_choice", None):
        print(f"runtime: {predictor.backend} ({predictor.runtime_choice})", flush=True)
    app = create_app(predictor, max_bytes=max_bytes, workers=workers, queue=queue, max_pixels=max_pixels)
    uvicorn.run(app, host=host, port=port, log_level="warning")
