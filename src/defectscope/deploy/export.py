"""``defectscope export RUN --out model.onnx``: a self-describing ONNX file with a dynamic batch axis.

The graph is the task adapter's export module (for classification: ``image``
``[B, 3, H, W]`` float32 RGB in [0, 1] -> ``logits``, ``probabilities``), traced by
``torch.onnx.export`` at opset :data:`OPSET` with the batch axis dynamic. All
the metadata needed to use the file without the run folder (class names, input
size, normalisation, task, thresholds; weld models: spectra shape and selected
channels) goes into ``metadata_props`` (see :mod:`defectscope.deploy.adapters.base`).
The file is checked with ``onnx.checker``, then compared with PyTorch on random
inputs at batch 1 and 2, and only then moved onto ``--out`` (atomic write).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from defectscope.deploy.adapters import DeployError, ModelInfo, get_adapter
from defectscope.utils.io import atomic_path

OPSET = 17


def export_onnx(run_dir: str | Path, out: str | Path, opset: int = OPSET, check_tolerance: float = 1e-4,
                member: str | None = None) -> ModelInfo:
    """Export a run's model to ONNX.

    Args:
        run_dir: a trained run folder (``RUN/model.ckpt``).
        out: target ``.onnx`` file (written atomically).
        opset: ONNX opset version.
        check_tolerance: largest allowed difference between PyTorch and ONNX Runtime on every
            output for random inputs at batch 1 and 2, absolute for outputs up to 1 in magnitude and
            relative to the output's largest magnitude above (float32 rounding of distances of
            tens, e.g. PaDiM's Mahalanobis map, differs by a few 1e-4 in absolute terms).
        member: anomaly runs only: the run's own model name (optional).

    Returns:
        The :class:`ModelInfo` written into the file's metadata.

    Raises:
        DeployError: the task has no adapter, the model cannot run in ONNX (the adapter
            says why), or the exported graph disagrees with PyTorch beyond ``check_tolerance``.
        RunError: the run folder has no checkpoint.
    """
    import onnx

    from defectscope.deploy.predictor import _run_task, load_module, make_session

    run_dir, out = Path(run_dir), Path(out)
    adapter = get_adapter(_run_task(run_dir))
    module, info = load_module(adapter, run_dir, member)
    reason = adapter.onnx_unsupported(info)
    if reason:
        raise DeployError(f"{run_dir}: model '{info.model_name}' cannot be exported to ONNX: {reason}; serve the run folder (PyTorch) instead")
    module = module.float().eval()
    names = list(info.inputs)
    example = adapter.example_inputs(info, batch=2)
    args = tuple(torch.from_numpy(example[k]) for k in names)
    with atomic_path(out) as tmp:
        fastpath = torch.backends.mha.get_fastpath_enabled()
        # the fused "fast path" of nn.TransformerEncoderLayer / MultiheadAttention has no ONNX symbolic
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    module, args, str(tmp), input_names=names, output_names=info.outputs, opset_version=opset,
                    dynamic_axes={n: {0: "batch"} for n in names + info.outputs}, dynamo=False,
                )
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        model = onnx.load(str(tmp))
        del model.metadata_props[:]
        for k, v in info.to_metadata().items():
            model.metadata_props.add(key=k, value=v)
        model.producer_name = "defectscope"
        model.doc_string = f"defectscope {info.task} model '{info.model_name}' from {info.source}"
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(tmp))
        tmp.chmod(0o644)
        session = make_session(tmp, threads=2)
        for b in (1, 2):
            x = adapter.example_inputs(info, batch=b, seed=b)
            with torch.inference_mode():
                ref = module(*[torch.from_numpy(x[k]) for k in names])
            got = session.run(info.outputs, x)
            for name, r, g in zip(info.outputs, ref, got):
                diff = float(np.abs(r.float().numpy() - g).max())
                if g.shape != tuple(r.shape) or diff > check_tolerance * max(1.0, float(r.abs().max())):
                    raise DeployError(f"{out}: ONNX output '{name}' at batch {b} differs from PyTorch "
                                      f"(shape {g.shape} vs {tuple(r.shape)}, max |diff| {diff:.2e} > {check_tolerance:g})")
    return info
