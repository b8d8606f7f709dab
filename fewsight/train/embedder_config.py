"""Embedder training configuration (``task: embedder``): typed dataclasses read from YAML.

A config file mirrors :class:`EmbedderTrainConfig`::

    task: embedder
    seed: 0
    out_dir: runs/emoji_embedder
    data:
      type: emoji                     # emoji | crops | image_folder
      root: data/emoji
      size: 192                       # crop side
      classes_per_batch: 64           # P
      items_per_class: 2              # K (split across styles / domains)
      val_classes: 0                  # base classes held out for validation (0: see below)
      augment: {scale: [0.8, 1.0], jitter: 0.2}
    model: {dim: 128, grid: 3, blocks: 14, pretrained: true, tta_scales: [1.0, 0.9, 0.8]}
    loss: {name: circle_arcface, circle_m: 0.25, circle_gamma: 64, margin_scale: 30, arcface_margin: 0.3}
    optimizer: {name: adamw, lr: 0.002, weight_decay: 0.0005, norm_weight_decay: null}
    schedule: {name: cosine, warmup_steps: 8, warmup_factor: 0.125}
    trainer: {max_epochs: 12}
    whitening: {epochs: 2}

Data types:

* ``emoji``: :class:`fewsight.data.emoji.EmojiCrops` on ``root`` (``make emoji-data``), the base classes
  for training (both ``styles``, one domain each), the novel classes for the final test (queries of the
  first style against the gallery of the second). ``val_classes: N`` holds out N base classes (a
  fixed draw) for validation; with 0, every base class trains and validation watches the novel classes
  (monitoring only: nothing is chosen on it, the embedder file is the last epoch's).
  ``max_classes`` keeps the first N base and N novel classes (smoke runs).
* ``crops``: the boxes of a detection dataset (``dataset: {type: digits, ...}``, any ``data.train``
  entry of a detector config) through :class:`fewsight.data.crops.BoxCrops`.
* ``image_folder``: :class:`fewsight.data.crops.ImageFolderCrops` on ``root`` (``domains``: optional
  per-domain sub-folders).

For ``crops`` and ``image_folder``, ``val_classes`` classes (a fixed draw) are held out for validation
and the final metrics (default 0: no validation).

Losses (``loss.name``): ``circle``, ``triplet`` (batch-hard on unit embeddings), ``arcface``,
``cosface``, ``center_ce`` (softmax CE + ``center_weight`` × center loss), ``ccs_ce`` (softmax CE on a
bias-free classifier + ``ccs_weight`` × CCS towards its detached weights), ``circle_arcface`` (circle +
``aux_weight`` × ArcFace). Loss parameters (class weights, centres) train at ``lr × param_lr_mult``
without weight decay.

Unknown keys and bad values raise :class:`~fewsight.errors.ConfigError` naming the dotted key.

Example:
    >>> cfg = embedder_config_from_dict({"task": "embedder", "data": {"type": "emoji", "size": 64}})
    >>> cfg.loss.name, cfg.data.size, cfg.checkpoint.monitor
    ('circle', 64, 'val/recall@1')
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fewsight.errors import ConfigError
from fewsight.data.formats import FORMATS, get_format
from fewsight.train.config import (
    CheckpointConfig,
    DatasetConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainerConfig,
    _choice,
    _from_dict,
    _positive,
    check_kwargs,
    validate_run,
)

__all__ = [
    "EMBEDDER_DATA_TYPES",
    "EMBEDDER_LOSSES",
    "AugmentConfig",
    "EmbedderCheckpointConfig",
    "EmbedderOptimizerConfig",
    "EmbedderDataConfig",
    "EmbedderEvalConfig",
    "EmbedderLossConfig",
    "EmbedderModelConfig",
    "EmbedderTrainConfig",
    "WhiteningConfig",
    "embedder_config_from_dict",
    "embedder_config_to_dict",
    "save_embedder_config",
]

EMBEDDER_DATA_TYPES = ("emoji", "crops", "image_folder")
EMBEDDER_LOSSES = ("circle", "triplet", "arcface", "cosface", "center_ce", "ccs_ce", "circle_arcface")


@dataclass
class AugmentConfig:
    """Training augmentation (:func:`fewsight.data.crops.crop_augmentation`); ``enabled: false`` for none."""

    enabled: bool = True
    scale: tuple[float, float] = (0.8, 1.0)
    jitter: float = 0.2
    fill: float = 1.0


@dataclass
class EmbedderDataConfig:
    """Where crops come from and how batches are drawn (see the module docstring)."""

    type: str = "emoji"
    root: str | None = None
    dataset: DatasetConfig | None = None
    styles: list[str] = field(default_factory=lambda: ["google", "twitter"])
    domains: list[str] | None = None
    context: float = 0.0
    size: int = 64
    val_classes: int = 0
    max_classes: int | None = None
    classes_per_batch: int = 64
    items_per_class: int = 2
    passes: int | None = None
    val_batch_size: int = 128
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class EmbedderModelConfig:
    """:class:`~fewsight.fewshot.CropEmbedder` arguments (``crop_size`` is ``data.size``)."""

    dim: int = 128
    grid: int = 3
    blocks: int = 14
    pretrained: bool = True
    tta_scales: list[float] = field(default_factory=list)
    tta_fill: float = 1.0


@dataclass
class EmbedderLossConfig:
    """``name`` (see :data:`EMBEDDER_LOSSES`) and every loss's hyper-parameters."""

    name: str = "circle"
    circle_m: float = 0.25
    circle_gamma: float = 64.0
    triplet_margin: float = 0.2
    triplet_mining: str = "batch_hard"
    margin_scale: float = 30.0
    arcface_margin: float = 0.3
    cosface_margin: float = 0.35
    aux_weight: float = 0.5
    center_weight: float = 0.01
    ccs_weight: float = 1.0
    param_lr_mult: float = 10.0


