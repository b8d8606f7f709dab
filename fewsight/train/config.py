"""Training configuration: typed dataclasses read from YAML, with unknown keys rejected.

A config file mirrors :class:`TrainConfig`::

    seed: 0
    out_dir: runs/digits
    data:
      train: {type: digits, split: train, num_images: 800, classes: [0, 1, 2, 3, 4, 5, 6, 7]}
      val:   {type: digits, split: val, num_images: 150, classes: [0, 1, 2, 3, 4, 5, 6, 7]}
      batch_size: 16
      augment: {scale_range: [0.8, 1.2], photometric: false}
    model: {name: dldenet, backbone: mobilenet_v2, weights: IMAGENET1K_V1}
    optimizer: {name: sgd, lr: 0.01, weight_decay: 0.0001}
    schedule: {name: cosine, warmup_steps: 100}
    trainer: {max_epochs: 6, precision: "32", gradient_clip_val: 10.0}
    checkpoint: {resume: false}

* ``data.train`` / ``data.val`` / ``data.test``: ``type`` is one of :data:`fewsight.data.FORMATS` and every
  other key is an argument of that dataset class (``digits`` ->
  :class:`~fewsight.data.DigitsDataset`, ``emoji`` -> :class:`~fewsight.data.EmojiLogosDataset`,
  ``coco`` -> :class:`~fewsight.data.COCODataset`, ``voc``, ``yolo``, ``csv``). Relative paths are
  relative to the current working directory. Two more keys:

  - ``tiling: {size: 512, overlap: 0.2, min_visibility: 0.5, crops_per_image: null, mode: ...}``
    (:class:`TilingConfig`) reads the split as tiles of its images (:class:`fewsight.data.TiledDataset`):
    random crops for ``train``, grid tiles for ``val`` / ``test``;
  - ``class_map: {old: new | null}`` renames, merges or drops classes as the split is read
    (:func:`fewsight.data.apply_class_map`).
* ``model``: ``name`` is a detector of :data:`fewsight.hub.MODELS`; ``num_classes`` defaults to the training
  set's class count; every other key is a keyword argument of the model's constructor.
* Everything else is a field of the dataclasses below.

Any unknown key, wrong type or bad choice raises :class:`~fewsight.errors.ConfigError` naming
the dotted key (``trainer.max_epoch: unknown key; expected one of [...]``).

A top-level ``task`` says what the file trains: ``detector`` (the default when absent) or ``embedder``
(a metric-learning crop embedder, :class:`~fewsight.train.embedder_config.EmbedderTrainConfig`);
:func:`fewsight.train.load_config` returns the matching config type and :func:`fewsight.train.train`
dispatches on it; :func:`load_config` here reads detector configs.

Example:
    >>> cfg = config_from_dict({"data": {"train": {"type": "digits", "num_images": 8}},
    ...                         "trainer": {"max_epochs": 1}})
    >>> cfg.trainer.max_epochs, cfg.data.train.type, cfg.model.name
    (1, 'digits', 'dldenet')
    >>> try:
    ...     config_from_dict({"data": {"train": {"type": "digits"}}, "trainer": {"max_epoch": 1}})
    ... except ConfigError as e:
    ...     print(str(e).split(";")[0])
    trainer.max_epoch: unknown key
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Union

import yaml

from fewsight.data.formats import FORMATS, get_format
from fewsight.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "TASKS",
    "TilingConfig",
    "CheckpointConfig",
    "DataConfig",
    "DatasetConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainerConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "max_time",
    "read_config_mapping",
    "save_config",
    "validate_run",
]

PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "64", "64-true")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("cosine", "multistep", "constant")
LOGGERS = ("csv", "tensorboard")
TASKS = ("detector", "embedder")


#: Keys of a split that are not dataset-class arguments.
SPLIT_KEYS = ("tiling", "class_map")


@dataclass
class TilingConfig:
    """``data.<split>.tiling``: read the split as tiles (:class:`fewsight.data.TiledDataset`).

    ``size`` (int or ``[h, w]``), ``overlap`` (grid tiles), ``min_visibility`` (objects cut below it are
    ignore regions of the tile), ``mode`` (``random`` crops: the default for ``train``; ``grid``: the
    default, and the only mode, for ``val`` / ``test``), ``crops_per_image`` (random crops per image
    and epoch; ``null``: enough to cover each image's area about once).
    """

    size: Any = 512
    overlap: float = 0.2
    min_visibility: float = 0.5
    mode: str | None = None
    crops_per_image: int | None = None


@dataclass
class DatasetConfig:
    """One split: ``type`` (see :data:`fewsight.data.FORMATS`) and the dataset class's keyword arguments
    (``args``; its ``tiling`` and ``class_map`` entries are read by :attr:`tiling` / :attr:`class_map`)."""

    type: str = "digits"
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset_args(self) -> dict[str, Any]:
        """The dataset class's keyword arguments (``args`` without ``tiling`` / ``class_map``)."""
        return {k: v for k, v in self.args.items() if k not in SPLIT_KEYS}

    @property
    def tiling(self) -> TilingConfig | None:
        """The parsed ``tiling`` entry (``None``: whole images)."""
        raw = self.args.get("tiling")
        return None if raw is None else _from_dict(TilingConfig, raw, "tiling")

    @property
    def class_map(self) -> dict[str, str | None] | None:
        """The ``class_map`` entry, names as strings (``None``: the dataset's own classes)."""
        from fewsight.data.formats import check_class_map

        raw = self.args.get("class_map")
        return None if raw is None else check_class_map(raw)


@dataclass
class DataConfig:
    """Datasets and loading. ``augment``: keyword arguments of
    :func:`fewsight.data.train_transforms` for the training set (``None``: no augmentation)."""

    train: DatasetConfig = field(default_factory=DatasetConfig)
    val: DatasetConfig | None = None
    test: DatasetConfig | None = None
    batch_size: int = 8
    val_batch_size: int | None = None
    num_workers: int = 0
    augment: dict[str, Any] | None = None


@dataclass
class ModelConfig:
    """``name`` (a detector of :data:`fewsight.hub.MODELS`), ``num_classes`` (default: the training set's) and the
    constructor's other keyword arguments in ``kwargs`` (flat in YAML)."""

    name: str = "dldenet"
    num_classes: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    """``sgd`` (momentum, nesterov), ``adamw`` or ``adam`` (betas). ``norm_weight_decay`` applies to
    normalisation layers and biases (``None``: the same as ``weight_decay``)."""

    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = 0.0


@dataclass
class ScheduleConfig:
    """Per-step learning-rate factor: linear warmup from ``warmup_factor`` over ``warmup_steps``
    optimizer steps, then ``cosine`` (down to ``min_lr_ratio``), ``multistep`` (times ``gamma`` at
    each epoch of ``milestones``) or ``constant``."""

    name: str = "cosine"
    warmup_steps: int = 0
    warmup_factor: float = 0.001
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    min_lr_ratio: float = 0.0


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` (``progress_bar`` -> a ``RichProgressBar``;
    ``loggers`` among ``csv`` / ``tensorboard``; ``threads`` -> ``torch.set_num_threads``).

    ``max_time``: a wall-clock budget, Lightning's ``max_time`` (training stops at the first batch end
    past it, then the run saves and evaluates as usual): ``"DD:HH:MM:SS"``, seconds, or
    ``{days, hours, minutes, seconds}``; ``null``: none. It counts the whole run across resumes
    (Lightning keeps the elapsed time in checkpoints); a cosine schedule follows the budget when the
    clock runs ahead of ``max_epochs``. See :func:`max_time`."""

    max_epochs: int = 12
    precision: str = "32"
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str = "norm"
    accumulate_grad_batches: int = 1
    deterministic: Any = False
    log_every_n_steps: int = 10
    check_val_every_n_epoch: int = 1
    num_sanity_val_steps: int = 2
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    progress_bar: bool = True
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    threads: int | None = None
    max_time: Any = None


@dataclass
class CheckpointConfig:
    """Checkpoints under ``out_dir/checkpoints``: ``epoch=N.ckpt`` every ``every_n_epochs`` (the
    ``keep`` newest; ``-1`` keeps all), ``last.ckpt``, and ``best.ckpt`` by ``monitor``.
    ``resume``: ``true`` continues from ``last.ckpt`` when there is one; a path resumes from it."""

    every_n_epochs: int = 1
    keep: int = -1
    monitor: str = "val/map50"
    mode: str = "max"
    resume: Any = False


@dataclass
class EvalConfig:
    """Evaluation after training on ``data.test`` (else ``data.val``): ``pr_curves`` writes
    ``pr_curve.png``; ``plot_images`` panels go to ``detections.png`` (0: none)."""

    pr_curves: bool = True
    plot_images: int = 8
    score_threshold: float = 0.3


@dataclass
class TrainConfig:
    """The whole training run (see the module docstring for the YAML layout)."""

    seed: int = 0
    out_dir: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> TrainConfig:
        """Cross-field checks (choices, ranges, dataset / model arguments); returns ``self``."""
        _validate(self)
        return self


# -- generic dataclass <-> dict --------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "any value"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints accepted as floats, "1e-4" as a float)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)) and (not args or len(value) == len(args)):
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args or [Any] * len(value))))
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _from_dict(cls: Any, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    data = dict(data)
    prefix = f"{where}." if where else ""
    if cls is DatasetConfig:
        if "type" not in data:
            raise ConfigError(f"{where}: missing 'type'; expected one of {list(FORMATS)}")
        return DatasetConfig(type=_coerce(data.pop("type"), str, f"{prefix}type"), args=data)
    if cls is ModelConfig:
        name = _coerce(data.pop("name", "dldenet"), str, f"{prefix}name")
        num_classes = _coerce(data.pop("num_classes", None), int | None, f"{prefix}num_classes")
        return ModelConfig(name=name, num_classes=num_classes, kwargs=data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; expected one of {names}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a (YAML-like) mapping (``task``: absent or ``detector``)."""
    data = copy.deepcopy(dict(data))
    task = data.pop("task", "detector")
    if task != "detector":
        raise ConfigError(f"task: expected 'detector' here, got {task!r} (fewsight.train.load_config reads every task)")
    return _from_dict(TrainConfig, data, "").validate()


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The YAML-like mapping of ``config`` (``config_from_dict(config_to_dict(c)) == c``)."""

    def convert(obj: Any) -> Any:
        if isinstance(obj, DatasetConfig):
            return {"type": obj.type, **copy.deepcopy(obj.args)}
        if isinstance(obj, ModelConfig):
            out = {"name": obj.name}
            if obj.num_classes is not None:
                out["num_classes"] = obj.num_classes
            out.update(copy.deepcopy(obj.kwargs))
            return out
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, tuple):
            return [convert(v) for v in obj]
        if isinstance(obj, list):
            return [convert(v) for v in obj]
        if isinstance(obj, dict):
            return {k: convert(v) for k, v in obj.items()}
        return obj

    return convert(config)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``"a.b.c=value"`` overrides (value parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: cannot parse the value ({exc})") from None
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a mapping")
            node = child
        node[parts[-1]] = value
    return data


def read_config_mapping(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The mapping of a YAML file (or a copy of ``source``) with ``overrides`` applied, not yet validated.

    Raises :class:`ConfigError` for a missing / unparsable file or a bad override.
    """
    if isinstance(source, Mapping):
        data = copy.deepcopy(dict(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__}: {exc})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    apply_overrides(data, overrides)
    _choice("task", data.get("task", "detector"), TASKS)
    return data


def load_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a detector config: a YAML file (or a mapping), ``overrides`` applied, validated.

    Raises :class:`ConfigError` for a missing / unparsable file, an unknown key or a bad value
    (:func:`fewsight.train.load_config` also reads ``task: embedder`` files).
    """
    return config_from_dict(read_config_mapping(source, overrides))


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config`` as YAML (atomically)."""
    from fewsight.eval.io import atomic_write_bytes

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    return atomic_write_bytes(text.encode("utf-8"), path)


# -- validation ------------------------------------------------------------------------------------


def _choice(where: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}")


def _positive(where: str, value: Any, minimum: float = 1) -> None:
    if value < minimum:
        raise ConfigError(f"{where}: expected >= {minimum}, got {value!r}")


def check_kwargs(where: str, fn: Any, kwargs: Mapping[str, Any], reserved: Sequence[str] = ()) -> None:
    """Raise :class:`ConfigError` for a key of ``kwargs`` that ``fn``'s signature does not accept."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n not in ("self", *reserved)
    ]
    for key in kwargs:
        if key not in accepted:
            raise ConfigError(f"{where}.{key}: unknown argument of {getattr(fn, '__qualname__', fn)}; expected one of {accepted}")


def _validate(cfg: TrainConfig) -> None:
    from fewsight.hub import MODELS  # late: the models import torchvision
    from fewsight.models import DenseDetector

    for split in ("train", "val", "test"):
        ds = getattr(cfg.data, split)
        if ds is None:
            continue
        _choice(f"data.{split}.type", ds.type, FORMATS)
        check_kwargs(f"data.{split}", get_format(ds.type).dataset_class, ds.dataset_args, reserved=("transforms",))
        _validate_split(f"data.{split}", ds, training=split == "train")
    _positive("data.batch_size", cfg.data.batch_size)
    if cfg.data.val_batch_size is not None:
        _positive("data.val_batch_size", cfg.data.val_batch_size)
    _positive("data.num_workers", cfg.data.num_workers, 0)
    if cfg.data.augment is not None:
        from fewsight.data import train_transforms

        check_kwargs("data.augment", train_transforms, cfg.data.augment)

    detectors = [name for name, cls in MODELS.items() if issubclass(cls, DenseDetector)]
    _choice("model.name", cfg.model.name.lower(), tuple(detectors))
    if cfg.model.num_classes is not None:
        _positive("model.num_classes", cfg.model.num_classes)
    cls = MODELS[cfg.model.name.lower()]
    accepted = [n for n in cls.argument_names() if n != "class_names"]  # type: ignore[attr-defined]
    for key in cfg.model.kwargs:
        if key not in accepted:
            raise ConfigError(f"model.{key}: unknown argument of {cls.__name__}; expected one of {accepted}")

    validate_run(cfg)
    _positive("eval.plot_images", cfg.eval.plot_images, 0)


def _validate_split(where: str, ds: DatasetConfig, *, training: bool) -> None:
    """``tiling`` and ``class_map`` of one split."""
    from fewsight.data.tiled import tile_shape
    from fewsight.errors import InvalidArgumentError

    try:
        if "class_map" in ds.args and ds.class_map is None:
            raise InvalidArgumentError("class_map: expected a mapping {name: new name or null}, got None")
        t = ds.tiling if ds.args.get("tiling", {}) is not None else None
        if t is None and "tiling" in ds.args:
            raise InvalidArgumentError("tiling: expected a mapping {size, overlap, min_visibility, ...}, got None")
        if t is not None:
            tile_shape(t.size)
    except InvalidArgumentError as exc:
        raise ConfigError(f"{where}.{str(exc).replace('size:', 'tiling.size:', 1)}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None
    if t is None:
        return
    if not 0 <= t.overlap < 1:
        raise ConfigError(f"{where}.tiling.overlap: expected a value in [0, 1), got {t.overlap}")
    if not 0 <= t.min_visibility <= 1:
        raise ConfigError(f"{where}.tiling.min_visibility: expected a value in [0, 1], got {t.min_visibility}")
    if t.mode is not None:
        _choice(f"{where}.tiling.mode", t.mode, ("random", "grid") if training else ("grid",))
    mode = t.mode or ("random" if training else "grid")
    if t.crops_per_image is not None:
        if mode != "random":
            raise ConfigError(f"{where}.tiling.crops_per_image: only with random crops (mode: random), got "
                              f"{t.crops_per_image} with mode {mode!r}")
        _positive(f"{where}.tiling.crops_per_image", t.crops_per_image)


_MAX_TIME_UNITS = ("days", "hours", "minutes", "seconds")


def max_time(value: Any, where: str = "trainer.max_time") -> timedelta | None:
    """``trainer.max_time`` as a ``timedelta`` (``None`` stays ``None``); :class:`ConfigError` otherwise.

    >>> max_time("00:01:30:00"), max_time(90), max_time({"minutes": 1.5})
    (datetime.timedelta(seconds=5400), datetime.timedelta(seconds=90), datetime.timedelta(seconds=90))
    """
    if value is None:
        return None
    expected = "'DD:HH:MM:SS', seconds > 0 or {days, hours, minutes, seconds}"
    if isinstance(value, timedelta):
        out = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = timedelta(seconds=float(value)) if value == value and abs(value) != float("inf") else timedelta(0)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+):(\d{1,2}):(\d{1,2}):(\d{1,2})\s*", value)
        if m is None:
            raise ConfigError(f"{where}: expected {expected}, got {value!r}")
        out = timedelta(**dict(zip(_MAX_TIME_UNITS, map(int, m.groups()))))
    elif isinstance(value, Mapping):
        unknown = [k for k in value if k not in _MAX_TIME_UNITS]
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; expected one of {list(_MAX_TIME_UNITS)}")
        parts = {}
        for key, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ConfigError(f"{where}.{key}: expected a number >= 0, got {v!r}")
            parts[key] = v
        out = timedelta(**parts)
    else:
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if not out.total_seconds() > 0:
        raise ConfigError(f"{where}: expected a positive duration ({expected}), got {value!r}")
    return out


def validate_run(cfg: Any) -> None:
    """Checks of the sections every training config shares: ``seed``, ``optimizer``, ``schedule``,
    ``trainer``, ``checkpoint``."""
    _positive("seed", cfg.seed, 0)
    _choice("optimizer.name", cfg.optimizer.name, OPTIMIZERS)
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr: expected > 0, got {cfg.optimizer.lr}")
    _positive("optimizer.weight_decay", cfg.optimizer.weight_decay, 0)
    _choice("schedule.name", cfg.schedule.name, SCHEDULES)
    _positive("schedule.warmup_steps", cfg.schedule.warmup_steps, 0)
    if not 0 < cfg.schedule.warmup_factor <= 1:
        raise ConfigError(f"schedule.warmup_factor: expected a value in (0, 1], got {cfg.schedule.warmup_factor}")
    if not 0 <= cfg.schedule.min_lr_ratio <= 1:
        raise ConfigError(f"schedule.min_lr_ratio: expected a value in [0, 1], got {cfg.schedule.min_lr_ratio}")
    if sorted(cfg.schedule.milestones) != list(cfg.schedule.milestones):
        raise ConfigError(f"schedule.milestones: expected increasing epochs, got {cfg.schedule.milestones}")

    t = cfg.trainer
    _positive("trainer.max_epochs", t.max_epochs)
    _choice("trainer.precision", str(t.precision), PRECISIONS)
    _choice("trainer.gradient_clip_algorithm", t.gradient_clip_algorithm, ("norm", "value"))
    if t.gradient_clip_val is not None and not t.gradient_clip_val > 0:
        raise ConfigError(f"trainer.gradient_clip_val: expected > 0 or null, got {t.gradient_clip_val}")
    _positive("trainer.accumulate_grad_batches", t.accumulate_grad_batches)
    _positive("trainer.num_nodes", t.num_nodes)
    _positive("trainer.check_val_every_n_epoch", t.check_val_every_n_epoch)
    _positive("trainer.log_every_n_steps", t.log_every_n_steps)
    _choice("trainer.deterministic", t.deterministic, (True, False, "warn"))
    for name in t.loggers:
        _choice("trainer.loggers[]", name, LOGGERS)
    if t.threads is not None:
        _positive("trainer.threads", t.threads)
    max_time(t.max_time)

    c = cfg.checkpoint
    _positive("checkpoint.every_n_epochs", c.every_n_epochs)
    if c.keep < -1:
        raise ConfigError(f"checkpoint.keep: expected -1 (all) or >= 0, got {c.keep}")
    _choice("checkpoint.mode", c.mode, ("max", "min"))
    if not isinstance(c.resume, (bool, str)):
        raise ConfigError(f"checkpoint.resume: expected true, false or a checkpoint path, got {c.resume!r}")
