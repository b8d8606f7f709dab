"""The Lightning loop every fewsight training shares, and the detector run on it.

:func:`prepare_run` (output folder, threads, seeds, what to resume), :func:`build_trainer` (checkpoints
each epoch + best + last through :class:`~fewsight.train.checkpoint.AtomicCheckpointIO`, exact resume,
precision / AMP, gradient clipping, progress bar, CSV / TensorBoard logs, DDP strategy) and :func:`fit`
run both :func:`train_detector` and :func:`fewsight.train.embedder.train_embedder`;
:func:`fewsight.train.train` picks one from the config type.

Detector outputs under ``config.out_dir``::

    config.yaml                 the resolved configuration
    checkpoints/epoch=NNN.ckpt  every ``checkpoint.every_n_epochs`` epochs (``checkpoint.keep`` newest)
    checkpoints/last.ckpt       the latest (what ``checkpoint.resume: true`` continues from)
    checkpoints/best.ckpt       the best by ``checkpoint.monitor`` (``val/map50``), when there is a val set
    logs/metrics.csv            every logged value (TensorBoard too with ``trainer.loggers: [csv, tensorboard]``)
    model.pt                    the final detector (:func:`fewsight.hub.save_model`)
    metrics.json                evaluation of the final model on ``data.test`` (else ``data.val``)
    detections.png, pr_curve.png

Reproducibility: ``lightning.seed_everything(seed, workers=True)`` before the model is built, the
data order and augmentation of each sample fixed by ``(seed, epoch, index)``
(:mod:`fewsight.train.data`), and the global RNGs re-seeded from ``(seed, epoch)`` at every epoch
start. A run interrupted at any point and resumed with ``checkpoint.resume: true`` (Lightning's
``ckpt_path="last"``; the interrupted epoch restarts from its beginning) ends with the same weights
and metrics as an uninterrupted run on the same hardware. Checkpoints are written atomically and
read with ``weights_only=True`` (:class:`~fewsight.train.checkpoint.AtomicCheckpointIO`).

Distribution is Lightning's: ``trainer.strategy: ddp`` with ``trainer.devices`` / ``num_nodes``.

Example:
    >>> import tempfile  # doctest: +SKIP
    >>> result = train_detector({"out_dir": tempfile.mkdtemp(), "data": {"train": {"type": "digits", "num_images": 8}},
    ...                          "model": {"name": "retinanet"}, "trainer": {"max_epochs": 1}})  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from fewsight.errors import CheckpointError, ConfigError, MissingDependencyError
from fewsight.eval.evaluate import evaluate_model
from fewsight.eval.io import write_json
from fewsight.eval.plots import plot_detection_grid, plot_precision_recall
from fewsight.hub import check_finite_weights, load_checkpoint_file, save_model, short_reason
from fewsight.train.builders import build_datasets, build_model, evaluation_view, resolve_anchors
from fewsight.train.checkpoint import AtomicCheckpointIO
from fewsight.train.config import TrainConfig, load_config, max_time, save_config
from fewsight.train.data import DetectionDataModule, sample_seed
from fewsight.train.module import DetectorModule

__all__ = [
    "EpochSeed",
    "TrainResult",
    "build_trainer",
    "check_resume",
    "checkpoint_paths",
    "fit",
    "prepare_run",
    "train_detector",
]

# Any training config (detector or embedder): each has seed, out_dir, trainer and checkpoint sections.
RunConfig = Any

log = logging.getLogger("fewsight.train")


class EpochSeed(Callback):
    """Re-seed torch / numpy / random from ``(seed, epoch)`` at every training epoch start, so an
    epoch's randomness does not depend on what ran before it (a resumed run's restore, the sanity
    check, ...)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        s = sample_seed(self.seed, trainer.current_epoch, -2)
        torch.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (2**32))


