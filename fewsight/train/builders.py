"""Build datasets and detectors from their config sections.

* :func:`build_dataset` / :func:`build_datasets` — ``digits`` / ``emoji`` / ``coco`` / ``voc`` /
  ``yolo`` / ``csv`` datasets; the val / test splits default to the training classes so labels agree.
* :func:`build_model` — ``RetinaNet`` / ``DLDENet`` / ``SSD`` from :mod:`fewsight.models` with
  ``num_classes`` and class names from the training set. The returned model remembers its
  :func:`model_spec` (name, constructor arguments, classes) so :func:`fewsight.train.save_detector`
  can rebuild it later without the config.

Example:
    >>> from fewsight.train.config import DatasetConfig
    >>> ds = build_dataset(DatasetConfig("digits", {"split": "val", "num_images": 2, "classes": [3, 5]}))
    >>> len(ds), ds.classes
    (2, ['3', '5'])
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from typing import Any

from torch import nn

from fewsight.errors import ConfigError, InvalidArgumentError
from fewsight.train.config import DataConfig, DatasetConfig, ModelConfig

__all__ = [
    "MODEL_CLASSES",
    "build_dataset",
    "build_datasets",
    "build_model",
    "dataset_class",
    "model_class",
    "model_spec",
    "set_model_spec",
]

#: config name -> class name in :mod:`fewsight.models`.
MODEL_CLASSES = {"dldenet": "DLDENet", "retinanet": "RetinaNet", "ssd": "SSD"}

_SPEC_ATTR = "_fewsight_spec"


def dataset_class(kind: str) -> type:
    """The dataset class of a config ``type`` (a name of :data:`fewsight.data.FORMATS`)."""
    from fewsight.data import FORMATS, get_format

    if kind not in FORMATS:
        raise ConfigError(f"type: expected one of {list(FORMATS)}, got {kind!r}")
    return get_format(kind).dataset_class


def model_class(name: str, *, required: bool = True) -> type | None:
    """The detector class of a config ``name``; ``None`` when not importable and ``required=False``."""
    key = str(name).lower()
    if key not in MODEL_CLASSES:
        raise ConfigError(f"model.name: expected one of {list(MODEL_CLASSES)}, got {name!r}")
    try:
        module = importlib.import_module("fewsight.models")
        return getattr(module, MODEL_CLASSES[key])
    except (ImportError, AttributeError):
        if required:
            raise ConfigError(f"model.name: {MODEL_CLASSES[key]} is not available in fewsight.models") from None
        return None


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


def _accepts(cls: type, name: str) -> bool:
    params = inspect.signature(cls).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def set_model_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Attach the spec that rebuilds ``model`` (see :func:`model_spec`)."""
    object.__setattr__(model, _SPEC_ATTR, spec)
    return model


def model_spec(model: nn.Module) -> dict[str, Any]:
    """``{"name", "num_classes", "kwargs", "classes"}`` that rebuilds ``model``'s architecture.

    Taken from what :func:`build_model` attached, else from a ``model.config`` / ``model.get_config()``
    mapping of constructor arguments when the model provides one. ``num_classes`` / ``classes``
    follow the model's current classes (enrollment may have added some).
    """
    classes = getattr(model, "classes", None)
    spec = getattr(model, _SPEC_ATTR, None)
    if spec is None:
        name = next((k for k, v in MODEL_CLASSES.items() if v == type(model).__name__), None)
        if name is None:
            raise InvalidArgumentError(
                f"model: expected a fewsight detector ({', '.join(MODEL_CLASSES.values())}), got {type(model).__name__}"
            )
        config = getattr(model, "get_config", None)
        config = config() if callable(config) else getattr(model, "config", None)
        kwargs = {k: v for k, v in dict(config or {}).items() if k not in ("num_classes", "class_names")}
        spec = {"name": name, "num_classes": getattr(model, "num_classes", None), "kwargs": kwargs, "classes": None}
    spec = {**spec, "kwargs": dict(spec.get("kwargs", {}))}
    if classes is not None:
        spec["classes"] = [str(c) for c in classes]
        spec["num_classes"] = len(spec["classes"])
    return spec


#: Constructor arguments that take an object; YAML gives the object's own keyword arguments.
_OBJECT_ARGS = {"anchor_generator": "AnchorGenerator", "coder": "BoxCoder"}


def _materialize(kwargs: dict[str, Any]) -> dict[str, Any]:
    from fewsight import geometry

    for key, cls_name in _OBJECT_ARGS.items():
        value = kwargs.get(key)
        if isinstance(value, dict):
            try:
                kwargs[key] = getattr(geometry, cls_name)(**value)
            except TypeError as exc:
                raise ConfigError(f"model.{key}: {exc}") from None
    return kwargs


def build_model(cfg: ModelConfig | dict[str, Any], classes: Sequence[str] | None = None, *, pretrained: bool = True) -> nn.Module:
    """Instantiate the detector of ``cfg`` for ``classes`` (``num_classes`` defaults to ``len(classes)``).

    ``anchor_generator`` / ``coder`` may be given as mappings of
    :class:`~fewsight.geometry.AnchorGenerator` / :class:`~fewsight.geometry.BoxCoder` arguments.
    ``pretrained=False`` drops the backbone ``weights`` argument (used when the state_dict that
    follows replaces every weight anyway, and so that loading never downloads).
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig(name=cfg["name"], num_classes=cfg.get("num_classes"), kwargs=dict(cfg.get("kwargs", {})))
    cls = model_class(cfg.name)
    assert cls is not None
    num_classes = cfg.num_classes
    if classes is not None:
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(f"model.num_classes: expected {len(classes)} (the dataset's classes), got {num_classes}")
        num_classes = len(classes)
    if num_classes is None:
        raise ConfigError("model.num_classes: required when the classes are unknown")
    kwargs = _materialize(dict(cfg.kwargs))
    if not pretrained:
        for key in [k for k in kwargs if k == "weights" or k.endswith("_weights")]:
            kwargs[key] = None
    if classes is not None and _accepts(cls, "class_names") and "class_names" not in kwargs:
        kwargs["class_names"] = [str(c) for c in classes]
    try:
        model = cls(num_classes, **kwargs)
    except TypeError as exc:
        if "argument" in str(exc):
            raise ConfigError(f"model ({cls.__name__}): {exc}") from None
        raise
    spec = {
        "name": cfg.name.lower(),
        "num_classes": num_classes,
        "kwargs": {k: v for k, v in cfg.kwargs.items() if k != "class_names"},
        "classes": None if classes is None else [str(c) for c in classes],
    }
    return set_model_spec(model, spec)
