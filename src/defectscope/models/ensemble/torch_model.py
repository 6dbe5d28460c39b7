"""An ensemble of anomaly models with normalised scores and maps.

Each member is a registered anomaly model (its own recipe block). Every member is fitted on the same
normal images ``x_fit``; its image scores and map values are then standardised by their mean and
standard deviation over the **calibration** images ``x_cal`` (normal images none of the members was
fitted on: a member that memorises its fitting images, like PatchCore, scores them near zero), and the
ensemble's score and map are the averages of the members' standardised ones. Standardising by normal
data puts members whose scales differ by orders of magnitude (PatchCore's distances ~10, PaDiM's
Mahalanobis ~100, a student-teacher's normalised errors ~0.1) on one scale (z-scores against normal data; a
plain average of the standardised scores, no weights fitted, since no defective image may be used to fit).

A member may take its own ``image_size``: the ensemble's input (``data.image_size``) is resized to it
inside the graph (bilinear), and its map back to the input size, so members that work best at
different resolutions share one run. The forward is one graph, exportable (every member must be).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import nn

from defectscope.models.anomaly import AnomalyArgs, AnomalyModel, AnomalyOutput, register_anomaly_model


def _member_args(block: dict) -> tuple[str, dict, tuple[int, int] | None]:
    """A member's recipe block -> ``(name, module arguments, own image size or None)``, validated by its ``Args``.

    Raises:
        ValueError: no ``name``, an unknown or non-exportable model, a nested ensemble, or a setting the
            member's schema refuses (named).
    """
    from defectscope.models.anomaly import anomaly_model_class

    if not isinstance(block, dict) or "name" not in block:
        raise ValueError(f"ensemble: each member is a model block with a 'name', got {block!r}")
    block = dict(block)
    size = block.pop("image_size", None)
    cls = anomaly_model_class(str(block["name"]))
    if cls.name == "ensemble":
        raise ValueError("ensemble: a member cannot be an ensemble")
    if not cls.exportable:
        raise ValueError(f"ensemble: member '{cls.name}' is not exportable ({cls.export_note}); "
                         "the ensemble's forward is one exportable graph")
    args = cls.Args(**block).module_args()
    if size is not None:
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(int(v) >= 8 for v in size)):
            raise ValueError(f"ensemble: member '{cls.name}' image_size must be [h, w] (>= 8), got {size!r}")
        size = (int(size[0]), int(size[1]))
    return cls.name, args, size


class EnsembleArgs(AnomalyArgs):
    """Recipe block ``model`` for ``name: ensemble``: ``members`` = a list of member model blocks (each with its
    ``name`` and settings, optionally ``image_size: [h, w]``)."""

    name: str = "ensemble"
    members: list[dict[str, Any]] = [{"name": "padim"}, {"name": "patchcore"}]
    pretrained: bool = True

    @field_validator("members")
    @classmethod
    def _check_members(cls, v: list[dict]) -> list[dict]:
        if len(v) < 2:
            raise ValueError("an ensemble needs at least 2 members")
        for block in v:
            _member_args(block)
        return v


@register_anomaly_model
class Ensemble(AnomalyModel):
    """The mean of the members' calibration-standardised scores and maps (see the module docstring).

    Args:
        members: member blocks (recipe form or the stored form ``{"name", "args", "image_size"}``).
        pretrained: ``False`` builds every member without its pretrained weights (the loader's case: the
            weights come from the checkpoint).
        tile, tile_stride: see :class:`~defectscope.models.anomaly.AnomalyModel` (members may tile themselves).

    Forward: ``[B, 3, H, W]`` in [0, 1] -> ``(pred_score [B], anomaly_map [B, H, W])`` in standard deviations
    of the calibration images.

    Raises:
        ValueError: fewer than 2 members, or a member that cannot be built.
    """

    name = "ensemble"
    Args = EnsembleArgs

    def __init__(self, members: list[dict], pretrained: bool = True, tile: list[int] | None = None,
                 tile_stride: list[int] | None = None) -> None:
        super().__init__(tile, tile_stride)
        from defectscope.models.anomaly import anomaly_model_class

        if len(members) < 2:
            raise ValueError("ensemble: needs at least 2 members")
        stored, mods, self.sizes = [], [], []
        for block in members:
            if "args" in block:  # stored form
                name, args, size = str(block["name"]), dict(block["args"]), block.get("image_size")
                size = tuple(int(v) for v in size) if size else None
            else:
                name, args, size = _member_args(block)
            if not pretrained and "pretrained" in args:
                args["pretrained"] = False
            mods.append(anomaly_model_class(name)(**args))
            stored.append({"name": name, "args": dict(mods[-1].args), "image_size": list(size) if size else None})
            self.sizes.append(size)
        self.members = nn.ModuleList(mods)
        m = len(mods)
        for key, val in (("score_mean", 0.0), ("score_std", 1.0), ("map_mean", 0.0), ("map_std", 1.0)):
            self.register_buffer(key, torch.full((m,), val))
        self.args.update(members=stored, pretrained=bool(pretrained))
        self.eval()

    def _member_out(self, i: int, x: torch.Tensor) -> AnomalyOutput:
        size = self.sizes[i]
        if size is None or tuple(x.shape[-2:]) == size:
            return self.members[i](x)
        out = self.members[i](F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        amap = F.interpolate(out.anomaly_map[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return AnomalyOutput(out.pred_score, amap)

    @staticmethod
    def _resize_uint8(x: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
        if size is None or tuple(x.shape[-2:]) == size:
            return x
        out = []
        for i in range(0, len(x), 16):
            t = torch.from_numpy(np.ascontiguousarray(x[i : i + 16])).float() / 255.0
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            out.append((t * 255.0).round().clamp(0, 255).to(torch.uint8).numpy())
        return np.concatenate(out)

    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, batch_size: int = 4, **context) -> dict:
        """Fit every member on ``x_fit``, then standardise each by its scores / map values on ``x_cal``.

        Returns:
            ``members``: each member's own fit facts with its calibration ``score_mean`` / ``score_std``.

        Raises:
            ValueError: no calibration image (the standardisation needs normal images the members did not fit).
        """
        if x_cal is None or len(x_cal) < 2:
            raise ValueError("ensemble: needs at least 2 calibration images (data.calibration_fraction > 0) "
                             "to standardise its members")
        infos = []
        for i, member in enumerate(self.members):
            print(f"ensemble: member {i + 1}/{len(self.members)} '{member.name}'"
                  + (f" at {self.sizes[i][0]} x {self.sizes[i][1]}" if self.sizes[i] else ""), flush=True)
            info = member.fit(self._resize_uint8(x_fit, self.sizes[i]), self._resize_uint8(x_cal, self.sizes[i]),
                              batch_size=batch_size, **context)
            member.eval()
            scores, maps = [], []
            with torch.no_grad():
                for j in range(0, len(x_cal), batch_size):
                    xb = torch.from_numpy(np.ascontiguousarray(x_cal[j : j + batch_size])).float() / 255.0
                    out = self._member_out(i, xb)
                    scores.append(out.pred_score)
                    maps.append(out.anomaly_map.flatten())
            s, mp = torch.cat(scores).double(), torch.cat(maps).double()
            self.score_mean[i], self.score_std[i] = float(s.mean()), float(s.std().clamp_min(1e-12))
            self.map_mean[i], self.map_std[i] = float(mp.mean()), float(mp.std().clamp_min(1e-12))
            infos.append({"name": member.name, **(info or {}),
                          "score_mean": float(self.score_mean[i]), "score_std": float(self.score_std[i])})
        return {"members": infos, "weights": "; ".join(sorted({str(i.get("weights")) for i in infos}))}

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        score, amap = None, None
        for i in range(len(self.members)):
            out = self._member_out(i, x)
            s = (out.pred_score - self.score_mean[i]) / self.score_std[i]
            m = (out.anomaly_map - self.map_mean[i]) / self.map_std[i]
            score = s if score is None else score + s
            amap = m if amap is None else amap + m
        n = float(len(self.members))
        return AnomalyOutput(score / n, amap / n)