class BatchSamplerEpoch(Callback):
    """Give every training batch sampler with a ``set_epoch`` the epoch at each epoch start.

    Lightning sets the epoch of a loader's ``sampler`` and of ``batch_sampler.sampler`` only; a batch
    sampler that draws its own batches (:class:`~fewsight.data.samplers.ClassBalancedBatchSampler`)
    would otherwise repeat epoch 0's batches, and their augmentations, every epoch. Runs before the
    epoch's loader iterator is made, and again after a resume.
    """

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        for loader in loaders:
            batch_sampler = getattr(loader, "batch_sampler", None)
            if callable(getattr(batch_sampler, "set_epoch", None)):
                batch_sampler.set_epoch(trainer.current_epoch)


@dataclass
class TrainResult:
    """What :func:`train` produced (paths are ``None`` when not written, e.g. on DDP ranks > 0)."""

    model: nn.Module
    out_dir: Path
    metrics: dict[str, Any] | None = None
    val_metrics: dict[str, Any] | None = None
    last_checkpoint: Path | None = None
    best_checkpoint: Path | None = None
    model_path: Path | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _loggers(cfg: RunConfig, out_dir: Path) -> list[Any]:
    loggers: list[Any] = []
    for name in cfg.trainer.loggers:
        if name == "csv":
            from lightning.pytorch.loggers import CSVLogger

            loggers.append(CSVLogger(save_dir=str(out_dir), name="", version="logs"))
        elif name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                try:
                    import tensorboardX  # noqa: F401
                except ImportError:
                    raise MissingDependencyError(
                        "trainer.loggers: 'tensorboard' needs the tensorboard package: pip install tensorboard"
                    ) from None
            from lightning.pytorch.loggers import TensorBoardLogger

            loggers.append(TensorBoardLogger(save_dir=str(out_dir), name="", version="tensorboard"))
    return loggers


def build_trainer(cfg: RunConfig, out_dir: Path, *, has_val: bool, callbacks: Sequence[Callback] = ()) -> L.Trainer:
    """The ``lightning.Trainer`` of ``cfg`` (detector or embedder config) with fewsight's checkpointing,
    seeding and progress bar."""
    t = cfg.trainer
    ckpt_dir = out_dir / "checkpoints"
    every = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="epoch={epoch:03d}",
        auto_insert_metric_name=False,
        every_n_epochs=cfg.checkpoint.every_n_epochs,
        save_top_k=cfg.checkpoint.keep,
        monitor="epoch" if cfg.checkpoint.keep > 0 else None,
        mode="max",
        save_last=True,
        # Every epoch even when validation runs less often; after validation and the module's
        # epoch-end hooks, so a resumed run restarts exactly at the next epoch.
        save_on_train_epoch_end=True,
    )
    cbs: list[Callback] = [every, EpochSeed(cfg.seed), BatchSamplerEpoch()]
    if has_val:
        cbs.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="best",
                monitor=cfg.checkpoint.monitor,
                mode=cfg.checkpoint.mode,
                save_top_k=1,
                auto_insert_metric_name=False,
                enable_version_counter=False,
            )
        )
    if t.progress_bar:
        cbs.append(RichProgressBar(leave=True))
    loggers = _loggers(cfg, out_dir)
    if loggers:
        cbs.append(LearningRateMonitor(logging_interval="step"))
    cbs.extend(callbacks)
    kwargs: dict[str, Any] = {}
    if t.limit_train_batches is not None:
        kwargs["limit_train_batches"] = t.limit_train_batches
    if t.limit_val_batches is not None:
        kwargs["limit_val_batches"] = t.limit_val_batches
    if not has_val:
        kwargs["limit_val_batches"] = 0
    try:
        return _trainer(cfg, out_dir, cbs, loggers, has_val, kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as exc:
        if isinstance(exc, ConfigError):
            raise
        key = _trainer_key(str(exc))
        value = getattr(t, key.split(".", 1)[1], None) if key != "trainer" else None
        got = f"{value!r}" if key != "trainer" else "these settings"
        raise ConfigError(f"{key}: Lightning cannot build a trainer with {got} ({short_reason(str(exc), 160)})") from exc


# The trainer key a Lightning configuration error is about, by the words of its message.
_TRAINER_KEYS = (
    ("trainer.strategy", ("strategy",)),
    ("trainer.precision", ("precision",)),
    ("trainer.num_nodes", ("num_nodes",)),
    ("trainer.devices", ("devices", "device")),
    ("trainer.gradient_clip_algorithm", ("gradient_clip_algorithm",)),
    ("trainer.accelerator", ("accelerator", "gpu", "cuda", "tpu", "mps", "xla", "backend")),
)


def _trainer_key(message: str) -> str:
    lower = message.lower()
    for key, words in _TRAINER_KEYS:
        if any(w in lower for w in words):
            return key
    return "trainer"


def _trainer(cfg: RunConfig, out_dir: Path, cbs: list[Callback], loggers: list[Any], has_val: bool,
             kwargs: dict[str, Any]) -> L.Trainer:
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(out_dir),
        max_epochs=t.max_epochs,
        precision=t.precision,  # type: ignore[arg-type]
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        gradient_clip_val=t.gradient_clip_val,
        gradient_clip_algorithm=t.gradient_clip_algorithm,
        accumulate_grad_batches=t.accumulate_grad_batches,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        num_sanity_val_steps=t.num_sanity_val_steps if has_val else 0,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=t.progress_bar,
        callbacks=cbs,
        logger=loggers if loggers else False,
        max_time=max_time(t.max_time),
        plugins=[AtomicCheckpointIO()],
        use_distributed_sampler=False,
        **kwargs,
    )


