"""Typed results of :meth:`defectscope.deploy.predictor.Predictor.predict` (the Python API's answers).

One :class:`Prediction` per image, whatever the task: the fields a task does not produce stay at
their defaults (``mask`` / ``boxes`` / ``anomaly_map`` / ``attention``). The JSON-ready answer the
service returns (the task adapter's ``postprocess``) is kept in :attr:`Prediction.answer`, and
``prediction["class"]`` reads it, so code written against the service's JSON keeps working.

No torch here: ONNX Runtime processes import this module too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Box:
    """One detected defect.

    Attributes:
        label: class name. class_index: its index in the model's ``class_names``.
        score: detection confidence in [0, 1].
        xyxy: ``(xmin, ymin, xmax, ymax)`` in pixels of the input image (float).
    """

    label: str
    class_index: int
    score: float
    xyxy: tuple[float, float, float, float]


@dataclass
class Prediction:
    """What a trained model says about one image (any task).

    Attributes:
        label: the predicted class (classification, weld, multicnn: the arg-max class; segmentation
            and anomaly: ``"defective"`` / ``"good"``; detection: the class of the best box, ``None``
            without a box).
        class_index: index of ``label`` in the model's classes (``None`` without one).
        score: the probability of ``label`` (classifiers), the image score (segmentation, anomaly)
            or the best box's score (detection; 0 without a box).
        scores: class probabilities ``{class: p}`` (``{}`` for tasks without them).
        decision: ``"accept"`` / ``"reject"`` by the run's stored operating point, or ``None`` when the
            run has none. defect_score: the score that decision thresholds (``1 - p(OK class)``).
        mask: segmentation: ``bool [K, H, W]`` per mask class at the input image's size.
        boxes: detection: the boxes with score >= the run's ``score_threshold``, best first.
        anomaly_map: anomaly: ``float32 [H, W]`` (when the adapter provides it).
        attention: weld fusion models with cross-attention: the adapter's attention summary.
        latency_ms: model time of the image's batch divided by the batch size.
        image_size: ``(H, W)`` of the input image in pixels (``mask`` and ``boxes`` are in its pixels).
        answer: the JSON-ready answer (the service's body without ``model`` / ``file``).
    """

    label: str | None
    class_index: int | None
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    decision: str | None = None
    defect_score: float | None = None
    mask: np.ndarray | None = None
    boxes: list[Box] = field(default_factory=list)
    anomaly_map: np.ndarray | None = None
    attention: dict | None = None
    latency_ms: float = 0.0
    image_size: tuple[int, int] | None = None
    answer: dict = field(default_factory=dict, repr=False)

    # the service's JSON keys, read-only (prediction["class"], prediction.get("boxes"))
    def __getitem__(self, key: str) -> Any:
        return self.answer[key]

    def __contains__(self, key: object) -> bool:
        return key in self.answer

    def get(self, key: str, default: Any = None) -> Any:
        return self.answer.get(key, default)

    def keys(self):
        return self.answer.keys()

    @classmethod
    def from_answer(cls, answer: dict, outputs: dict[str, np.ndarray] | None = None,
                    image_size: tuple[int, int] | None = None) -> "Prediction":
        """Build from an adapter's answer (and the sample's raw outputs, for maps not in the answer).

        Segmentation masks are decoded from the answer's run-length strings (exact: they encode the
        thresholded masks); detection boxes from its ``boxes`` list.
        """
        mask = None
        if answer.get("masks"):
            from defectscope.data.rle import rle_decode

            mask = np.stack([rle_decode(m["rle"], tuple(m["size"])).astype(bool) for m in answer["masks"]])
        boxes = [Box(b["class"], int(b["class_index"]), float(b["score"]), tuple(float(v) for v in b["box"]))
                 for b in answer.get("boxes") or []]
        amap = None
        if outputs is not None and "anomaly_map" in outputs:
            amap = np.asarray(outputs["anomaly_map"], np.float32)
        return cls(label=answer.get("class"), class_index=answer.get("class_index"), score=float(answer.get("score") or 0.0),
                   scores=dict(answer.get("probabilities") or {}), decision=answer.get("decision"),
                   defect_score=answer.get("defect_score"), mask=mask, boxes=boxes, anomaly_map=amap,
                   attention=answer.get("attention"), latency_ms=float(answer.get("latency_ms", 0.0)),
                   image_size=image_size, answer=answer)
