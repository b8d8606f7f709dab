"""JSON output: metrics and detections as plain, standard JSON, written atomically.

* :func:`to_jsonable` turns tensors, numpy values, paths and dataclasses into JSON types; ``nan`` /
  ``inf`` (undefined metrics) become ``null`` so the file stays standard JSON.
* :func:`write_json` writes next to the destination and ``os.replace``-s it in, so a reader never
  sees a half-written file; the file gets the permissions of an ordinary new file (the umask's).
* :func:`detections_to_json` gives one image's detections as ``[{"box", "score", "label", "class"}]``.

Example:
    >>> import torch, tempfile, os, json
    >>> p = os.path.join(tempfile.mkdtemp(), "m.json")
    >>> _ = write_json({"map": torch.tensor(0.5), "ap": float("nan")}, p)
    >>> json.load(open(p))
    {'map': 0.5, 'ap': None}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from fewsight._io import atomic_write_bytes

__all__ = ["atomic_write_bytes", "detections_to_json", "to_jsonable", "write_json"]


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` made only of dict / list / str / int / float / bool / None (non-finite -> None)."""
    if isinstance(obj, Tensor):
        obj = obj.detach().cpu()
        return to_jsonable(obj.item() if obj.ndim == 0 else obj.tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (Sequence, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    return str(obj)


def write_json(obj: Any, path: str | Path, *, indent: int = 2) -> Path:
    """Write ``to_jsonable(obj)`` to ``path`` atomically (standard JSON: no NaN); returns the path."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_bytes((text + "\n").encode("utf-8"), path)


def detections_to_json(prediction: Mapping[str, Tensor], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One image's ``{"boxes", "scores", "labels"}`` as a list of ``{"box", "score", "label", "class"}``."""
    boxes = prediction["boxes"].detach().cpu().float().reshape(-1, 4).tolist()
    scores = prediction["scores"].detach().cpu().float().reshape(-1).tolist()
    labels = prediction["labels"].detach().cpu().reshape(-1).tolist()
    out = []
    for box, score, label in zip(boxes, scores, labels):
        label = int(label)
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        out.append({"box": [round(v, 2) for v in box], "score": round(float(score), 4), "label": label, "class": name})
    return out