def _resume_path(cfg: RunConfig) -> str | None:
    resume = cfg.checkpoint.resume
    if resume is False or resume is None:
        return None
    if resume is True or resume == "last":
        return "last"
    path = Path(str(resume))
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found (checkpoint.resume)")
    return str(path)


def _epoch_number(path: Path) -> int:
    digits = path.stem.split("=", 1)[-1].split("-", 1)[0]
    return int(digits) if digits.isdigit() else -1


def _training_state(path: Path) -> dict[str, Any]:
    """The Lightning checkpoint at ``path``, its weights finite (CheckpointError otherwise); a model file
    or another torch file is a ConfigError."""
    ckpt = load_checkpoint_file(path)
    if not (isinstance(ckpt.get("state_dict"), Mapping) and "loops" in ckpt and "epoch" in ckpt):
        what = "a fewsight model file (weights without the training state)" if "format" in ckpt else \
            f"a torch file with keys {sorted(map(str, ckpt))[:6]}"
        raise ConfigError(f"checkpoint.resume: expected a Lightning training checkpoint (last.ckpt or epoch=NNN.ckpt "
                          f"under OUT/checkpoints), got {path}, {what}")
    check_finite_weights(path, ckpt["state_dict"])
    return ckpt


def _newest_intact(folder: Path, exclude: Path) -> Path | None:
    candidates = sorted((p for p in folder.glob("epoch=*.ckpt") if p.resolve() != exclude.resolve()),
                        key=_epoch_number, reverse=True)
    for candidate in candidates:
        try:
            _training_state(candidate)
        except (CheckpointError, ConfigError):
            continue
        return candidate
    return None


