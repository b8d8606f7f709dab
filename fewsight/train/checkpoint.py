"""Checkpoint files: safe loading, atomic writes, and plain detector files.

* :func:`load_checkpoint_file` — ``torch.load(weights_only=True)`` onto the CPU; a missing,
  truncated or foreign file raises :class:`~fewsight.errors.CheckpointError` naming it.
* :class:`AtomicCheckpointIO` — Lightning ``CheckpointIO`` that writes through a temporary file in
  the destination folder and ``os.replace`` (Lightning's own "atomic" save stages the file in the
  system temp dir and moves it, which is a copy — not atomic — when that is another file system),
  and loads with :func:`load_checkpoint_file`.
* :func:`save_detector` / :func:`load_detector` — a self-contained model file: state_dict +
  constructor spec + class names (what the CLI's ``eval`` / ``predict`` / ``export`` read).
  :func:`load_detector` also reads Lightning checkpoints written by :func:`fewsight.train.train`.

Example:
    >>> import os, tempfile
    >>> p = os.path.join(tempfile.mkdtemp(), "bad.pt")
    >>> _ = open(p, "wb").write(b"not a checkpoint")
    >>> try:
    ...     load_checkpoint_file(p)
    ... except CheckpointError as e:
    ...     print(str(e).split(":")[1].strip())
    not a readable checkpoint (UnpicklingError
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from fewsight.errors import CheckpointError
from fewsight.eval.io import atomic_write_bytes
from fewsight.train.builders import build_model, model_spec

__all__ = [
    "DETECTOR_FORMAT",
    "AtomicCheckpointIO",
    "load_checkpoint_file",
    "load_detector",
    "save_detector",
]

DETECTOR_FORMAT = "fewsight.detector"
_VERSION = 1


def _cpu(storage: Any, _location: str) -> Any:
    return storage


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a ``torch.save`` file with ``weights_only=True`` onto the CPU.

    Raises :class:`CheckpointError` (with the path and the reason) when the file is missing, empty,
    truncated, not a torch file, holds objects other than tensors and plain containers, or is not
    a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        obj = torch.load(path, map_location=_cpu, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}{': ' + reason[:200] if reason else ''})"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint mapping, got {type(obj).__name__}")
    return dict(obj)


def _save_bytes(obj: Any, path: str | Path) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(buffer.getvalue(), path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic same-folder writes, ``weights_only=True`` reads (local paths;
    remote ``scheme://`` paths fall back to Lightning's implementation for writing)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        _save_bytes(checkpoint, path)

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(path)


def save_detector(model: nn.Module, path: str | Path, *, spec: Mapping[str, Any] | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as a self-contained detector file (atomically).

    Content: ``{"format": "fewsight.detector", "version", "model": spec, "classes", "state_dict",
    "metadata"}`` with tensors on the CPU; ``spec`` defaults to :func:`fewsight.train.model_spec`.
    """
    from fewsight.fewshot.rescorer import CropRescorer

    if isinstance(model, CropRescorer):
        # The detector's own spec, plus what rebuilds the wrapper; the state_dict holds both networks.
        spec = dict(spec) if spec is not None else model_spec(model.detector)
        spec["crop_rescorer"] = {"embedder": dict(model.embedder.config), "settings": model.settings(),
                                 "enrolled": list(model.enrolled)}
    spec = dict(spec) if spec is not None else model_spec(model)
    # Non-tensor entries are modules' extra state (e.g. the class names), kept as they are.
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    payload = {
        "format": DETECTOR_FORMAT,
        "version": _VERSION,
        "model": spec,
        "classes": spec.get("classes"),
        "state_dict": state,
        "metadata": dict(metadata or {}),
    }
    return _save_bytes(payload, path)


def _crop_rescorer(path: Path, detector: nn.Module, info: Mapping[str, Any], state: Mapping[str, Any]) -> nn.Module:
    """The :class:`~fewsight.fewshot.CropRescorer` a :func:`save_detector` file describes, buffers sized to ``state``."""
    from fewsight.fewshot import CropEmbedder, CropRescorer

    try:
        embedder = CropEmbedder(**dict(info["embedder"]), pretrained=False)
        model = CropRescorer(detector, embedder, **dict(info["settings"]))
        model.enrolled = [str(n) for n in info["enrolled"]]
        for name in ("prototypes", "thresholds", "scales"):
            setattr(model, name, torch.empty_like(state[name]))
        embedder.white_proj = torch.empty_like(state["embedder.white_proj"])
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot rebuild the crop rescorer ({type(exc).__name__}: {exc})") from exc
    return model


def _spec_and_state(path: Path, ckpt: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if ckpt.get("format") == DETECTOR_FORMAT:
        spec, state = ckpt.get("model"), ckpt.get("state_dict")
    elif "state_dict" in ckpt and isinstance(ckpt.get("hyper_parameters"), Mapping):
        # A Lightning checkpoint of DetectorModule: the detector's weights live under "model.".
        spec = ckpt["hyper_parameters"].get("model_spec")
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise CheckpointError(f"{path}: not a fewsight detector or training checkpoint (keys: {sorted(ckpt)[:8]})")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise CheckpointError(f"{path}: the checkpoint does not say which model it holds (no model spec)")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: the checkpoint holds no model weights")
    return dict(spec), dict(state)


def load_detector(path: str | Path) -> nn.Module:
    """Rebuild a detector from :func:`save_detector`'s file or a :func:`fewsight.train.train` checkpoint.

    The model is on the CPU in eval mode; move it with ``.to(...)``. Backbone weights are not
    loaded from anywhere else (the file's state_dict replaces them). Raises :class:`CheckpointError`
    for a missing / corrupt file or weights that do not fit the architecture.
    """
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    spec, state = _spec_and_state(path, ckpt)
    classes = spec.get("classes")
    try:
        model = build_model(
            {"name": spec["name"], "num_classes": spec.get("num_classes"), "kwargs": spec.get("kwargs", {})},
            classes,
            pretrained=False,
        )
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot rebuild the {spec['name']} model ({type(exc).__name__}: {exc})") from exc
    if isinstance(spec.get("crop_rescorer"), Mapping):
        model = _crop_rescorer(path, model, spec["crop_rescorer"], state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: the weights do not fit the {spec['name']} model ({' '.join(first[:3])[:300]})") from exc
    model.eval()
    return model

