"""defectscope: find and classify defects on metal surfaces and laser welds.

The package is organised like the field's best toolkits:

- :mod:`defectscope.data`: readers and writers per data format, splits.
- :mod:`defectscope.models`: the backbone registry (:func:`create_backbone`) and
  one folder per method, each a plain ``torch.nn.Module``.
- :mod:`defectscope.engine`: Lightning training wrappers, the task registry and
  the run-folder contract.
- :mod:`defectscope.evaluation`: metrics per task and the HTML report.
- :mod:`defectscope.deploy`: ONNX export, runtime and the inference service.
- :mod:`defectscope.cli`: the ``defectscope`` command.
"""

__version__ = "0.1.0"
