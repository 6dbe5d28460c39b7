"""One predictor API over a run folder (PyTorch) and an exported ``.onnx`` file (ONNX Runtime).

    >>> p = load_predictor("runs/neu")            # PyTorch, from RUN/model.ckpt
    >>> q = load_predictor("model.onnx")          # ONNX Runtime, metadata only
    >>> p.predict(["crazing_1.jpg"])[0].label     # same inputs, same outputs
    'crazing'

This is the one way a trained run is executed: ``defectscope predict``, ``evaluate``, ``export``,
``benchmark``, ``serve``, ``inspect`` and the Python API (:mod:`defectscope.api`) all go through
it. Both backends take the same inputs (image files, encoded bytes, ``uint8``/float arrays
``[H, W, 3]``; spectra arrays for multimodal tasks) and return the same answers:
:meth:`Predictor.predict` gives typed :class:`~defectscope.deploy.results.Prediction` objects,
:meth:`Predictor.answers` the JSON-ready dicts the service sends (both built by the task's
adapter). The batched tensor function is :meth:`Predictor.run`: named ``float32`` arrays
``[B, ...]`` in, named arrays out; :meth:`Predictor.outputs` runs it over many images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from defectscope.deploy.adapters import DeployError, ModelInfo, TaskAdapter, file_sha256, get_adapter
from defectscope.deploy.images import as_rgb_uint8
from defectscope.deploy.results import Prediction

ImageLike = str | Path | bytes | np.ndarray


class Predictor:
    """Base class: a model, its :class:`ModelInfo` and its task adapter.

    Attributes:
        info: what the model takes and returns.
        adapter: the task's :class:`TaskAdapter`.
        backend: ``pytorch`` or ``onnxruntime``.
    """

    backend = ""
    #: the run folder of a PyTorch predictor (``None`` for an ONNX file)
    run_dir: Path | None = None

    def __init__(self, info: ModelInfo, adapter: TaskAdapter) -> None:
        self.info = info
        self.adapter = adapter

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batched forward pass: ``{name: float32 [B, *shape]}`` -> ``{output name: array [B, ...]}``."""
        raise NotImplementedError

    def identity(self) -> dict:
        """Model identity for responses: task, model, source file, SHA-256 prefix, backend."""
        return self.info.identity(self.backend)

    def drift_alarm(self):
        """The :class:`~defectscope.deploy.drift.DriftAlarm` the model carries (classifiers trained with a
        validation part of >= 64 images: the graph outputs ``features``), or ``None``.

        Raises:
            ValueError: a stored reference that does not rebuild (names the model file and the field).
        """
        info = self.info
        if not info.extra.get("drift_reference") or "features" not in info.outputs or "image" not in info.inputs:
            return None
        from defectscope.deploy.drift import DriftAlarm

        return DriftAlarm.from_dict(info.extra["drift_reference"], f"{info.source}: drift_reference")

    def prepare(self, images: Sequence[ImageLike], spectra: Sequence[np.ndarray | None] | None = None
                ) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        """Decode and preprocess a list of images into one batch.

        Returns:
            ``(batched inputs, decoded uint8 images)``.

        Raises:
            ImageReadError: an unreadable image (named); DeployError: spectra problems.
        """
        decoded = [as_rgb_uint8(im) for im in images]
        spectra = list(spectra) if spectra is not None else [None] * len(decoded)
        if len(spectra) != len(decoded):
            raise DeployError(f"{len(decoded)} images but {len(spectra)} spectra; give one spectra array per image")
        per = [self.adapter.preprocess(self.info, im, sp) for im, sp in zip(decoded, spectra)]
        batch = {k: np.stack([p[k] for p in per]).astype(np.float32, copy=False) for k in self.info.inputs}
        return batch, decoded

    def run_batches(self, inputs: dict[str, np.ndarray], batch_size: int = 32) -> dict[str, np.ndarray]:
        """:meth:`run` over already prepared inputs ``{name: float32 [N, ...]}`` in batches; outputs ``[N, ...]``."""
        n = len(next(iter(inputs.values()))) if inputs else 0
        parts = [self.run({k: v[i : i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def outputs(self, images: Sequence[ImageLike], spectra: Sequence[np.ndarray | None] | None = None,
                batch_size: int = 32) -> dict[str, np.ndarray]:
        """The model's raw outputs for many images, batched: ``{output name: array [N, ...]}`` (what
        ``evaluate`` scores; :meth:`predict` turns the same outputs into answers).

        Raises:
            ImageReadError: an unreadable image (named); DeployError: spectra problems.
        """
        parts: list[dict[str, np.ndarray]] = []
        spectra = list(spectra) if spectra is not None else None
        for i in range(0, len(images), batch_size):
            batch, _ = self.prepare(images[i : i + batch_size], spectra[i : i + batch_size] if spectra is not None else None)
            parts.append(self.run(batch))
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def answers(self, images: Sequence[ImageLike], spectra: Sequence[np.ndarray | None] | None = None,
                batch_size: int = 32, with_features: bool = False) -> list[dict]:
        """JSON-ready answers (the service's body), one dict per image, in order.

        Each answer has the adapter's fields (``class``, ``probabilities``, ``overlay_png``, ...)
        plus ``latency_ms``: the model time of its batch divided by the batch size. With
        ``with_features`` and a model that outputs ``features`` (classifiers with a drift
        reference), ``features`` holds the pooled feature vector ``float32 [C]`` and
        ``image_statistics`` the drift alarm's image statistics ``float64 [3]`` of the model input
        (:func:`defectscope.deploy.drift.image_statistics`).
        """
        return [a for a, _, _ in self._answers(images, spectra, batch_size, with_features)]

    def predict(self, images: Sequence[ImageLike], spectra: Sequence[np.ndarray | None] | None = None,
                batch_size: int = 32, with_features: bool = False) -> list[Prediction]:
        """Typed results, one :class:`~defectscope.deploy.results.Prediction` per image, in order
        (``label``, ``scores``, ``decision``, ``mask`` / ``boxes`` / ``anomaly_map``; the JSON answer
        of :meth:`answers` in ``.answer``, also readable as ``prediction["class"]``).

        Raises:
            ImageReadError: an unreadable image (named); DeployError: spectra missing, unexpected or
                of the wrong shape.
        """
        return [Prediction.from_answer(a, o, hw) for a, o, hw in self._answers(images, spectra, batch_size, with_features)]

    def _answers(self, images, spectra, batch_size, with_features):
        spectra = list(spectra) if spectra is not None else None
        for i in range(0, len(images), batch_size):
            sp = spectra[i : i + batch_size] if spectra is not None else None
            batch, decoded = self.prepare(images[i : i + batch_size], sp)
            t0 = time.perf_counter()
            out = self.run(batch)
            ms = (time.perf_counter() - t0) * 1000.0 / len(decoded)
            stats = None
            if with_features and "features" in out and "image" in batch:
                from defectscope.deploy.drift import image_statistics

                stats = image_statistics(batch["image"])
            for j, im in enumerate(decoded):
                one = {k: v[j] for k, v in out.items()}
                ans = self.adapter.postprocess(self.info, one, im)
                ans["latency_ms"] = round(ms, 3)
                if with_features and "features" in out:
                    ans["features"] = np.asarray(out["features"][j], dtype=np.float32)
                    if stats is not None:
                        ans["image_statistics"] = stats[j]
                yield ans, one, tuple(int(v) for v in im.shape[:2])


class TorchPredictor(Predictor):
    """PyTorch eager fp32 on a run folder (``RUN/model.ckpt``).

    Args:
        run_dir: a trained run folder.
        threads: ``torch.set_num_threads`` value (``None``: leave as is).
        member: which model of a run (``anomaly``: optional, the run's own model name; a run
            holds one anomaly model); ``None`` = the adapter's default.
    """

    backend = "pytorch"

    def __init__(self, run_dir: str | Path, threads: int | None = None, member: str | None = None) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        run_dir = Path(run_dir)
        self.run_dir = run_dir
        if not (run_dir / "model.ckpt").is_file() and (run_dir / "crossval.json").is_file():
            from defectscope.engine.run import RunError

            raise RunError(f"{run_dir}: a cross-validation run without a refit model (no model.ckpt); load one fold's "
                           f"run folder ({run_dir / 'folds' / '1'}) or train with --folds 1")
        task = _run_task(run_dir)
        adapter = get_adapter(task)
        self.module, info = load_module(adapter, run_dir, member)
        super().__init__(info, adapter)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            outs = self.module(*[torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in self.info.inputs])
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        return {k: o.float().numpy() for k, o in zip(self.info.outputs, outs)}


RUNTIMES = ("onnxruntime", "openvino", "auto")


class OnnxPredictor(Predictor):
    """An exported model (``defectscope export``) on ONNX Runtime or OpenVINO (CPU, exact fp32); needs
    no run folder.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads of the session (``None``: ONNX Runtime's default).
        runtime: ``onnxruntime`` (default), ``openvino`` (the same file compiled by OpenVINO with
            ``INFERENCE_PRECISION_HINT=f32``: exact, never bf16) or ``auto``: both are timed on a few
            batch-1 forward passes of random inputs here and the faster one is kept
            (:attr:`runtime_choice` says what was measured). ``serve`` and ``inspect`` use ``auto``.

    Raises:
        DeployError: not a defectscope export (metadata missing), no adapter for its task, or an
            unknown ``runtime``.
    """

    backend = "onnxruntime"
    runtime_choice: dict | None = None

    def __init__(self, path: str | Path, threads: int | None = None, runtime: str = "onnxruntime") -> None:
        if runtime not in RUNTIMES:
            raise DeployError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
        path = Path(path)
        if not path.is_file():
            raise DeployError(f"{path}: ONNX file not found")
        try:
            self.session = make_session(path, threads)
        except Exception as exc:  # onnxruntime raises its own (pybind) types for every kind of bad file
            first = (str(exc).splitlines() or [""])[0][:200]
            raise DeployError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: {first}); "
                              "give a file written by 'defectscope export' or a run folder") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        info = ModelInfo.from_metadata(meta, str(path))
        info.source = str(path.resolve())
        info.extra.setdefault("onnx_sha256", file_sha256(path))
        self.output_names = [o.name for o in self.session.get_outputs()]
        super().__init__(info, get_adapter(info.task))
        self._ov = None
        if runtime != "onnxruntime":
            try:
                self._ov = OpenVinoModel(path, threads, self.output_names)
            except Exception as exc:  # noqa: BLE001 - OpenVINO missing or unable to compile this graph
                if runtime == "openvino":
                    raise DeployError(f"{path}: OpenVINO cannot run this model ({exc.__class__.__name__}: "
                                      f"{(str(exc).splitlines() or [''])[0][:200]})") from None
                self.runtime_choice = {"chosen": "onnxruntime", "why": f"OpenVINO unavailable: {exc.__class__.__name__}"}
        if runtime == "openvino":
            self.backend = "openvino"
        elif runtime == "auto" and self._ov is not None:
            self._choose_runtime()

    def _choose_runtime(self, reps: int = 7) -> None:
        """Time both runtimes on batch-1 random inputs (median of ``reps`` after 2 warm-ups) and keep
        the faster; their outputs are checked to agree (max |difference| <= 1e-3) before OpenVINO is kept."""
        import time

        x = self.adapter.example_inputs(self.info, 1)
        ms = {}
        outs = {}
        for name, fn in (("onnxruntime", self._run_ort), ("openvino", self._ov.run)):
            for _ in range(2):
                outs[name] = fn(x)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
            ms[name] = round(1000 * float(np.median(times)), 2)
        diff = max(float(np.max(np.abs(outs["onnxruntime"][k].astype(np.float64) - outs["openvino"][k])))
                   if outs["onnxruntime"][k].size else 0.0 for k in self.output_names)
        chosen = "openvino" if ms["openvino"] < ms["onnxruntime"] and diff <= 1e-3 else "onnxruntime"
        self.backend = chosen
        self.runtime_choice = {"chosen": chosen, "batch1_ms": ms, "max_abs_diff": diff}

    def identity(self) -> dict:
        ident = super().identity()
        ident["onnx_sha256"] = self.info.extra.get("onnx_sha256", "")[:16]
        return ident

    def _run_ort(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()})
        return dict(zip(self.output_names, outs))

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.backend == "openvino":
            return self._ov.run(inputs)
        return self._run_ort(inputs)


class OpenVinoModel:
    """An ONNX file compiled by OpenVINO for the CPU, by default in exact fp32
    (``INFERENCE_PRECISION_HINT=f32``; on CPUs with native bf16 OpenVINO's default would compute in
    bf16); one infer request per calling thread (the service runs several inference threads).

    Args:
        path: the ``.onnx`` file; output_names: the ONNX graph's output names (OpenVINO may give an
            output several tensor names; the ONNX one is looked up). threads: ``INFERENCE_NUM_THREADS``
            (``None``: OpenVINO's default). precision: ``INFERENCE_PRECISION_HINT``.

    Raises:
        ImportError: openvino not installed; KeyError: an output not found in the compiled model.
    """

    def __init__(self, path: Path, threads: int | None, output_names: list[str], precision: str = "f32") -> None:
        import threading

        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        outputs = list(self.compiled.outputs)
        # OpenVINO may give an output several tensor names (a graph optimisation merges tensors); take the ONNX one
        self.index = {}
        for name in output_names:
            j = next((i for i, o in enumerate(outputs) if name in o.get_names()), None)
            if j is None:
                raise KeyError(f"output {name!r} not found in the compiled model")
            self.index[name] = j
        self.outputs = outputs
        self._local = threading.local()

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        res = request.infer({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in inputs.items()})
        return {name: np.array(res[self.outputs[j]], copy=True) for name, j in self.index.items()}


def make_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with all graph optimisations and ``threads`` intra-op threads.

    The intra-op pool threads do not spin-wait for work (``session.intra_op.allow_spinning = 0``):
    on shared, oversubscribed cores spinning threads took the CPU from the thread with work, and
    2 threads ran at half the images/s of 1 thread (docs/deploy.md, "Throughput: Ray vs a plain loop":
    237 vs 477 images/s model-only with spinning, 472 without).
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _run_task(run_dir: Path) -> str:
    from defectscope.engine.run import RunFolder

    payload_task = None
    rf = RunFolder(run_dir)
    if rf.config_path.is_file():
        payload_task = rf.read_config().get("task")
    if not payload_task:
        payload_task = rf.load_model_payload().get("task")
    return payload_task


def load_module(adapter: TaskAdapter, run_dir: Path, member: str | None = None):
    """``adapter.load_torch(run_dir)``, passing ``member`` only when given.

    Raises:
        DeployError: ``member`` given to a task whose runs hold one model.
    """
    if member is None:
        return adapter.load_torch(run_dir)
    import inspect

    if "member" not in inspect.signature(adapter.load_torch).parameters:
        raise DeployError(f"{run_dir}: task '{adapter.task}' runs hold one model; remove member '{member}'")
    return adapter.load_torch(run_dir, member=member)


def load_predictor(path: str | Path, threads: int | None = None, member: str | None = None,
                   runtime: str = "onnxruntime") -> Predictor:
    """A run folder -> :class:`TorchPredictor`; an ``.onnx`` file -> :class:`OnnxPredictor` on
    ``runtime`` (``onnxruntime``, ``openvino`` or ``auto``: the faster of the two, measured here).

    ``member``: anomaly run folders only, the run's own model name (optional).

    Raises:
        DeployError: the path is neither, or ``member`` with an ONNX file; RunError: the run folder is incomplete.
    """
    path = Path(path)
    if not path.exists():
        from defectscope.engine.run import RunError

        raise RunError(f"{path}: not found; give a run folder from 'defectscope train' (config.yaml, model.ckpt) "
                       "or an .onnx file from 'defectscope export'")
    if path.is_dir():
        return TorchPredictor(path, threads, member)
    if member is not None:
        raise DeployError(f"{path}: an ONNX file holds one model; 'member' applies to run folders only")
    if path.suffix.lower() == ".onnx":
        return OnnxPredictor(path, threads, runtime)
    raise DeployError(f"{path}: expected a run folder (with model.ckpt) or an .onnx file from 'defectscope export'")
