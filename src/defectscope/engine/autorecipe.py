"""A default recipe sized to a data set the project has never seen (``defectscope train FOLDER``).

Our hand-written recipes were tuned on NEU (1800 images) and KolektorSDD (399). Applied to a
40-image folder they train 4 epochs of a single batch (the partial batch dropped) and score
noise on an 8-image test split. :func:`size_recipe` instead derives the settings from the data:

- **Batch size**: at most 16; with ``n`` training images the batches are made equal,
  ``b = ceil(n / ceil(n / 16))`` (28 images: 2 batches of 14, not 1 of 16 + 12 dropped).
  :func:`drop_last` tells the loader to keep the last partial batch unless it is a negligible
  share of the data (``n >= 20 b``).
- **Optimizer steps**: ``max(MIN_STEPS, MIN_EPOCHS * steps_per_epoch)`` (fine-tuning a pretrained
  backbone needs a few dozen steps whatever the data size, see :data:`MIN_STEPS`; large sets get
  at least ``MIN_EPOCHS`` passes), expressed as ``train.epochs``. The schedule is fixed: it does
  not depend on the machine, and no wall-clock cut (``max_minutes``) is written. :func:`explain`
  measures a few training steps of the model at the chosen size on this CPU, in the precision
  ``auto`` chooses here, and prints the time the schedule will take (information only).
- **Image size**: from the median image size: classification / detection take the short side,
  clipped to [64, 224] (NEU 200 px stays 200; no up-sampling beyond the backbone's 224);
  segmentation / anomaly keep the aspect ratio with sides multiples of 32, the long side at most
  384 and the area at most 384 x 160 px (KolektorSDD 1250 x 500 gives the tuned 384 x 160).
- **Validation part**: a validation hold-out of fewer than 5 images per class selects checkpoints
  on noise: below that ``val_fraction = 0`` and no early stopping (fixed steps, last weights).
- **Class balance** (``train.class_balance``): on when the largest class holds more than
  ``IMBALANCE_RATIO`` (3) times the images of the smallest non-empty one.
- **Folds** (``eval.folds``): k-fold cross-validation (``k = min(5, smallest class)``) when a
  single stratified split (``test_fraction`` 0.2) would hold fewer than ``MIN_TEST_PER_CLASS`` (10)
  images of some class; otherwise 1 (single split). The anomaly task tests on every defective
  image already (folds 1); it uses PatchCore (no network training, so no ``train`` section) and
  reads nothing but the user's folder (no clustering study). The time estimate counts the K fold
  fits and the final refit of the chosen candidate on all the data (of one fine-tuned candidate).
- **Candidates** (``eval.candidates``, classification and weld recipes): the models compared on the
  same folds (:data:`CLASSIFICATION_CANDIDATES`, :data:`WELD_CANDIDATES`); the best pooled
  out-of-fold accuracy becomes the run's model (see :mod:`defectscope.engine.pipeline`). A single
  split compares them on its validation part (no choice reads the test part), whose
  share is raised up to :data:`MAX_SELECT_VAL_FRACTION` to hold ``MIN_VAL_PER_CLASS`` images of
  every class; without such a part a single-split classification recipe lists no candidates.

Keys not in today's schemas are listed in :data:`NEW_KEYS`; the pipeline's schemas take them.
:func:`explain` gives the one paragraph ``train`` prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

MAX_BATCH = 16
#: Fewest optimizer steps of a fine-tuning run. Measured (NEU, 6 images per class = 36 training
#: images, batch 12, 200 px, tf_efficientnet_lite0 ImageNet, AdamW 5e-4 warm-up + cosine, flips;
#: tested on 60 other NEU images): 40 steps 0.833 accuracy (train loss 0.011), 100 steps 0.817,
#: linear probe 0.533. 60 leaves a margin over 40 at half the cost of 100.
MIN_STEPS = 60
MIN_EPOCHS = 5
IMBALANCE_RATIO = 3.0
MIN_TEST_PER_CLASS = 10
MIN_VAL_PER_CLASS = 5
TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
MAX_FOLDS = 5
#: largest validation share a single split takes so that candidates are compared on >= MIN_VAL_PER_CLASS per class
MAX_SELECT_VAL_FRACTION = 0.2
#: Keys :func:`size_recipe` writes that the task schemas of today do not have yet (dotted paths).
NEW_KEYS = ("eval.folds", "train.class_balance", "data.layout@anomaly", "data.layout@segmentation",
            "data.layout@detection")
TASKS = ("classification", "segmentation", "detection", "anomaly", "weld")
#: candidates a cross-validated classification recipe evaluates on the same folds (see engine/pipeline.py)
CLASSIFICATION_CANDIDATES = ("model", "linear_probe", "finetune_small", "linear_probe_lite2")
#: candidates of a cross-validated weld recipe: the fusion model, the signal-statistics and image-probe references
WELD_CANDIDATES = ("model", "signal_stats", "image_probe")


@dataclass
class _Plan:
    recipe: dict[str, Any]
    reasons: list[str] = field(default_factory=list)
    #: training images processed by the whole run (epochs x images x fits) and their size (H, W)
    image_passes: int = 0
    hw: tuple[int, int] = (200, 200)


def _round32(v: float) -> int:
    return max(64, int(round(v / 32.0)) * 32)


def batch_size_for(n_train: int, max_batch: int = MAX_BATCH) -> int:
    """Equal batches of at most ``max_batch``: ``ceil(n / ceil(n / max_batch))`` (1 when ``n <= 1``)."""
    if n_train <= 1:
        return 1
    return math.ceil(n_train / math.ceil(n_train / max_batch))


def drop_last(n_train: int, batch_size: int) -> bool:
    """Whether the loader may drop the last partial batch: only when it is a negligible share (``n >= 20 b``).

    With scarce data every image counts; a dropped partial batch of 12 out of 28 images threw
    away 43% of the training set each epoch (issue 15).
    """
    return n_train >= 20 * batch_size and n_train % batch_size != 0


_MEASURED: dict[tuple, float] = {}


def measure_seconds_per_image(hw: tuple[int, int], backbone: str = "efficientnet_lite0", steps: int = 2,
                              batch: int = 4) -> float:
    """Training seconds per image of ``hw = (H, W)`` pixels, measured here: ``steps`` AdamW steps (after
    one warm-up step) of ``backbone`` + a linear head on random data, in the precision ``auto``
    chooses on this CPU (:mod:`defectscope.machine`), channels_last, the current torch threads.

    About 1-3 s at 224 px on a 2-core CPU; cached per process and size. The backbone starts from
    random weights (its speed does not depend on them; nothing is loaded).
    """
    import time

    import torch

    from defectscope.machine import autocast
    from defectscope.models.backbones import create_backbone

    key = (tuple(hw), backbone, torch.get_num_threads())
    if key in _MEASURED:
        return _MEASURED[key]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = create_backbone(backbone, pretrained=False)
        head = torch.nn.Linear(net.out_channels, 4)
        params = list(net.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4)
        net.train().to(memory_format=torch.channels_last)
        x = torch.rand(batch, 3, *hw).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 4, (batch,))
        times = []
        for i in range(steps + 1):
            t0 = time.perf_counter()
            with autocast("auto"):
                loss = torch.nn.functional.cross_entropy(head(net(x).mean((2, 3))).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t0)
    _MEASURED[key] = min(times) / batch
    return _MEASURED[key]


def _square_side(image_hw: tuple[int, int] | None, lo: int, hi: int, default: int) -> int:
    if not image_hw:
        return default
    side = min(image_hw)
    return int(min(hi, max(lo, round(side / 8) * 8)))


#: share of the good training images an anomaly recipe keeps for the threshold (AnomalyData's default)
ANOMALY_CALIBRATION = 0.15


def _aspect_size(image_hw: tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if not image_hw:
        return default
    h, w = image_hw
    scale = min(1.0, 384.0 / max(h, w), math.sqrt(384.0 * 160.0 / (h * w)))
    return _round32(h * scale), _round32(w * scale)


def _folds(counts: dict[str, int], reasons: list[str]) -> int:
    nonzero = {k: v for k, v in counts.items() if v > 0}
    if not nonzero:
        return 1
    smallest_name, smallest = min(nonzero.items(), key=lambda kv: kv[1])
    held = {k: int(math.floor(TEST_FRACTION * v)) for k, v in nonzero.items()}
    few = min(held.values())
    if few >= MIN_TEST_PER_CLASS:
        reasons.append(f"a single stratified {int(TEST_FRACTION * 100)}% test split holds at least {few} images "
                       "of every class, enough for one split (--folds K for cross-validation)")
        return 1
    if smallest < 2:
        reasons.append(f"class '{smallest_name}' has {smallest} image: it cannot be split; single split, and "
                       "that class is never tested (add images)")
        return 1
    k = min(MAX_FOLDS, smallest)
    reasons.append(f"a single {int(TEST_FRACTION * 100)}% test split would hold only {few} image{'s' if few != 1 else ''} of some class "
                   f"(fewer than {MIN_TEST_PER_CLASS}), so {k}-fold cross-validation is used: every image is "
                   "tested once (--folds 1 forces a single split)")
    return k


def _steps(plan: _Plan, n_train: int, hw: tuple[int, int], folds: int, reasons: list[str],
           max_batch: int = MAX_BATCH) -> dict[str, Any]:
    b = batch_size_for(n_train, max_batch)
    per_epoch = max(1, math.ceil(n_train / b)) if not drop_last(n_train, b) else n_train // b
    steps = max(MIN_STEPS, MIN_EPOCHS * per_epoch)
    epochs = max(1, math.ceil(steps / per_epoch))
    reasons.append(f"{n_train} training images per fit in batches of {b} ({per_epoch} steps per epoch, "
                   f"{'last partial batch kept' if not drop_last(n_train, b) else 'last partial batch dropped'}); "
                   f"{epochs} epochs = {epochs * per_epoch} optimizer steps (a fixed schedule: no wall-clock cut)")
    plan.image_passes = epochs * n_train * max(1, folds)  # folds + the refit (see _plan)
    plan.hw = tuple(hw)
    return {"batch_size": b, "epochs": epochs}


def _plan(task: str, n_images: int, class_counts: dict[str, int] | None, image_hw: tuple[int, int] | None,
          root: str | Path | None, layout: str | None) -> _Plan:
    if task not in TASKS:
        raise ValueError(f"size_recipe: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if n_images < 1:
        raise ValueError(f"size_recipe: n_images must be >= 1, got {n_images}")
    counts = dict(class_counts or {})
    reasons: list[str] = []
    raw: dict[str, Any] = {"task": task, "seed": 0, "data": {}, "train": {}}
    plan = _Plan(raw, reasons)
    if root is not None:
        raw["data"]["root"] = str(root)
    empty = sorted(k for k, v in counts.items() if v == 0)
    if empty:
        reasons.append(f"empty classes {empty} are ignored")
    nonzero = {k: v for k, v in counts.items() if v > 0}

    if task == "anomaly":
        hw = _aspect_size(image_hw, (384, 160))
        raw["data"]["image_size"] = list(hw)
        if layout:
            raw["data"]["layout"] = layout
        # only the user's own data: PatchCore (no network training), no clustering study
        raw["model"] = {"name": "patchcore"}
        n_good = int(counts.get("train/good", counts.get("good", n_images)))
        n_cal = int(round(ANOMALY_CALIBRATION * n_good))  # as data.kolektor / data.mvtec draw it
        reasons.append(f"images resized to {hw[0]} x {hw[1]} (H x W; aspect kept, sides multiples of 32)")
        reasons.append(f"PatchCore on EfficientNet-Lite0 ImageNet features (no network training): {n_good - n_cal} "
                       f"good training images fill its memory bank, {n_cal} more ({ANOMALY_CALIBRATION:g} of them) "
                       "set the decision threshold")
        reasons.append("the test set already holds every defective image: single split (folds 1)")
        raw["eval"] = {"folds": 1}
        del raw["train"]
        plan.hw = tuple(hw)  # no training: plan.image_passes stays 0
        return plan

    folds = _folds(nonzero, reasons) if nonzero else 1
    raw["eval"] = {"folds": folds}
    n_trainval = n_images * (1 - 1 / folds) if folds > 1 else n_images * (1 - TEST_FRACTION)
    smallest = min(nonzero.values()) if nonzero else n_images
    min_train_per_class = smallest * ((1 - 1 / folds) if folds > 1 else (1 - TEST_FRACTION))
    # a single split compares the candidates on its validation part: raise the share (up to
    # MAX_SELECT_VAL_FRACTION) so that it holds MIN_VAL_PER_CLASS images of the smallest class
    select_val = math.ceil(1000 * MIN_VAL_PER_CLASS / max(min_train_per_class, 1e-9)) / 1000
    val_fraction = (VAL_FRACTION if min_train_per_class * VAL_FRACTION >= MIN_VAL_PER_CLASS else
                    select_val if folds == 1 and task in ("classification", "weld") and select_val <= MAX_SELECT_VAL_FRACTION
                    else 0.0)
    if val_fraction:
        raw["train"].update({"val_fraction": val_fraction, "early_stopping_patience": 2})
        n_train = int(n_trainval * (1 - val_fraction))
        reasons.append(f"{val_fraction * 100:g}% of the training part is kept for checkpoint selection"
                       + (" and for comparing the candidates" if folds == 1 and task in ("classification", "weld") else ""))
    else:
        raw["train"].update({"val_fraction": 0.0, "early_stopping_patience": 0})
        n_train = int(n_trainval)
        reasons.append(f"no validation hold-out (it would hold fewer than {MIN_VAL_PER_CLASS} images of some "
                       "class): a fixed number of steps, last weights kept")
    n_train = max(1, n_train)

    if task in ("classification", "detection", "weld"):
        if task == "weld":
            hw = (256, 256)
        else:
            side = _square_side(image_hw, 64, 224, 200)
            hw = (side, side)
            raw["data"]["image_size"] = side
            reasons.insert(0, f"images resized to {side} x {side} px (median short side"
                              f"{f' {min(image_hw)} px' if image_hw else ' unknown'}, clipped to 64-224)")
        if task == "classification":
            raw["data"]["test_fraction"] = TEST_FRACTION
            if layout in ("folder", "prefix"):
                raw["data"]["layout"] = layout
            raw["model"] = {"name": "classifier", "backbone": "efficientnet_lite0", "pretrained": True,
                            "dropout": 0.1}
        elif task == "detection":
            raw["data"]["test_fraction"] = TEST_FRACTION
            if layout:
                raw["data"]["layout"] = layout
        if task == "classification" and len(nonzero) >= 2:
            big, small = max(nonzero.values()), min(nonzero.values())
            balance = big / small > IMBALANCE_RATIO
            raw["train"]["class_balance"] = balance
            reasons.append(f"largest / smallest class = {big} / {small} = {big / small:.1f}: class-balanced "
                           f"sampling {'ON' if balance else 'off'} (on above {IMBALANCE_RATIO:g})")
        raw["train"].update(_steps(plan, n_train, hw, folds + 1 if folds > 1 else 1, reasons))
        raw["train"].setdefault("lr", 5.0e-4 if task != "weld" else 2.0e-4)
        if folds > 1 and task == "classification":
            raw["eval"]["candidates"] = list(CLASSIFICATION_CANDIDATES)
            reasons.append("candidates on the same folds: " + ", ".join(CLASSIFICATION_CANDIDATES) + "; the best pooled "
                           "out-of-fold accuracy becomes the model (ties: the cheaper), refit on all the images")
        elif task == "classification" and val_fraction:
            raw["eval"]["candidates"] = list(CLASSIFICATION_CANDIDATES)
            reasons.append("candidates on the same split: " + ", ".join(CLASSIFICATION_CANDIDATES) + "; the best "
                           "validation accuracy becomes the model (ties: the cheaper); the test part measures it once")
        if task == "weld":
            raw["model"] = {"freeze_backbone": True}
            reasons.append("weld: the ImageNet vision encoder is kept frozen (its features are computed once), the "
                           "seam U-Net is trained only when every sample has a seam mask")
            # the folds are the weld task's own default (engine/weld.py default_folds): it knows the data's
            # group field (sessions, batches), which caps K and keeps a group in one fold
            raw["eval"] = {"candidates": list(WELD_CANDIDATES)}
            reasons.append("folds: the weld task's default (cross-validation below 200 samples, K = min(5, smallest "
                           "class, groups), grouped by the data's group field when every sample has one)")
            reasons.append("candidates on the same (grouped) folds: " + ", ".join(WELD_CANDIDATES) + "; the best pooled "
                           "out-of-fold accuracy becomes the model (ties: the cheaper), refit on all the samples "
                           "(a single split: the best validation accuracy, the test part measures it once)")
    else:  # segmentation
        hw = _aspect_size(image_hw, (320, 128))
        raw["data"]["height"], raw["data"]["width"] = hw
        if layout:
            raw["data"]["layout"] = layout
        reasons.insert(0, f"images resized to {hw[0]} x {hw[1]} (H x W; aspect kept, sides multiples of 32)")
        good, bad = int(counts.get("good", 0)), int(counts.get("defective", 0))
        if good and bad:
            over = 3 if good / bad > IMBALANCE_RATIO else 1
            raw["data"]["defect_oversample"] = over
            reasons.append(f"{bad} defective / {good} good images: each defective image {over}x per epoch")
        raw["train"]["lr"] = 1.0e-3
        raw["train"].update(_steps(plan, n_train, hw, folds + 1 if folds > 1 else 1, reasons, max_batch=8))
    return plan


def size_recipe(task: str, n_images: int, class_counts: dict[str, int] | None, image_hw: tuple[int, int] | None,
                *, root: str | Path | None = None, layout: str | None = None) -> dict[str, Any]:
    """A raw recipe dict for ``task`` sized to the data (rules in the module docstring).

    Args:
        task: ``classification``, ``segmentation``, ``detection``, ``anomaly`` or ``weld``.
        n_images: images (samples) in the data set.
        class_counts: images per class (classification, weld, detection image classes),
            ``{"good": g, "defective": d}`` (segmentation), ``{"good": g, <defect type>: n, ...}``
            (anomaly); ``None`` or ``{}`` when unknown. Zero counts (empty class folders) are ignored.
        image_hw: median ``(H, W)`` of the images in pixels (``None``: the task's default size).
        root: the data folder to put in ``data.root`` (omitted when ``None``).
        layout: the layout from :func:`defectscope.data.layout.guess_layout` (``data.layout``).

    Returns:
        The raw recipe (``task``, ``seed``, ``data``, ``model`` for classification, ``train``,
        ``eval.folds``). Valid for the task's schema once the schema has :data:`NEW_KEYS`.

    Raises:
        ValueError: unknown ``task`` or ``n_images < 1``.
    """
    return _plan(task, n_images, class_counts, image_hw, root, layout).recipe


def explain(task: str, n_images: int, class_counts: dict[str, int] | None, image_hw: tuple[int, int] | None,
            *, root: str | Path | None = None, layout: str | None = None,
            seconds_per_image: "Callable[[tuple[int, int]], float] | None" = None) -> str:
    """One paragraph saying what :func:`size_recipe` chose and why (same arguments), ending with the
    time the schedule takes on this CPU.

    Args:
        seconds_per_image: training seconds per image of a given ``(H, W)``; default
            :func:`measure_seconds_per_image` (a few steps measured here, 1-3 s).
    """
    plan = _plan(task, n_images, class_counts, image_hw, root, layout)
    if plan.image_passes:  # a plan without network training (anomaly: PatchCore) has nothing to time
        plan.reasons.append(_time_estimate(plan, seconds_per_image))
    counts = {k: v for k, v in (class_counts or {}).items()}
    head = f"Recipe sized to the data ({task}, {n_images} images"
    if counts:
        head += ", " + ", ".join(f"{k} {v}" for k, v in counts.items())
    head += "): "
    return head + "; ".join(plan.reasons) + ". Edit the written config.yaml and re-run with it to change anything."


def _time_estimate(plan: _Plan, seconds_per_image: "Callable[[tuple[int, int]], float] | None") -> str:
    measure = seconds_per_image or measure_seconds_per_image
    spi = measure(plan.hw)
    from defectscope.machine import resolve_precision

    prec = resolve_precision("auto")
    return (f"estimated training time {plan.image_passes * spi / 60.0:.1f} min: {plan.image_passes} "
                        f"image passes x {spi * 1000:.0f} ms per {plan.hw[0]} x {plan.hw[1]} image, measured on this "
                        f"CPU in precision {prec.value} (an estimate; the schedule above is what runs)")


def strip_new_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw`` without :data:`NEW_KEYS` (for today's schemas; the pipeline keeps them)."""
    import copy

    out = copy.deepcopy(raw)
    task = out.get("task")
    for key in NEW_KEYS:
        path, _, only = key.partition("@")
        if only and only != task:
            continue
        node = out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    if out.get("eval") == {}:
        out.pop("eval")
    return out
