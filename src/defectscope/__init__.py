"""defectscope: find and classify defects on metal surfaces and laser welds.

The package is organised like the field's best toolkits:

- :mod:`defectscope.data`: readers and writers per data format, splits.
- :mod:`defectscope.models`: the backbone registry (:func:`create_backbone`) and
  one folder per method, each a plain ``torch.nn.Module``.
- :mod:`defectscope.engine`: Lightning training wrappers, the task registry and
  the run-folder contract.
- :mod:`defectscope.evaluation`: metrics per task and the HTML report.
- :mod:`defectscope.deploy`: ONNX export, runtime and the inference service.
- :mod:`defectscope.api`: the Python API (``defectscope.train``, ``defectscope.load``, ...), which
  :mod:`defectscope.cli` (the ``defectscope`` command) calls.
"""

__version__ = "0.1.0"

#: the Python API (:mod:`defectscope.api`), imported on first use so ``import defectscope`` stays light
_API = ("train", "load", "predict", "evaluate", "export", "open_run", "Run")


def __getattr__(name: str):
    if name in _API:
        from defectscope import api

        return getattr(api, name)
    if name in ("Prediction", "Box"):
        from defectscope.deploy import results

        return getattr(results, name)
    raise AttributeError(f"module 'defectscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "Prediction", "Box"])


__all__ = [*_API, "Prediction", "Box", "__version__"]
