"""Build datasets and models from their config sections.

* :func:`build_dataset` / :func:`build_datasets` — any format of :data:`fewsight.data.FORMATS`; the
  val / test splits default to the training classes so labels agree.
* :func:`build_model` — a model of :data:`fewsight.hub.MODELS` by its config ``name``, with the
  training set's classes; the model describes itself (``to_spec``), so its file is rebuilt without
  the config.

Example:
    >>> from fewsight.train.config import DatasetConfig
    >>> ds = build_dataset(DatasetConfig("digits", {"split": "val", "num_images": 2, "classes": [3, 5]}))
    >>> len(ds), ds.classes
    (2, ['3', '5'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from fewsight.data import FORMATS, get_format
from fewsight.errors import ConfigError, InvalidArgumentError
from fewsight.hub import MODELS
from fewsight.train.config import DataConfig, DatasetConfig, ModelConfig

__all__ = ["build_dataset", "build_datasets", "build_model", "dataset_class"]


def dataset_class(kind: str) -> type:
    """The dataset class of a config ``type`` (a name of :data:`fewsight.data.FORMATS`)."""
    if kind not in FORMATS:
        raise ConfigError(f"type: expected one of {list(FORMATS)}, got {kind!r}")
    return get_format(kind).dataset_class


def build_dataset(cfg: DatasetConfig, *, classes: Sequence[str] | None = None, transforms: Any = None) -> Any:
    """Instantiate one split. ``classes`` is passed when the config does not name its classes."""
    cls = dataset_class(cfg.type)
    kwargs = dict(cfg.args)
    if classes is not None and "classes" not in kwargs:
        kwargs["classes"] = list(classes)
    if transforms is not None:
        kwargs["transforms"] = transforms
    try:
        return cls(**kwargs)
    except TypeError as exc:
        # Signature problems are configuration errors; everything else propagates unchanged.
        if "argument" in str(exc):
            raise ConfigError(f"data ({cfg.type}): {exc}") from None
        raise


def build_datasets(cfg: DataConfig) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` datasets (``None`` for a split the config leaves out).

    Training augmentation (``cfg.augment``) is attached to the training set only. Raises
    :class:`ConfigError` when a split's classes differ from the training set's.
    """
    transforms = None
    if cfg.augment is not None:
        from fewsight.data import train_transforms

        transforms = train_transforms(**cfg.augment)
    train = build_dataset(cfg.train, transforms=transforms)
    if len(train) == 0:
        raise ConfigError("data.train: the training set is empty")
    out = [train]
    for split in ("val", "test"):
        ds_cfg = getattr(cfg, split)
        ds = None if ds_cfg is None else build_dataset(ds_cfg, classes=train.classes)
        if ds is not None and list(ds.classes) != list(train.classes):
            raise ConfigError(f"data.{split}: classes {list(ds.classes)} differ from the training classes {list(train.classes)}")
        out.append(ds)
    return out[0], out[1], out[2]


def build_model(cfg: ModelConfig | dict[str, Any], classes: Sequence[str] | None = None, *, pretrained: bool = True) -> nn.Module:
    """Instantiate the model of ``cfg`` for ``classes`` (``num_classes`` defaults to ``len(classes)``).

    ``anchor_generator`` / ``coder`` may be given as mappings of
    :class:`~fewsight.geometry.AnchorGenerator` / :class:`~fewsight.geometry.BoxCoder` arguments.
    ``pretrained=False`` drops the backbone ``weights`` argument.
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig(name=cfg["name"], num_classes=cfg.get("num_classes"), kwargs=dict(cfg.get("kwargs", {})))
    name = str(cfg.name).lower()
    if name not in MODELS:
        raise ConfigError(f"model.name: expected one of {sorted(MODELS)}, got {cfg.name!r}")
    num_classes = cfg.num_classes
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(f"model.num_classes: expected {len(classes)} (the dataset's classes), got {num_classes}")
        num_classes = len(classes)
    if num_classes is None:
        raise ConfigError("model.num_classes: required when the classes are unknown")
    spec = {"name": name, "kwargs": dict(cfg.kwargs), "num_classes": num_classes,
            "classes": None if classes is None else [str(c) for c in classes]}
    try:
        return MODELS[name].from_spec(spec, pretrained=pretrained)  # type: ignore[attr-defined]
    except TypeError as exc:
        if "argument" in str(exc):
            raise ConfigError(f"model ({MODELS[name].__name__}): {exc}") from None
        raise
    except InvalidArgumentError as exc:
        raise ConfigError(f"model.{exc}") from None
