"""Student-teacher feature regression: the student/teacher part of EfficientAD-S on a CPU budget.

Batzner, Heckler, König, "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level
Latencies", WACV 2024. What is taken from the paper, and what differs:

- **teacher**: frozen pretrained features. EfficientAD distils a WideResNet-101 into a
  small PDN teacher; no WideResNet weights exist here, so the teacher is EfficientNet-Lite0 (ImageNet,
  :class:`~defectscope.models.anomaly.StageFeatures`, stages 2 + 4, stride 8, 152 channels);
- **normalised teacher features**: each teacher channel is
  standardised by its mean and standard deviation over the fitting images;
- **student**: a small patch description network (PDN-style: 3 x 3 convolutions with ReLU,
  2 x 2 average pooling to stride 8, ``student_depth`` more at stride 8, a 1 x 1 projection to the teacher's
  channels; receptive field 70 px at depth 3, EfficientAD's PDN-S has 33 px at stride 4), trained from
  scratch on the normal images to regress the normalised teacher features, with the paper's **hard
  feature loss** (the mean of the squared differences at or above their ``hard_quantile``,
  0.999); Adam, a fixed number of ``steps`` (never cut by the clock), learning rate divided by 10 at
  95 % of them (the paper's schedule, shortened). The ImageNet penalty (needs ImageNet images) and the
  autoencoder branch are left out;
- **anomaly map**: the per-position mean over channels of the squared difference
  ``(T_hat - S)^2``, normalised by the calibration images' quantiles (``q_a`` = 0.9 and
  ``q_b`` = 0.995 quantiles of the map values, ``0.1 (m - q_a) / (q_b - q_a)``), upsampled to the
  input and Gaussian-smoothed (``blur_sigma`` px); image score = the largest normalised cell
  inside ``score_border`` cells.

The forward (teacher, normalisation, student, difference) is the exported graph.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from pydantic import Field
from torch import nn

from defectscope.models.anomaly import (
    AnomalyModel,
    AnomalyOutput,
    FeatureAnomalyArgs,
    StageFeatures,
    inner_max,
    register_anomaly_model,
    upsample_map,
)


class StudentPDN(nn.Module):
    """PDN-style student (EfficientAD's patch description network, stride 8 here).

    ``conv3x3(3 -> c/2) - ReLU - pool2 - conv3x3(c/2 -> c) - ReLU - pool2 - conv3x3(c -> c) - ReLU - pool2 -
    [conv3x3(c -> c) - ReLU] x depth - conv1x1(c -> out)``; receptive field ``22 + 16 depth`` px (70 px at depth 3).

    Args:
        out_channels: the teacher's channels ``D``; channels: ``c``; depth: 3 x 3 convolutions at stride 8.

    Forward: ``[B, 3, H, W]`` (normalised images) -> ``[B, D, H // 8, W // 8]``.
    """

    def __init__(self, out_channels: int, channels: int = 64, depth: int = 3) -> None:
        super().__init__()
        c = int(channels)
        layers: list[nn.Module] = [
            nn.Conv2d(3, c // 2, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(c // 2, c, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2),
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True), nn.AvgPool2d(2)]
        for _ in range(int(depth)):
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers, nn.Conv2d(c, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hard_feature_loss(diff2: torch.Tensor, hard_quantile: float) -> torch.Tensor:
    """EfficientAD's hard feature loss: the mean of the squared differences ``diff2`` (any shape) at or above their
    ``hard_quantile`` (0 = the plain mean). Computed with ``topk`` (``torch.quantile`` refuses > 16 M values)."""
    flat = diff2.reshape(-1)
    if hard_quantile <= 0:
        return flat.mean()
    k = max(1, int(math.ceil((1.0 - hard_quantile) * flat.numel() - 1e-6)))  # (1 - 0.99) * 1000 is 10.000000000000009
    return flat.topk(k, sorted=False).values.mean()


class StudentTeacherArgs(FeatureAnomalyArgs):
    """Recipe block ``model`` for ``name: student_teacher`` (see :class:`StudentTeacher`)."""

    name: str = "student_teacher"
    student_channels: int = Field(64, ge=2)
    student_depth: int = Field(3, ge=0)
    steps: int = Field(400, ge=1)
    train_batch: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    hard_quantile: float = Field(0.999, ge=0, lt=1)
    map_quantiles: tuple[float, float] = (0.9, 0.995)
    score_border: int = Field(0, ge=0)
    blur_sigma: float = Field(4.0, ge=0)
    seed: int = 0


@register_anomaly_model
class StudentTeacher(AnomalyModel):
    """EfficientAD-S's student/teacher part with an EfficientNet-Lite0 teacher (see the module docstring).

    Args:
        backbone, layers, pretrained, weights: the frozen teacher (:class:`~defectscope.models.anomaly.StageFeatures`,
            no local averaging).
        student_channels, student_depth: width ``c`` and stride-8 depth of :class:`StudentPDN`.
        steps, train_batch, lr, weight_decay: the student's training (Adam; ``lr / 10`` for the last 5 %).
        hard_quantile: EfficientAD's hard-feature quantile (0 = plain mean squared error).
        map_quantiles: ``(a, b)`` quantiles of the calibration maps' values that map to 0 and 0.1.
        score_border, blur_sigma: as :class:`~defectscope.models.patchcore.PatchCore`.
        seed: seed of the student's initialisation and of the training batches.
        tile, tile_stride: see :class:`~defectscope.models.anomaly.AnomalyModel`.

    Forward: ``[B, 3, H, W]`` in [0, 1] -> ``(pred_score [B], anomaly_map [B, H, W])`` (normalised units:
    0.1 = the calibration maps' ``b`` quantile).

    Raises:
        ValueError: ``map_quantiles`` not ``0 <= a < b <= 1``.
    """

    name = "student_teacher"
    Args = StudentTeacherArgs

    def __init__(self, backbone: str = "efficientnet_lite0", layers: list[int] | tuple[int, ...] = (2, 4),
                 pretrained: bool = True, weights: str | None = None, student_channels: int = 64, student_depth: int = 3,
                 steps: int = 400,
                 train_batch: int = 8, lr: float = 1e-3, weight_decay: float = 1e-5, hard_quantile: float = 0.999,
                 map_quantiles: tuple[float, float] | list[float] = (0.9, 0.995), score_border: int = 0,
                 blur_sigma: float = 4.0, seed: int = 0, tile: list[int] | None = None,
                 tile_stride: list[int] | None = None) -> None:
        super().__init__(tile, tile_stride)
        qa, qb = (float(v) for v in map_quantiles)
        if not 0 <= qa < qb <= 1:
            raise ValueError(f"student_teacher: map_quantiles must be 0 <= a < b <= 1, got {list(map_quantiles)}")
        self.teacher = StageFeatures(backbone, layers, pretrained, weights, neighbourhood=1)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        d = self.teacher.dim
        with torch.random.fork_rng():
            torch.manual_seed(int(seed))
            self.student = StudentPDN(d, student_channels, student_depth)
        self.register_buffer("t_mean", torch.zeros(1, d, 1, 1))
        self.register_buffer("t_std", torch.ones(1, d, 1, 1))
        self.register_buffer("q_a", torch.tensor(0.0))
        self.register_buffer("q_b", torch.tensor(1.0))
        self.steps, self.train_batch, self.lr, self.weight_decay = int(steps), int(train_batch), float(lr), float(weight_decay)
        self.hard_quantile, self.map_quantiles = float(hard_quantile), (qa, qb)
        self.score_border, self.blur_sigma, self.seed = int(score_border), float(blur_sigma), int(seed)
        self.args.update(backbone=backbone, layers=list(self.teacher.layers), pretrained=bool(pretrained),
                         weights=weights, student_channels=int(student_channels),
                         student_depth=int(student_depth), steps=self.steps,
                         train_batch=self.train_batch, lr=self.lr, weight_decay=self.weight_decay,
                         hard_quantile=self.hard_quantile, map_quantiles=[qa, qb], score_border=self.score_border,
                         blur_sigma=self.blur_sigma, seed=self.seed)
        self.eval()

    def _student_in(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.teacher.backbone
        return (x - bb.mean) / bb.std

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised teacher features ``[B, D, h, w]``."""
        return (self.teacher(x) - self.t_mean) / self.t_std

    def _distance(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position mean squared teacher-student difference ``[B, 1, h, w]`` (raw, not normalised)."""
        t = self._teacher(x)
        s = self.student(self._student_in(x))
        if s.shape[-2:] != t.shape[-2:]:  # input sides not multiples of 8: align the student to the teacher grid
            s = torch.nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        return ((t - s) ** 2).mean(dim=1, keepdim=True)

    def fit(self, x_fit: np.ndarray, x_cal: np.ndarray | None = None, batch_size: int = 4, progress: bool = False,
            **context) -> dict:
        """Train the student on normal uint8 images ``x_fit [N, 3, H, W]``; set the map quantiles on ``x_cal``
        (``x_fit`` when ``None``).

        Progress (the hard loss) is printed every 10 % of the steps (``progress`` is accepted and not needed).

        Returns:
            ``images``, ``steps``, ``grid``, ``loss_first`` / ``loss_last`` (mean of the first / last 5 % of the
            steps), ``train_seconds``, ``q_a`` / ``q_b``, ``weights``.

        Raises:
            ValueError: no fitting image.
        """
        if len(x_fit) == 0:
            raise ValueError("student_teacher: no fitting image")
        from defectscope.models.patchcore.torch_model import PatchCore

        t0 = time.perf_counter()
        self.eval()
        with torch.no_grad():  # teacher features of every fitting window, once
            xs = list(PatchCore.windows(self, x_fit, batch_size))
            feats = [self.teacher(xb) for xb in xs]
            f = torch.cat(feats)
            self.t_mean = f.mean(dim=(0, 2, 3), keepdim=True)
            self.t_std = f.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
            targets = (f - self.t_mean) / self.t_std
            images = torch.cat(xs)
            del feats, f
        n = len(images)
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.student.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, int(0.95 * self.steps))], gamma=0.1)
        self.student.train()
        losses = []
        every = max(1, self.steps // 10)
        with torch.enable_grad():
            for step in range(self.steps):
                idx = torch.randint(n, (min(self.train_batch, n),), generator=g)
                s = self.student(self._student_in(images[idx]))
                t = targets[idx]
                if s.shape[-2:] != t.shape[-2:]:
                    s = torch.nn.functional.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
                loss = hard_feature_loss((t - s) ** 2, self.hard_quantile)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                if (step + 1) % every == 0 or step == 0:
                    print(f"student_teacher: step {step + 1}/{self.steps} hard loss {losses[-1]:.4f} "
                          f"({time.perf_counter() - t0:.0f} s)", flush=True)
        self.student.eval()
        train_seconds = time.perf_counter() - t0
        ref = x_cal if x_cal is not None and len(x_cal) else x_fit
        with torch.no_grad():
            vals = torch.cat([self._distance(xb).flatten() for xb in PatchCore.windows(self, ref, batch_size)])
            qa, qb = (float(np.quantile(vals.numpy(), q)) for q in self.map_quantiles)
        self.q_a, self.q_b = torch.tensor(qa), torch.tensor(max(qb, qa + 1e-12))
        k = max(1, len(losses) // 20)
        info = {"images": int(len(x_fit)), "windows": int(n), "steps": self.steps, "grid": list(targets.shape[-2:]),
                "loss_first": round(float(np.mean(losses[:k])), 5), "loss_last": round(float(np.mean(losses[-k:])), 5),
                "train_seconds": round(train_seconds, 1), "q_a": qa, "q_b": qb,
                "map_quantiles_from": "calibration" if ref is x_cal else "fit",
                "weights": self.teacher.weights_source}
        print(f"student_teacher: {self.steps} steps on {n} windows in {train_seconds:.0f} s, hard loss "
              f"{info['loss_first']} -> {info['loss_last']}; map quantiles q_a {qa:.4g} q_b {qb:.4g}", flush=True)
        return info

    def score_tiles(self, x: torch.Tensor) -> AnomalyOutput:
        dist = 0.1 * (self._distance(x) - self.q_a) / (self.q_b - self.q_a)
        return AnomalyOutput(inner_max(dist, self.score_border), upsample_map(dist, x.shape[-2:], self.blur_sigma))