def _first_difference(old: Any, new: Any, where: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in [*old, *(k for k in new if k not in old)]:
            found = _first_difference(old.get(key, _UNSET), new.get(key, _UNSET), f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
        return None
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return None if old == new else (where, old, new)


_UNSET = object()
# Model-spec keys whose config key is not ``model.<key>``.
_SPEC_CONFIG_KEYS = {"name": "model.name", "classes": "data.train (its classes)", "num_classes": "model.num_classes",
                     "kwargs.crop_size": "data.size", "whitened_dim": "model.dim"}


def _config_key(spec_key: str) -> str:
    if spec_key in _SPEC_CONFIG_KEYS:
        return _SPEC_CONFIG_KEYS[spec_key]
    return "model." + (spec_key[len("kwargs."):] if spec_key.startswith("kwargs.") else spec_key)


def check_resume(ckpt_path: str | None, checkpoint_dir: Path, model_spec: Mapping[str, Any] | None) -> str | None:
    """Check what a run resumes from before anything is written; returns Lightning's ``ckpt_path``.

    ``ckpt_path``: :func:`prepare_run`'s (``"last"``: ``checkpoint_dir/last.ckpt`` when it exists).
    Raises :class:`~fewsight.errors.CheckpointError` when the file is damaged or its weights are not
    finite, naming the newest intact ``epoch=NNN.ckpt`` beside it and the setting that resumes from
    it; :class:`~fewsight.errors.ConfigError` when it is not a Lightning training checkpoint (a model
    file), or when its model differs from ``model_spec`` (the first differing config key, both values).
    """
    if ckpt_path is None:
        return None
    path = checkpoint_dir / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if ckpt_path == "last" and not path.is_file():
        return ckpt_path  # nothing to resume yet: Lightning starts afresh
    try:
        ckpt = _training_state(path)
    except CheckpointError as exc:
        intact = _newest_intact(path.parent, path)
        hint = (f"the newest intact checkpoint is {intact}: resume from it with --set checkpoint.resume={intact}"
                if intact is not None else f"no intact epoch=NNN.ckpt in {path.parent}: start afresh without resuming")
        raise CheckpointError(f"{exc}; {hint}") from exc
    stored = (ckpt.get("hyper_parameters") or {}).get("model_spec")
    if isinstance(stored, Mapping) and model_spec is not None:
        found = _first_difference(dict(stored), dict(model_spec))
        if found is not None:
            key, old, new = found
            show = lambda v: "(not set)" if v is _UNSET else repr(v)  # noqa: E731
            raise ConfigError(f"{_config_key(key)}: the checkpoint {path} was trained with {show(old)}, the config "
                              f"says {show(new)} (resume with the config it was trained with, or use another out_dir)")
    return ckpt_path


def prepare_run(cfg: RunConfig) -> tuple[Path, str | None]:
    """Create ``out_dir``, apply ``trainer.threads``, seed everything; returns ``(out_dir, ckpt_path)``
    (Lightning's ``ckpt_path`` for ``checkpoint.resume``, ``None`` for a fresh run)."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    ckpt_path = _resume_path(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return out_dir, ckpt_path


def fit(trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None) -> None:
    """``trainer.fit`` (checkpoints read with ``weights_only=True``) without the warnings that are
    expected here."""
    with warnings.catch_warnings():
        # Expected here (num_workers=0 on small data, frozen backbone stages kept in eval mode,
        # resuming into the run's own folders, a Lightning-internal deprecation): only noise for users.
        for message in (
            ".*does not have many workers.*",
            ".*number of training batches.*smaller than the logging interval.*",
            ".*module\\(s\\) in eval mode at the start of training.*",
            ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ):
            warnings.filterwarnings("ignore", message=message)
        if ckpt_path is not None:
            warnings.filterwarnings("ignore", message=".*(Checkpoint|Experiment logs) directory.*exists and is not empty.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)


def checkpoint_paths(trainer: L.Trainer, monitor: str) -> tuple[Path | None, Path | None]:
    """``(last, best)`` checkpoint paths of a fitted :func:`build_trainer` trainer (``None``: not written)."""
    last = best = None
    every = trainer.checkpoint_callbacks[0] if trainer.checkpoint_callbacks else None
    if isinstance(every, ModelCheckpoint) and every.last_model_path:
        last = Path(every.last_model_path)
    found = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == monitor]
    if found and found[0].best_model_path:
        best = Path(found[0].best_model_path)
    return last, best


def train_detector(
    config: TrainConfig | Mapping[str, Any] | str | Path,
    *,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    evaluate: bool = True,
) -> TrainResult:
    """Train the detector described by ``config`` (a :class:`TrainConfig`, a mapping or a YAML path).

    ``overrides``: ``"key.path=value"`` strings applied to a mapping / file config. ``callbacks``:
    extra Lightning callbacks. ``evaluate``: evaluate the final model and write ``metrics.json``
    and the figures (global rank 0 only). See the module docstring for the outputs.
    """
    if isinstance(config, TrainConfig) and overrides:
        raise ConfigError("overrides: only for a mapping or a YAML file config, not a TrainConfig")
    cfg = config if isinstance(config, TrainConfig) else load_config(config, overrides)
    start = time.perf_counter()
    out_dir, ckpt_path = prepare_run(cfg)

    train_set, val_set, test_set = build_datasets(cfg.data)
    model_cfg, anchors = resolve_anchors(cfg.model, train_set)
    if anchors is not None:
        rank_zero_info(f"anchor_generator: auto -> {anchors.config()} (best-possible recall {anchors.recall:.3f}, "
                       f"the model's default anchors {anchors.current_recall:.3f})")
    model = build_model(model_cfg, train_set.classes)
    spec = model.to_spec()
    module = DetectorModule(
        model, optimizer=cfg.optimizer, schedule=cfg.schedule, class_names=list(train_set.classes), model_spec=spec
    )
    datamodule = DetectionDataModule(
        train_set,
        val_set,
        batch_size=cfg.data.batch_size,
        val_batch_size=cfg.data.val_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
    )
    ckpt_path = check_resume(ckpt_path, out_dir / "checkpoints", spec)
    trainer = build_trainer(cfg, out_dir, has_val=val_set is not None, callbacks=callbacks)
    if trainer.is_global_zero:
        save_config(cfg, out_dir / "config.yaml")
    fit(trainer, module, datamodule, ckpt_path)

    result = TrainResult(model=module.model, out_dir=out_dir, val_metrics=module.last_val_metrics)
    result.last_checkpoint, result.best_checkpoint = checkpoint_paths(trainer, cfg.checkpoint.monitor)
    if not trainer.is_global_zero:
        return result

    result.model_path = save_model(module.model, out_dir / "model.pt", metadata={"epochs": trainer.current_epoch})
    train_seconds = time.perf_counter() - start
    if evaluate and (test_set is not None or val_set is not None):
        # A tiled split: sliced inference on its whole images (builders.evaluation_view).
        eval_model, eval_set, sliced = evaluation_view(module.model, test_set if test_set is not None else val_set)
        metrics, predictions = evaluate_model(
            eval_model,
            eval_set,
            cfg.data.val_batch_size or cfg.data.batch_size,
            class_names=list(train_set.classes),
            progress=cfg.trainer.progress_bar,
            pr_curves=cfg.eval.pr_curves,
            return_predictions=True,
        )
        curves = metrics.pop("pr_curves", None)
        metrics["split"] = "test" if test_set is not None else "val"
        if sliced is not None:
            metrics["sliced"] = sliced
        metrics["train_seconds"] = train_seconds
        metrics["epochs"] = trainer.current_epoch
        write_json(metrics, out_dir / "metrics.json")
        if curves is not None:
            plot_precision_recall(curves, path=out_dir / "pr_curve.png")
        n = min(cfg.eval.plot_images, len(eval_set))
        if n > 0:
            samples = [eval_set[i] for i in range(n)]
            plot_detection_grid(
                [s[0] for s in samples],
                predictions[:n],
                [s[1] for s in samples],
                list(train_set.classes),
                out_dir / "detections.png",
                score_threshold=cfg.eval.score_threshold,
            )
        result.metrics = metrics
    result.seconds = time.perf_counter() - start
    return result
