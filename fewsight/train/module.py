"""``DetectorModule``: the one LightningModule that trains and validates any fewsight detector.

* training: ``model(images, targets)`` returns named losses; each is logged as ``train/<name>``
  and their sum as ``train/loss`` (the value optimised);
* validation: ``model(images)`` detections go to a :class:`~fewsight.eval.DetectionEvaluator`;
  at the epoch end ``val/map``, ``val/map50``, ``val/map75``, ``val/mar100`` and
  ``val/ap50/<class>`` are logged (torchmetrics gathers the states across DDP ranks);
* optimiser: SGD (momentum, Nesterov), AdamW or Adam, weight decay off for 1-D parameters
  (normalisation weights, biases, per-class scalars) unless ``norm_weight_decay`` says otherwise;
* learning rate, per optimizer step: ``lr * warmup(step) * schedule(step)`` with
  ``warmup(s) = f + (1 - f) * s / W`` for ``s < W`` (Goyal et al. 2017) and ``schedule`` cosine
  ``r + (1 - r) * (1 + cos(pi * t)) / 2`` (Loshchilov & Hutter 2017; ``t`` the fraction of the
  post-warmup steps done or, with a wall-clock budget ``trainer.max_time``, of the budget spent if
  that is more: a run the clock stops still ends its cosine instead of stopping at a high rate),
  multistep (``gamma ** #milestones passed``, milestones in epochs) or
  constant;
* DLDENet with ``means_update="manual"``: ``model.update_means()`` after the last training batch of
  every epoch (before validation and before the epoch checkpoint).

Gradient clipping, AMP and accumulation are the ``Trainer``'s (``gradient_clip_val``,
``precision``, ``accumulate_grad_batches``).

Example:
    >>> import torch, lightning as L
    >>> from torch import nn
    >>> class Tiny(nn.Module):  # any module with the detector contract
    ...     classes = ["a"]
    ...     def __init__(self):
    ...         super().__init__(); self.w = nn.Parameter(torch.zeros(1))
    ...     def forward(self, images, targets=None):
    ...         return {"l": (self.w - 1).pow(2).sum()}
    >>> m = DetectorModule(Tiny(), optimizer={"lr": 0.1})
    >>> m.hparams["optimizer"]["lr"]
    0.1
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Timer
from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError
from fewsight.eval.metrics import DetectionEvaluator
from fewsight.train.config import OptimizerConfig, ScheduleConfig, _from_dict

__all__ = ["DetectorModule", "lr_factor", "parameter_groups"]


def _as_config(cls: type, value: Any, where: str) -> Any:
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return _from_dict(cls, value, where)


def parameter_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None) -> list[dict[str, Any]]:
    """Trainable parameters split into ``weight_decay`` (weights of convs / linears) and
    ``norm_weight_decay`` (1-D tensors: norm weights, biases, per-class scalars) groups."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    nwd = weight_decay if norm_weight_decay is None else norm_weight_decay
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": nwd}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int,
              budget_spent: float | None = None) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (see the module docstring).

    ``budget_spent``: the fraction of a wall-clock budget used so far (``None``: no budget); the
    cosine follows it when it is ahead of the steps.

    >>> s = ScheduleConfig(name="cosine")
    >>> round(lr_factor(10, s, 100, 10), 4), round(lr_factor(10, s, 100, 10, budget_spent=0.5), 4)
    (0.9755, 0.5)
    """
    warm = schedule.warmup_steps
    factor = 1.0
    if warm > 0 and step < warm:
        factor = schedule.warmup_factor + (1.0 - schedule.warmup_factor) * step / warm
    if schedule.name == "cosine":
        span = max(1, total_steps - warm)
        t = min(max(max(step - warm, 0) / span, budget_spent or 0.0), 1.0)
        r = schedule.min_lr_ratio
        factor *= r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif schedule.name == "multistep":
        epoch = step // max(1, steps_per_epoch)
        factor *= schedule.gamma ** sum(1 for m in schedule.milestones if epoch >= m)
    return factor


class DetectorModule(L.LightningModule):
    """Train / validate a fewsight detector (see the module docstring).

    Args:
        model: a detector: ``model(images, targets) -> {name: loss}`` in train mode,
            ``model(images) -> [{"boxes", "scores", "labels"}]`` in eval mode.
        optimizer: :class:`~fewsight.train.config.OptimizerConfig` or its dict.
        schedule: :class:`~fewsight.train.config.ScheduleConfig` or its dict.
        class_names: names for per-class metrics (default ``model.classes``).
        model_spec: how to rebuild ``model`` (stored in the checkpoint's hyper-parameters so
            :func:`fewsight.hub.load_model` can read a training checkpoint); default
            ``model.to_spec()`` when the model describes itself.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        optimizer: OptimizerConfig | Mapping[str, Any] | None = None,
        schedule: ScheduleConfig | Mapping[str, Any] | None = None,
        class_names: list[str] | None = None,
        model_spec: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model: expected an nn.Module detector, got {type(model).__name__}")
        self.model = model
        self.optimizer_config: OptimizerConfig = _as_config(OptimizerConfig, optimizer, "optimizer")
        self.schedule_config: ScheduleConfig = _as_config(ScheduleConfig, schedule, "schedule")
        names = class_names if class_names is not None else getattr(model, "classes", None)
        self.class_names = None if names is None else [str(c) for c in names]
        if model_spec is None and callable(getattr(model, "to_spec", None)):
            model_spec = model.to_spec()
        self.evaluator = DetectionEvaluator(self.class_names)
        self.last_val_metrics: dict[str, Any] | None = None
        self._means_epoch = -1
        # Plain containers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "model_spec": None if model_spec is None else dict(model_spec),
                "optimizer": _plain(dataclasses.asdict(self.optimizer_config)),
                "schedule": _plain(dataclasses.asdict(self.schedule_config)),
                "class_names": self.class_names,
            }
        )

    # -- forward / steps --------------------------------------------------------------------------
    def forward(self, images: Any, targets: Any = None) -> Any:
        return self.model(images) if targets is None else self.model(images, targets)

    def _losses(self, images: Any, targets: Any) -> dict[str, Tensor]:
        losses = self.model(images, targets)
        if not isinstance(losses, Mapping) or not losses or not all(isinstance(v, Tensor) for v in losses.values()):
            raise InvalidArgumentError(
                f"model: expected a dict of loss tensors in training mode, got {type(losses).__name__}"
            )
        return dict(losses)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self._losses(images, targets)
        total = torch.stack([v.float().sum() for v in losses.values()]).sum()
        n = len(images)
        # sync_dist: the epoch means cover every rank's batches (a scalar all-reduce, no-op without DDP).
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach().float(), batch_size=n, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/loss", total.detach(), batch_size=n, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        return total

    def _manual_means(self) -> bool:
        return getattr(self.model, "means_update", None) == "manual" and callable(getattr(self.model, "update_means", None))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Before validation and the epoch checkpoint, so both see the epoch's means.
        if self._manual_means() and batch_idx + 1 == self.trainer.num_training_batches:
            self.model.update_means()
            self._means_epoch = self.current_epoch

    def on_train_epoch_end(self) -> None:
        if self._manual_means() and self._means_epoch != self.current_epoch:
            self.model.update_means()
            self._means_epoch = self.current_epoch

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, targets = batch
        predictions = self.model(images)
        self.evaluator.update(predictions, targets)

    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def on_validation_epoch_end(self) -> None:
        metrics = self.evaluator.compute()
        self.evaluator.reset()
        logged = {f"val/{k}": metrics[k] for k in ("map", "map75", "mar100")}
        for name, values in metrics["per_class"].items():
            logged[f"val/ap50/{name}"] = values["ap50"]
        # Already gathered by torchmetrics: identical on every rank, so the DDP mean is a no-op.
        self.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in logged.items()}, sync_dist=True)
        self.log("val/map50", torch.tensor(metrics["map50"]), prog_bar=True, sync_dist=True)
        if not self.trainer.sanity_checking:
            self.last_val_metrics = metrics

    # -- optimisation -----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.optimizer_config
        groups = parameter_groups(self.model, cfg.weight_decay, cfg.norm_weight_decay)
        if cfg.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        elif cfg.name == "adamw":
            opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        elif cfg.name == "adam":
            opt = torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas))
        else:  # validated by the config
            raise InvalidArgumentError(f"optimizer.name: expected sgd, adamw or adam, got {cfg.name!r}")
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        max_epochs = max(1, int(self.trainer.max_epochs or 1)) if self._trainer is not None else 1
        steps_per_epoch = max(1, total // max_epochs)
        schedule = self.schedule_config
        timer = None if self._trainer is None else next(
            (c for c in self.trainer.callbacks if isinstance(c, Timer)), None)

        def factor(step: int) -> float:
            return lr_factor(step, schedule, total, steps_per_epoch, _budget_spent(timer))

        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


def _budget_spent(timer: Timer | None) -> float | None:
    """The fraction of the ``max_time`` budget ``timer`` has used (kept across resumes), ``None`` without one."""
    remaining = None if timer is None else timer.time_remaining()
    if remaining is None:
        return None
    elapsed = timer.time_elapsed()
    return min(max(elapsed / max(elapsed + remaining, 1e-9), 0.0), 1.0)


def _plain(obj: Any) -> Any:
    if isinstance(obj, tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