@dataclass
class WhiteningConfig:
    """Learned whitening fitted after training on ``epochs`` augmented epochs of the training classes
    (all domains); ``enabled: false`` keeps the identity."""

    enabled: bool = True
    epochs: int = 2
    shrink: float = 0.0


@dataclass
class EmbedderEvalConfig:
    """Retrieval figures: Recall@``ks``, MAP@R, and CSLS with ``csls_k`` neighbours in the final test."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    csls_k: int = 10


@dataclass
class EmbedderCheckpointConfig(CheckpointConfig):
    """:class:`~fewsight.train.config.CheckpointConfig` with ``best.ckpt`` chosen by validation Recall@1."""

    monitor: str = "val/recall@1"


@dataclass
class EmbedderOptimizerConfig(OptimizerConfig):
    """:class:`~fewsight.train.config.OptimizerConfig` defaulting to AdamW, lr 2e-3, weight decay 5e-4."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4


@dataclass
class EmbedderTrainConfig:
    """The whole embedder training run (``task: embedder``; see the module docstring)."""

    seed: int = 0
    out_dir: str = "runs/embedder"
    data: EmbedderDataConfig = field(default_factory=EmbedderDataConfig)
    model: EmbedderModelConfig = field(default_factory=EmbedderModelConfig)
    loss: EmbedderLossConfig = field(default_factory=EmbedderLossConfig)
    optimizer: EmbedderOptimizerConfig = field(default_factory=EmbedderOptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: EmbedderCheckpointConfig = field(default_factory=EmbedderCheckpointConfig)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)
    eval: EmbedderEvalConfig = field(default_factory=EmbedderEvalConfig)

    def validate(self) -> EmbedderTrainConfig:
        """Cross-field checks (choices, ranges); returns ``self``."""
        _validate(self)
        return self


def embedder_config_from_dict(data: Mapping[str, Any]) -> EmbedderTrainConfig:
    """Build and validate an :class:`EmbedderTrainConfig` from a mapping (``task`` optional, ``embedder``)."""
    data = copy.deepcopy(dict(data))
    task = data.pop("task", "embedder")
    if task != "embedder":
        raise ConfigError(f"task: expected 'embedder' for an embedder config, got {task!r}")
    return _from_dict(EmbedderTrainConfig, data, "").validate()


