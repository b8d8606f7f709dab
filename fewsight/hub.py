"""One model registry and one model-file format for every fewsight model.

Every model class here describes itself: ``model.to_spec()`` gives a JSON-able mapping
(``{"name", "kwargs", "classes", ...}``, and ``"children"`` for a model made of others) and
``Class.from_spec(spec, children)`` rebuilds the architecture without downloading anything. The
registry :data:`MODELS` maps a spec's ``name`` to its class; :func:`save_model` /
:func:`load_model` are the one pair of functions that write and read model files, for detectors,
crop embedders and crop-rescored detectors alike — every command uses them.

A model file is one ``torch.save`` mapping, read with ``weights_only=True``::

    {"format": "fewsight.model", "version": 2, "spec": ..., "state_dict": ..., "metadata": ...}

:func:`load_model` also reads the detector files of version 1 (``"format": "fewsight.detector"``)
and Lightning checkpoints written by :func:`fewsight.train.train` (spec in the hyper-parameters,
weights under ``model.``). Writes are atomic; a missing, truncated or foreign file raises
:class:`~fewsight.errors.CheckpointError` naming it.

Example:
    >>> import os, tempfile
    >>> from fewsight.models import RetinaNet
    >>> model = RetinaNet(2, backbone="mobilenet_v2", weights=None, class_names=["cat", "dog"])
    >>> path = save_model(model, os.path.join(tempfile.mkdtemp(), "model.pt"), metadata={"epochs": 3})
    >>> again = load_model(path)
    >>> type(again).__name__, again.classes, read_model_file(path).metadata
    ('RetinaNet', ['cat', 'dog'], {'epochs': 3})
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from fewsight._io import atomic_write_bytes
from fewsight.errors import CheckpointError, InvalidArgumentError
from fewsight.fewshot import CropEmbedder, CropRescorer
from fewsight.models import SSD, DLDENet, RetinaNet

__all__ = [
    "MODELS",
    "MODEL_FORMAT",
    "ModelFile",
    "check_finite_weights",
    "load_checkpoint_file",
    "load_model",
    "model_from_spec",
    "read_model_file",
    "save_model",
]

MODEL_FORMAT = "fewsight.model"
_VERSION = 2
_DETECTOR_FORMAT_V1 = "fewsight.detector"

#: Spec name -> model class.
MODELS: dict[str, type[nn.Module]] = {
    cls.spec_name: cls for cls in (DLDENet, RetinaNet, SSD, CropEmbedder, CropRescorer)  # type: ignore[attr-defined]
}


class ModelFile(NamedTuple):
    """What a model file holds: the spec, the weights (CPU tensors) and free-form metadata."""

    spec: dict[str, Any]
    state_dict: dict[str, Any]
    metadata: dict[str, Any]


def _cpu(storage: Any, _location: str) -> Any:
    return storage


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def short_reason(text: str, limit: int = 200) -> str:
    """``text`` as one plain line of at most about ``limit`` characters, cut after a whole sentence
    (or word) rather than mid-word."""
    text = " ".join(_ANSI.sub("", text).split())
    if len(text) <= limit:
        return text
    cut = text.rfind(". ", 0, limit)
    if cut > 0:
        return text[: cut + 1]
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit] + " ..."


def _load_failure(exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line and without torch's advice to
    turn ``weights_only`` off (fewsight never does: that would run code from the file)."""
    text = " ".join(_ANSI.sub("", str(exc)).split())
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        for tail in (" Please use", " Check the documentation", ". "):
            detail = detail.split(tail, 1)[0]
        detail = detail.strip().rstrip(".")
        if "Unsupported global" in detail:
            return f"it holds Python objects other than tensors and plain containers, which fewsight does not load " \
                   f"({short_reason(detail, 160)})"
        return f"not a torch checkpoint, or a damaged one (the unpickler stopped: {short_reason(detail, 120) or 'unknown data'})"
    if isinstance(exc, RuntimeError) and ("zip archive" in text or "PytorchStreamReader" in text):
        return f"the file is truncated or damaged ({short_reason(text.split('. ', 1)[0], 160)})"
    reason = short_reason(text, 160)
    return f"{type(exc).__name__}{': ' + reason if reason else ''}"


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a ``torch.save`` file with ``weights_only=True`` onto the CPU.

    Raises :class:`~fewsight.errors.CheckpointError` (one line, with the path and the reason) when
    the file is missing, empty, truncated, not a torch file, holds objects other than tensors and
    plain containers, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: checkpoint file is empty")
    try:
        obj = torch.load(path, map_location=_cpu, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError ... for bad files
        raise CheckpointError(f"{path}: not a readable checkpoint: {_load_failure(exc)}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a checkpoint mapping, got {type(obj).__name__}")
    return dict(obj)


def _save_bytes(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` written atomically to ``path`` (the folder is created)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(buffer.getvalue(), path)


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The untrained model ``spec`` describes (children first); weights come from a state dict after."""
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise InvalidArgumentError(f"spec: expected a mapping with a 'name', got {type(spec).__name__}")
    name = str(spec["name"]).lower()
    if name not in MODELS:
        raise InvalidArgumentError(f"spec.name: expected one of {sorted(MODELS)}, got {spec['name']!r}")
    children = {key: model_from_spec(child) for key, child in dict(spec.get("children") or {}).items()}
    return MODELS[name].from_spec(spec, children)  # type: ignore[attr-defined]


def save_model(model: nn.Module, path: str | Path, *, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (any model of :data:`MODELS`) as a self-contained file, atomically; returns the path."""
    to_spec = getattr(model, "to_spec", None)
    if not callable(to_spec):
        raise InvalidArgumentError(f"model: expected a fewsight model ({', '.join(c.__name__ for c in MODELS.values())}), "
                                   f"got {type(model).__name__}")
    # Non-tensor entries are modules' extra state (e.g. the class names), kept as they are.
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    payload = {"format": MODEL_FORMAT, "version": _VERSION, "spec": to_spec(), "state_dict": state,
               "metadata": dict(metadata or {})}
    return _save_bytes(payload, path)


def _spec_from_v1(spec: dict[str, Any]) -> dict[str, Any]:
    """A version-1 detector file's spec in today's layout (a crop rescorer's parts become children)."""
    detector = {"name": spec["name"], "kwargs": dict(spec.get("kwargs") or {}), "classes": spec.get("classes"),
                "num_classes": spec.get("num_classes")}
    rescorer = spec.get("crop_rescorer")
    if not isinstance(rescorer, Mapping):
        return detector
    embedder = {"name": CropEmbedder.spec_name, "kwargs": dict(rescorer["embedder"])}  # type: ignore[attr-defined]
    return {"name": CropRescorer.spec_name, "kwargs": dict(rescorer["settings"]),  # type: ignore[attr-defined]
            "enrolled": list(rescorer["enrolled"]), "children": {"detector": detector, "embedder": embedder}}


def read_model_file(path: str | Path) -> ModelFile:
    """The spec, weights and metadata of a model file, a version-1 detector file or a training checkpoint."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    metadata: dict[str, Any] = {}
    if ckpt.get("format") == MODEL_FORMAT:
        spec, state, metadata = ckpt.get("spec"), ckpt.get("state_dict"), dict(ckpt.get("metadata") or {})
    elif ckpt.get("format") == _DETECTOR_FORMAT_V1:
        spec, state, metadata = ckpt.get("model"), ckpt.get("state_dict"), dict(ckpt.get("metadata") or {})
        spec = _spec_from_v1(dict(spec)) if isinstance(spec, Mapping) and "name" in spec else spec
    elif "state_dict" in ckpt and isinstance(ckpt.get("hyper_parameters"), Mapping):
        # A Lightning checkpoint of a fewsight training module: the model's weights live under "model.".
        spec = ckpt["hyper_parameters"].get("model_spec")
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise CheckpointError(f"{path}: not a fewsight model file or training checkpoint (keys: {sorted(ckpt)[:8]})")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise CheckpointError(f"{path}: the file does not say which model it holds (no model spec)")
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"{path}: the file holds no model weights")
    return ModelFile(dict(spec), dict(state), metadata)


def check_finite_weights(path: str | Path, state: Mapping[str, Any]) -> None:
    """Raise :class:`~fewsight.errors.CheckpointError` naming ``path`` and the first tensors of the
    state dict ``state`` that hold NaN or inf."""
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
           and v.numel() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: the weights hold NaN or inf values ({', '.join(bad[:3])}"
                              f"{', ...' if len(bad) > 3 else ''}); the training diverged or the file is damaged")


def load_model(path: str | Path, *, expect: type | tuple[type, ...] | None = None) -> nn.Module:
    """Rebuild the model of a file written by :func:`save_model` (or a training checkpoint).

    The model is on the CPU in eval mode; move it with ``.to(...)``. ``expect``: the class(es) the
    caller needs; another kind raises :class:`~fewsight.errors.CheckpointError` saying which. Weights
    that do not fit the architecture, or that are not finite, raise it too.
    """
    path = Path(path)
    spec, state, _ = read_model_file(path)
    try:
        model = model_from_spec(spec)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot rebuild the {spec.get('name')} model ({type(exc).__name__}: {exc})") from exc
    if expect is not None and not isinstance(model, expect):
        wanted = " or ".join(c.__name__ for c in (expect if isinstance(expect, tuple) else (expect,)))
        raise CheckpointError(f"{path}: expected a {wanted} file, got a {type(model).__name__}")
    check_finite_weights(path, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: the weights do not fit the {spec['name']} model ({' '.join(first[:3])[:300]})") from exc
    return model.eval()
