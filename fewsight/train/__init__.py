"""fewsight.train: Lightning training of fewsight detectors from YAML configs.

* :func:`train` — datasets, model, ``Trainer`` (checkpoints each epoch + best + last, exact resume,
  AMP, clipping, warmup + cosine / multistep LR, CSV / TensorBoard logs, Lightning DDP), final
  evaluation, ``model.pt`` / ``metrics.json`` / figures.
* :class:`DetectorModule` — the LightningModule wrapping any fewsight detector.
* :class:`TrainConfig` and friends, :func:`load_config` (unknown keys -> ``ConfigError``).
* :func:`save_detector` / :func:`load_detector` — self-contained model files;
  :func:`load_checkpoint_file` — ``weights_only=True`` loading with clear ``CheckpointError``.

Example:
    >>> cfg = load_config({"data": {"train": {"type": "digits", "num_images": 4}}, "model": {"name": "retinanet"}})
    >>> cfg.model.name, cfg.optimizer.name, cfg.schedule.name
    ('retinanet', 'sgd', 'cosine')
"""

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
    load_config,
    save_config,
)
from fewsight.train.demo import DEMO_CONFIG, run_demo
from fewsight.train.data import DetectionDataModule, EpochSampler, SeededDataset, sample_seed
from fewsight.train.loop import EpochSeed, TrainResult, build_trainer, train
from fewsight.train.module import DetectorModule, lr_factor, parameter_groups

__all__ = [
    "DATASET_TYPES",
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
    "build_model",
    "build_trainer",
    "config_from_dict",
    "config_to_dict",
    "dataset_class",
    "load_checkpoint_file",
    "load_config",
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
]
