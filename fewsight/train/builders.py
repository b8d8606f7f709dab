"""Build datasets and models from their config sections.

* :func:`build_dataset` / :func:`build_datasets` — any format of :data:`fewsight.data.FORMATS`; the
  val / test splits default to the training classes so labels agree. A split's ``class_map`` is
  applied as it is read (:func:`fewsight.data.apply_class_map`), before its labels are expressed against
  the training classes; its ``tiling`` wraps it in a :class:`fewsight.data.TiledDataset` (random crops
  for ``train``, grid tiles otherwise) that carries the training augmentation per tile.
* :func:`evaluation_view` — what the final evaluation runs: a tiled split is evaluated on its whole
  images with sliced inference (the tiles of training, merged), as a user would run the model.
* :func:`build_model` — a model of :data:`fewsight.hub.MODELS` by its config ``name``, with the
  training set's classes; the model describes itself (``to_spec``), so its file is rebuilt without
  the config. ``anchor_generator: auto`` is resolved first (:func:`resolve_anchors`: anchors fitted to
  the training boxes, :mod:`fewsight.train.anchors`).

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

from fewsight.data import FORMATS, ImageFileDataset, RelabeledDataset, TiledDataset, apply_class_map, get_format
from fewsight.errors import ConfigError, InvalidArgumentError
from fewsight.geometry import AnchorProposal
from fewsight.hub import MODELS
from fewsight.train.anchors import AUTO, fit_anchors
from fewsight.train.config import DataConfig, DatasetConfig, ModelConfig

__all__ = ["build_dataset", "build_datasets", "build_model", "dataset_class", "evaluation_view"]


def dataset_class(kind: str) -> type:
    """The dataset class of a config ``type`` (a name of :data:`fewsight.data.FORMATS`)."""
    if kind not in FORMATS:
        raise ConfigError(f"type: expected one of {list(FORMATS)}, got {kind!r}")
    return get_format(kind).dataset_class


def build_dataset(
    cfg: DatasetConfig, *, classes: Sequence[str] | None = None, transforms: Any = None, training: bool = False,
    where: str = "data",
) -> Any:
    """Instantiate one split. ``classes`` is passed when the config does not name its classes (with a
    ``class_map``: the mapped classes are expressed against them by name). ``training``: the default
    tiling mode is random crops (else grid tiles). ``where``: the split's key, for messages."""
    cls = dataset_class(cfg.type)
    kwargs = cfg.dataset_args
    class_map, tiling = cfg.class_map, cfg.tiling
    if classes is not None and "classes" not in kwargs and class_map is None:
        kwargs["classes"] = list(classes)
    if transforms is not None and tiling is None:
        kwargs["transforms"] = transforms
    try:
        dataset = cls(**kwargs)
    except TypeError as exc:
        # Signature problems are configuration errors; everything else propagates unchanged.
        if "argument" in str(exc):
            raise ConfigError(f"{where} ({cfg.type}): {exc}") from None
        raise
    if class_map is not None:
        dataset = apply_class_map(dataset, class_map)
        if classes is not None:
            dataset = _onto_classes(dataset, list(classes), where)
    if tiling is None:
        return dataset
    mode = tiling.mode or ("random" if training else "grid")
    try:
        return TiledDataset(dataset, tiling.size, tiling.overlap, tiling.min_visibility, mode=mode,
                            crops_per_image=tiling.crops_per_image, transforms=transforms)
    except InvalidArgumentError as exc:
        raise ConfigError(f"{where}.tiling.{exc}") from None


def _onto_classes(dataset: Any, classes: list[str], where: str) -> Any:
    """A class-mapped split's labels expressed against ``classes`` (the training classes) by name."""
    unknown = [c for c in dataset.classes if c not in classes]
    if unknown:
        raise ConfigError(f"{where}.class_map: classes {unknown} after the map are not training classes "
                          f"{classes}; map them to one of those, or to null to drop them")
    if isinstance(dataset, ImageFileDataset):
        dataset.map_classes(classes)
        return dataset
    inner, lookup = dataset, list(range(len(dataset.classes)))
    if isinstance(dataset, RelabeledDataset):  # compose with the class map's view
        inner, lookup = dataset.dataset, dataset.mapping.tolist()
    remap = [-1 if k < 0 else classes.index(dataset.classes[k]) for k in lookup]
    return RelabeledDataset(inner, remap, classes)


