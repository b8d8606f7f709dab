"""Enrollment: new classes from a few boxed examples, without gradient steps, with one set of settings.

:class:`EnrollSettings` holds the options every entry point shares (the Python API, ``fewsight enroll``
and ``fewsight bench fewshot`` take their defaults from it):

* ``calibrate``: each new class's score is calibrated on the support images' background, so a
  direction that lies near background cannot flood every image with detections (DLDENet: the class
  bias; :class:`~fewsight.fewshot.CropRescorer`: the crop-score threshold);
* ``rivalry``: a new class's probability is gated by how much closer an object is to it than to the
  best trained class, ``p * sigmoid(R (cos_new - max cos_trained))`` (DLDENet; 0: no gate). It
  applies to models whose ``enroll`` has a rivalry gate; the crop rescorer ranks new classes by crop
  similarity and has none.

Example:
    >>> import torch
    >>> from fewsight.models import DLDENet
    >>> det = DLDENet(2, backbone="resnet18", levels=(3, 4, 5), fpn_channels=16, embedding_dim=8, head_convs=1)
    >>> support = [{"boxes": torch.tensor([[8., 8., 40., 40.]]), "labels": torch.tensor([0])}]
    >>> enroll(det.eval(), [torch.rand(3, 64, 64)], support, ["new"], EnrollSettings(calibrate=False))
    [2]
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fewsight.errors import InvalidArgumentError
from fewsight.eval import model_device
from fewsight.fewshot.support import SupportSet, all_boxes_support, sample_support, tile_support

__all__ = ["EnrollSettings", "enroll", "enroll_from_dataset", "enroll_support"]


@dataclass(frozen=True)
class EnrollSettings:
    """Enrollment options (module docstring); the defaults are the product's."""

    calibrate: bool = True
    rivalry: float = 5.0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.calibrate, bool):
            raise InvalidArgumentError(f"calibrate: expected a bool, got {self.calibrate!r}")
        if isinstance(self.rivalry, bool) or not isinstance(self.rivalry, (int, float)) or not 0.0 <= self.rivalry < float("inf"):
            raise InvalidArgumentError(f"rivalry: expected a finite number >= 0, got {self.rivalry!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidArgumentError(f"batch_size: expected an int >= 1, got {self.batch_size!r}")

    def options_for(self, model: nn.Module) -> dict[str, Any]:
        """The keyword arguments of ``model.enroll`` these settings give: those it takes (rivalry only
        where the model has the gate, batch size only where it batches)."""
        params = inspect.signature(model.enroll).parameters
        options = {"batch_size": self.batch_size, "calibrate": self.calibrate, "rivalry": float(self.rivalry)}
        return {k: v for k, v in options.items() if k in params}


def enroll(model: nn.Module, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]], names: Sequence[str],
           settings: EnrollSettings | None = None) -> list[int]:
    """``model.enroll(images, targets, names)`` with ``settings`` (default :class:`EnrollSettings`); returns the
    new classes' label indices. ``targets``' labels index ``names`` (``-1``: a box to ignore)."""
    settings = settings if settings is not None else EnrollSettings()
    return model.enroll(list(images), list(targets), list(names), **settings.options_for(model))


def enroll_support(model: nn.Module, images: Sequence[Tensor], support: SupportSet, names: Sequence[str],
                   settings: EnrollSettings | None = None) -> list[int]:
    """:func:`enroll` with a support set's images and targets, moved to the model's device."""
    device = model_device(model)
    images = [im.to(device) for im in images]
    targets = [{key: v.to(device) for key, v in t.items()} for t in support.targets]
    return enroll(model, images, targets, names, settings)


def enroll_from_dataset(
    model: nn.Module,
    dataset: Any,
    names: Sequence[str] | None = None,
    *,
    k: int | None = None,
    seed: int = 0,
    settings: EnrollSettings | None = None,
    tile: int | Sequence[int] | None = None,
    overlap: float = 0.2,
) -> list[int]:
    """Enroll classes of ``dataset`` (by name) into ``model`` from its boxes.

    ``names``: the dataset classes to enroll (default: every dataset class the model does not know).
    ``k``: use ``k`` sampled instances per class (:func:`~fewsight.fewshot.sample_support` with ``seed``);
    default: every box of those classes. Boxes of other classes are ignored. Returns the new class indices.
    ``tile``: embed each box from the ``tile``-pixel tile (overlapping by ``overlap``) that shows it best
    (:func:`~fewsight.fewshot.tile_support`), for support images larger than the model's input whose
    objects would shrink with the whole image; ``None``: whole images.

    Raises:
        InvalidArgumentError: a name the dataset does not have, or one the model already knows.
    """
    if isinstance(names, str):
        raise InvalidArgumentError(f"names: expected a sequence of class names, got the string {names!r}")
    classes = list(dataset.classes)
    known = set(model.classes)
    names = [c for c in classes if c not in known] if names is None else [str(n) for n in names]
    if not names:
        raise InvalidArgumentError(
            f"names: expected classes to enroll, but the model already knows every dataset class {classes}"
        )
    absent = [n for n in names if n not in classes]
    if absent:
        raise InvalidArgumentError(f"names: expected classes of the support dataset {classes}, got {absent}")
    wanted = [classes.index(n) for n in names]
    support = sample_support(dataset, wanted, k, seed) if k is not None else all_boxes_support(dataset, wanted)
    if tile is not None:
        tiles, support = tile_support(dataset, support, tile, overlap)
        return enroll_support(model, tiles, support, names, settings)
    return enroll_support(model, support.images(dataset), support, names, settings)
