"""Lightning ``Trainer`` factory from a :class:`~defectscope.config.TrainConfig`."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from defectscope.config import TrainConfig
from defectscope.evaluation.run_report import csv_log_path, report_training_curves  # noqa: F401 (re-exported)

class EpochSummary(L.Callback):
    """One line per epoch (time and logged metrics) for logs where no progress bar is drawn."""

    def on_train_epoch_start(self, trainer, pl_module):
        import time

        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        import time

        if not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs} ({time.perf_counter() - self._t0:.0f} s)  {text}",
              file=sys.stderr, flush=True)


def set_threads(cfg: TrainConfig) -> int:
    """Set torch's intra-op threads from ``num_threads`` (:func:`defectscope.machine.resolve_threads`;
    ``auto`` under CPU DDP shares the usable CPUs out among the processes). Returns the count set."""
    from defectscope.machine import resolve_threads

    n = resolve_threads(cfg.num_threads)
    if cfg.num_threads == "auto" and cfg.devices > 1 and cfg.accelerator == "cpu":
        n = max(1, n // cfg.devices)
    torch.set_num_threads(n)
    return n


def resolved_precision(cfg: TrainConfig) -> str:
    """The Lightning precision string for ``cfg.precision`` on this machine (``auto`` decided by
    :func:`defectscope.machine.resolve_precision`)."""
    from defectscope.machine import resolve_precision

    return resolve_precision(cfg.precision, cfg.accelerator).value


def build_trainer(cfg: TrainConfig, run_dir: Path, monitor: str | None, mode: str = "max") -> L.Trainer:
    """A Lightning trainer writing logs and checkpoints into ``run_dir``.

    Args:
        cfg: training settings (epochs, precision, strategy, devices, early stopping, budget).
        run_dir: the run folder; logs go to ``run_dir/logs``, checkpoints to ``run_dir/checkpoints``.
        monitor: logged metric for checkpoint selection and early stopping (``None``: keep the last).
        mode: ``max`` or ``min`` for ``monitor``.
    """
    loggers = []
    if "csv" in cfg.logger:
        loggers.append(CSVLogger(str(run_dir), name="logs", version="csv"))  # -> csv_log_path(run_dir)
    if "tensorboard" in cfg.logger:
        loggers.append(TensorBoardLogger(str(run_dir), name="logs", version="tensorboard", default_hp_metric=False))
    callbacks: list = []
    ckpt_dir = run_dir / "checkpoints"
    if monitor:
        callbacks.append(ModelCheckpoint(ckpt_dir, filename="best", monitor=monitor, mode=mode, save_last=True))
        if cfg.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience))
    else:
        callbacks.append(ModelCheckpoint(ckpt_dir, filename="last", save_last=False))
    show_progress = cfg.progress and sys.stderr.isatty()
    callbacks.append(RichProgressBar() if show_progress else EpochSummary())
    strategy = cfg.strategy
    if strategy == "ddp" and cfg.accelerator == "cpu":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(process_group_backend="gloo")
    return L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=strategy,
        precision=resolved_precision(cfg),
        logger=loggers or False,
        callbacks=callbacks,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        log_every_n_steps=10,
        max_time=timedelta(minutes=cfg.max_minutes) if cfg.max_minutes else None,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
        deterministic=False,
    )


def fit_lightning(module: L.LightningModule, train_loader, val_loader, cfg: TrainConfig, run_dir: Path,
                  monitor: str | None, mode: str = "max", resume: bool = False) -> dict | None:
    """Fit ``module`` with :func:`build_trainer`, then load its best checkpoint's weights into it.

    The best checkpoint (by ``monitor`` on ``val_loader``) is read with ``weights_only=True``
    (tensors only: a checkpoint cannot run code). Without a validation loader the last weights
    are kept.

    Args:
        module: the method's LightningModule (``models/<method>/lightning_model.py``).
        train_loader, val_loader: data loaders (``val_loader`` may be ``None``).
        cfg: training settings; run_dir: the run folder (logs, checkpoints).
        monitor, mode: the logged validation metric selecting the checkpoint, ``max`` or ``min``.
        resume: continue from ``run_dir/checkpoints/last.ckpt`` when it exists (Lightning's
            ``ckpt_path``; ``defectscope train --resume`` sets it through :attr:`RunFolder.resume`).

    Returns:
        ``{"epochs_run", "best_checkpoint", "train_seconds", "cut_short", "stopped_by"}`` on rank 0;
        ``None`` on other DDP ranks. ``cut_short`` is true when ``train.max_minutes`` stopped training
        before the fixed schedule ended (the figure then depends on machine load); ``stopped_by`` is
        ``"schedule"`` (every epoch ran), ``"early_stopping"`` (validation patience ran out before the
        last epoch) or ``"max_minutes"``.
    """
    import time

    set_threads(cfg)
    has_val = val_loader is not None
    trainer = build_trainer(cfg, run_dir, monitor if has_val else None, mode)
    last = Path(run_dir) / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if ckpt_path:
        print(f"resuming from {last}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    seconds = time.perf_counter() - start
    if not trainer.is_global_zero:
        return None
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if has_val else ""
    if best:
        module.load_state_dict(load_checkpoint_state(best))
    ran_out = trainer.current_epoch >= cfg.epochs  # every scheduled epoch ran (an early stop on the last one changes nothing)
    early = not ran_out and any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks)
    cut = bool(cfg.max_minutes) and not ran_out and not early
    return {"epochs_run": int(trainer.current_epoch), "best_checkpoint": Path(best).name if best else "last",
            "train_seconds": round(seconds, 1), "cut_short": cut,
            "stopped_by": "max_minutes" if cut else ("early_stopping" if early else "schedule")}


def load_checkpoint_state(path: str | Path) -> dict:
    """The ``state_dict`` of a Lightning checkpoint, read with ``weights_only=True`` (no code runs).

    Same as :func:`defectscope.engine.run.load_lightning_state_dict`.

    Raises:
        RunError: the file is not a Lightning checkpoint holding only tensors and plain data.
    """
    from defectscope.engine.run import load_lightning_state_dict

    return load_lightning_state_dict(path)
