"""Deployment: ONNX export, one predictor over PyTorch and ONNX Runtime, benchmark, inference service.

Per-task behaviour lives in :mod:`defectscope.deploy.adapters` (one adapter per task).
"""
