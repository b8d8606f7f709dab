"""fewsight.train: Lightning training of fewsight detectors and crop embedders from YAML configs.

* :func:`train` — one entry for both tasks: a detector config (:func:`train_detector`: datasets, model,
  final evaluation, ``model.pt`` / ``metrics.json`` / figures) or an embedder config (``task: embedder``,
  :func:`train_embedder`: class-balanced crops, a metric loss, learned whitening, ``embedder.pt`` /
  ``metrics.json``), both on the same ``Trainer`` (checkpoints each epoch + best + last, exact resume,
  AMP, clipping, warmup + cosine / multistep LR, CSV / TensorBoard logs, Lightning DDP).
* :class:`DetectorModule` / :class:`EmbedderModule` — the LightningModules.
* :class:`TrainConfig`, :class:`EmbedderTrainConfig` and friends; :func:`load_config` reads either by
  the file's ``task`` (unknown keys -> ``ConfigError``).
* :func:`save_detector` / :func:`load_detector` — self-contained model files;
  :func:`load_checkpoint_file` — ``weights_only=True`` loading with clear ``CheckpointError``.

Example:
    >>> cfg = load_config({"data": {"train": {"type": "digits", "num_images": 4}}, "model": {"name": "retinanet"}})
    >>> cfg.model.name, cfg.optimizer.name, cfg.schedule.name
    ('retinanet', 'sgd', 'cosine')
"""

from collections.abc import Sequence
from typing import Any

from fewsight.train.builders import (
    MODEL_CLASSES,
    build_dataset,
    build_datasets,
    build_model,
    dataset_class,
    model_class,
    model_spec,
    set_model_spec,
)
from fewsight.train.checkpoint import (
    DETECTOR_FORMAT,
    AtomicCheckpointIO,
    load_checkpoint_file,
    load_detector,
    save_detector,
)
from fewsight.train.config import (
    DATASET_TYPES,
    MODEL_NAMES,
    PRECISIONS,
    TASKS,
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
from fewsight.train.config import load_config as load_detector_config
from fewsight.train.demo import DEMO_CONFIG, run_demo
from fewsight.train.data import DetectionDataModule, EpochSampler, SeededDataset, sample_seed
from fewsight.train.embedder import EmbedderModule, EmbeddingObjective, build_objective, train_embedder
from fewsight.train.embedder_config import (
    EMBEDDER_DATA_TYPES,
    EMBEDDER_LOSSES,
    EmbedderDataConfig,
    EmbedderLossConfig,
    EmbedderModelConfig,
    EmbedderTrainConfig,
    embedder_config_from_dict,
)
from fewsight.train.embedder_data import EmbedderDataModule, build_embedder_data
from fewsight.train.loop import EpochSeed, TrainResult, build_trainer, train_detector
from fewsight.train.module import DetectorModule, lr_factor, parameter_groups

__all__ = [
    "DATASET_TYPES",
    "EMBEDDER_DATA_TYPES",
    "EMBEDDER_LOSSES",
    "TASKS",
    "DEMO_CONFIG",
    "DETECTOR_FORMAT",
    "MODEL_CLASSES",
    "MODEL_NAMES",
    "PRECISIONS",
    "AtomicCheckpointIO",
    "CheckpointConfig",
    "DataConfig",
    "DatasetConfig",
    "DetectionDataModule",
    "DetectorModule",
    "EmbedderDataConfig",
    "EmbedderDataModule",
    "EmbedderLossConfig",
    "EmbedderModelConfig",
    "EmbedderModule",
    "EmbedderTrainConfig",
    "EmbeddingObjective",
    "EpochSampler",
    "EpochSeed",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "SeededDataset",
    "TrainConfig",
    "TrainResult",
    "TrainerConfig",
    "apply_overrides",
    "build_dataset",
    "build_datasets",
    "build_embedder_data",
    "build_model",
    "build_objective",
    "build_trainer",
    "config_from_dict",
    "config_to_dict",
    "dataset_class",
    "embedder_config_from_dict",
    "load_checkpoint_file",
    "load_config",
    "load_detector_config",
    "load_detector",
    "lr_factor",
    "model_class",
    "model_spec",
    "parameter_groups",
    "run_demo",
    "sample_seed",
    "save_config",
    "save_detector",
    "set_model_spec",
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