def embedder_config_to_dict(config: EmbedderTrainConfig) -> dict[str, Any]:
    """The YAML-like mapping of ``config``, ``task: embedder`` first (``embedder_config_from_dict`` reads it)."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, DatasetConfig):
            return {"type": obj.type, **copy.deepcopy(obj.args)}
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [convert(v) for v in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return {"task": "embedder", **convert(config)}


def save_embedder_config(config: EmbedderTrainConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML (atomically)."""
    from fewsight._io import atomic_write_bytes

    return atomic_write_bytes(yaml.safe_dump(embedder_config_to_dict(config), sort_keys=False).encode("utf-8"), path)


def _validate(cfg: EmbedderTrainConfig) -> None:
    d = cfg.data
    _choice("data.type", d.type, EMBEDDER_DATA_TYPES)
    if d.type == "crops":
        if d.dataset is None:
            raise ConfigError("data.dataset: expected a detection dataset ({type: ..., ...}) for data.type 'crops', got none")
        _choice("data.dataset.type", d.dataset.type, FORMATS)
        check_kwargs("data.dataset", get_format(d.dataset.type).dataset_class, d.dataset.args, reserved=("transforms",))
    elif d.dataset is not None:
        raise ConfigError(f"data.dataset: only for data.type 'crops', got data.type {d.type!r}")
    if d.type == "image_folder" and not d.root:
        raise ConfigError("data.root: expected the image folder for data.type 'image_folder', got none")
    if d.type == "emoji" and len(d.styles) != 2:
        raise ConfigError(f"data.styles: expected two emoji styles (queries, gallery), got {d.styles!r}")
    _positive("data.size", d.size, 8)
    _positive("data.val_classes", d.val_classes, 0)
    if d.max_classes is not None:
        _positive("data.max_classes", d.max_classes, 2)
    _positive("data.classes_per_batch", d.classes_per_batch, 2)
    _positive("data.items_per_class", d.items_per_class, 1)
    if d.passes is not None:
        _positive("data.passes", d.passes, 1)
    _positive("data.val_batch_size", d.val_batch_size)
    _positive("data.num_workers", d.num_workers, 0)
    if not d.context >= 0:
        raise ConfigError(f"data.context: expected a margin >= 0, got {d.context}")
    lo, hi = d.augment.scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.augment.scale: expected 0 < min <= max <= 1, got {[lo, hi]}")
    if not 0 <= d.augment.jitter < 1:
        raise ConfigError(f"data.augment.jitter: expected a value in [0, 1), got {d.augment.jitter}")
    if not 0 <= d.augment.fill <= 1:
        raise ConfigError(f"data.augment.fill: expected a value in [0, 1], got {d.augment.fill}")

    m = cfg.model
    _positive("model.dim", m.dim)
    _positive("model.grid", m.grid)
    _positive("model.blocks", m.blocks)
    if any(not 0 < s <= 1 for s in m.tta_scales):
        raise ConfigError(f"model.tta_scales: expected fractions in (0, 1], got {m.tta_scales}")

    loss = cfg.loss
    _choice("loss.name", loss.name, EMBEDDER_LOSSES)
    _choice("loss.triplet_mining", loss.triplet_mining, ("batch_hard", "batch_all", "semi_hard"))
    for key in ("circle_gamma", "margin_scale", "param_lr_mult"):
        if not getattr(loss, key) > 0:
            raise ConfigError(f"loss.{key}: expected > 0, got {getattr(loss, key)}")
    for key in ("aux_weight", "center_weight", "ccs_weight", "triplet_margin"):
        _positive(f"loss.{key}", getattr(loss, key), 0)

    _positive("whitening.epochs", cfg.whitening.epochs)
    if not 0 <= cfg.whitening.shrink <= 1:
        raise ConfigError(f"whitening.shrink: expected a value in [0, 1], got {cfg.whitening.shrink}")
    if not cfg.eval.ks or any(k < 1 for k in cfg.eval.ks):
        raise ConfigError(f"eval.ks: expected ints >= 1, got {cfg.eval.ks}")
    _positive("eval.csls_k", cfg.eval.csls_k)
    validate_run(cfg)
