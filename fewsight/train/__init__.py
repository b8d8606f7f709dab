"""fewsight.train: Lightning training of fewsight detectors and crop embedders from YAML configs.

* :func:`train` — one entry for both tasks: a detector config (:func:`train_detector`: datasets, model,
  final evaluation, ``model.pt`` / ``metrics.json`` / figures) or an embedder config (``task: embedder``,
  :func:`train_embedder`: class-balanced crops, a metric loss, learned whitening, ``embedder.pt`` /
  ``metrics.json``), both on the same ``Trainer`` (checkpoints each epoch + best + last, exact resume,
  AMP, clipping, warmup + cosine / multistep LR, CSV / TensorBoard logs, Lightning DDP).
* :class:`DetectorModule` / :class:`EmbedderModule` — the LightningModules.
* :class:`TrainConfig`, :class:`EmbedderTrainConfig` and friends; :func:`load_config` reads either by
  the file's ``task`` (unknown keys -> ``ConfigError``).
* Model files (``model.pt``, ``embedder.pt``) are written and read by :mod:`fewsight.hub`.

Example:
    >>> cfg = load_config({"data": {"train": {"type": "digits", "num_images": 4}}, "model": {"name": "retinanet"}})
    >>> cfg.model.name, cfg.optimizer.name, cfg.schedule.name
    ('retinanet', 'sgd', 'cosine')
"""

from collections.abc import Sequence
from typing import Any

from fewsight.train.builders import build_dataset, build_datasets, build_model
from fewsight.train.checkpoint import AtomicCheckpointIO
from fewsight.train.config import (
    CheckpointConfig,
    DataConfig,
    DatasetConfig,
    EvalConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainerConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    read_config_mapping,
    save_config,
)
from fewsight.train.demo import DEMO_CONFIG, run_demo
from fewsight.train.embedder import EmbedderModule, train_embedder
from fewsight.train.embedder_config import (
    EmbedderDataConfig,
    EmbedderLossConfig,
    EmbedderModelConfig,
    EmbedderTrainConfig,
    embedder_config_from_dict,
)
from fewsight.train.loop import TrainResult, train_detector
from fewsight.train.module import DetectorModule

__all__ = [
    "DEMO_CONFIG",
    "AtomicCheckpointIO",
    "CheckpointConfig",
    "DataConfig",
    "DatasetConfig",
    "DetectorModule",
    "EmbedderDataConfig",
    "EmbedderLossConfig",
    "EmbedderModelConfig",
    "EmbedderModule",
    "EmbedderTrainConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "TrainerConfig",
    "apply_overrides",
    "build_dataset",
    "build_datasets",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "run_demo",
    "save_config",
    "train",
    "train_detector",
    "train_embedder",
]


def load_config(source: Any, overrides: Sequence[str] = ()) -> TrainConfig | EmbedderTrainConfig:
    """Read a training config (a YAML path or a mapping, ``overrides`` applied) as the type its ``task``
    names: :class:`TrainConfig` (``detector``, the default) or :class:`EmbedderTrainConfig` (``embedder``).
    Unknown keys and bad values raise :class:`~fewsight.errors.ConfigError` naming the dotted key."""
    data = read_config_mapping(source, overrides)
    if data.get("task", "detector") == "embedder":
        return embedder_config_from_dict(data)
    return config_from_dict(data)


def train(
    config: Any, *, overrides: Sequence[str] = (), callbacks: Sequence[Any] = (), evaluate: bool = True
) -> TrainResult:
    """Train what ``config`` describes (a config object, a mapping or a YAML path): an embedder config
    goes to :func:`train_embedder`, a detector config to :func:`train_detector`."""
    typed = isinstance(config, (TrainConfig, EmbedderTrainConfig))
    if typed and overrides:
        from fewsight.errors import ConfigError

        raise ConfigError("overrides: only for a mapping or a YAML file config, not a config object")
    cfg = config if typed else load_config(config, overrides)
    if isinstance(cfg, EmbedderTrainConfig):
        return train_embedder(cfg, callbacks=callbacks, evaluate=evaluate)
    return train_detector(cfg, callbacks=callbacks, evaluate=evaluate)