def build_datasets(cfg: DataConfig) -> tuple[Any, Any, Any]:
    """``(train, val, test)`` datasets (``None`` for a split the config leaves out).

    Training augmentation (``cfg.augment``) is attached to the training set only. Raises
    :class:`ConfigError` when a split's classes differ from the training set's.
    """
    transforms = None
    if cfg.augment is not None:
        from fewsight.data import train_transforms

        transforms = train_transforms(**cfg.augment)
    train = build_dataset(cfg.train, transforms=transforms, training=True, where="data.train")
    if len(train) == 0:
        raise ConfigError("data.train: the training set is empty")
    out = [train]
    for split in ("val", "test"):
        ds_cfg = getattr(cfg, split)
        ds = None if ds_cfg is None else build_dataset(ds_cfg, classes=train.classes, where=f"data.{split}")
        if ds is not None and list(ds.classes) != list(train.classes):
            raise ConfigError(f"data.{split}: classes {list(ds.classes)} differ from the training classes {list(train.classes)}")
        out.append(ds)
    return out[0], out[1], out[2]


def resolve_anchors(cfg: ModelConfig, train_set: Any) -> tuple[ModelConfig, AnchorProposal | None]:
    """``cfg`` with ``anchor_generator: auto`` replaced by anchors fitted to ``train_set``
    (:func:`fewsight.train.anchors.fit_anchors`, deterministic: a resumed run fits the same), and the
    proposal; ``(cfg, None)`` when the config names its anchors."""
    if cfg.kwargs.get("anchor_generator") != AUTO:
        return cfg, None
    try:
        proposal = fit_anchors(anchor_probe(cfg, train_set.classes), train_set)
    except InvalidArgumentError as exc:
        raise ConfigError(f"model.{exc}") from None
    return ModelConfig(cfg.name, cfg.num_classes, {**cfg.kwargs, "anchor_generator": proposal.config()}), proposal


def anchor_probe(cfg: ModelConfig, classes: Sequence[str]) -> nn.Module:
    """The model of ``cfg`` without pretrained weights, its own default anchors standing for ``auto``:
    what anchors are fitted against (its levels, resizing, matcher threshold and current anchors)."""
    kwargs = {k: v for k, v in cfg.kwargs.items() if not (k == "anchor_generator" and v == AUTO)}
    return build_model(ModelConfig(cfg.name, cfg.num_classes, kwargs), classes, pretrained=False)


def build_model(cfg: ModelConfig | dict[str, Any], classes: Sequence[str] | None = None, *, pretrained: bool = True) -> nn.Module:
    """Instantiate the model of ``cfg`` for ``classes`` (``num_classes`` defaults to ``len(classes)``).

    ``anchor_generator`` / ``coder`` may be given as mappings of
    :class:`~fewsight.geometry.AnchorGenerator` / :class:`~fewsight.geometry.BoxCoder` arguments.
    ``pretrained=False`` drops the backbone ``weights`` argument.
    """
    if isinstance(cfg, dict):
        cfg = ModelConfig(name=cfg["name"], num_classes=cfg.get("num_classes"), kwargs=dict(cfg.get("kwargs", {})))
    if cfg.kwargs.get("anchor_generator") == AUTO:
        raise ConfigError(f"model.anchor_generator: '{AUTO}' needs the training set: resolve_anchors(cfg, train_set) "
                          "first (train does)")
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


def evaluation_view(model: nn.Module, dataset: Any) -> tuple[nn.Module, Any, dict[str, Any] | None]:
    """``(model, dataset, sliced settings or None)`` for the final evaluation of ``dataset``.

    A :class:`~fewsight.data.TiledDataset` (grid tiles: the cheap per-tile monitor of validation during
    training, where detections of objects cut below ``min_visibility`` count as false positives) is
    evaluated instead on its source's whole images through
    :class:`~fewsight.models.sliced.SlicedDetector` with the same tile size and overlap (every object
    counted once, as sliced inference is used). Any other dataset is returned unchanged.
    """
    if not isinstance(dataset, TiledDataset):
        return model, dataset, None
    from fewsight.models.sliced import SlicedDetector

    th, tw = dataset.size
    settings = {"tile": th if th == tw else (th, tw), "overlap": dataset.overlap}
    return SlicedDetector(model, **settings), dataset.dataset, settings
