"""The enrolled detector's proposals in a project folder, written a chunk of images at a time, and the
person's accept / reject decisions on them.

``proposals/chunk-NNNNNN.json`` holds ``{"model": ID, "images": {file name: [{"box", "label", "score"}]}}``
for the images of one chunk, written atomically; ``ID`` names the model file the proposals came from
(a digest of its bytes), so proposals of an earlier enrollment are never mixed with new ones. A run
killed mid-way leaves whole chunks only: the next run proposes the images no chunk holds.
``decisions.json`` maps a proposal key ``"<file name>#<rank>"`` to ``"accepted"`` / ``"rejected"``.

Example:
    >>> import tempfile
    >>> store = ProposalStore(tempfile.mkdtemp(), "m1")
    >>> store.add_chunk({"a.png": [{"box": [1, 1, 9, 9], "label": "8", "score": 0.9}], "b.png": []})
    >>> sorted(ProposalStore(store.root, "m1").done), len(ProposalStore(store.root, "other").done)
    (['a.png', 'b.png'], 0)
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fewsight._io import atomic_write_bytes, read_json

__all__ = ["DECISIONS", "ProposalStore", "proposal_key"]

DECISIONS = ("accepted", "rejected")
_CHUNK_GLOB = "chunk-*.json"
logger = logging.getLogger("fewsight.app")


def proposal_key(name: str, rank: int) -> str:
    """The key of the ``rank``-th proposal of image ``name`` (``"name#rank"``)."""
    return f"{name}#{rank}"


class ProposalStore:
    """The proposals and decisions under project folder ``root`` for the model ``model_id`` (module docstring)."""

    def __init__(self, root: str | Path, model_id: str | None) -> None:
        self.root = Path(root)
        self.folder = self.root / "proposals"
        self.decisions_path = self.root / "decisions.json"
        self._lock = threading.RLock()
        self.model_id = model_id
        self._results: dict[str, list[dict[str, Any]]] = {}
        self._decisions: dict[str, str] = {}
        self._next_chunk = 0
        self._read()

    def _read(self) -> None:
        for path in sorted(self.folder.glob(_CHUNK_GLOB)):
            self._next_chunk = max(self._next_chunk, _chunk_number(path) + 1)
            try:
                data = read_json(path, what="proposal chunk")
                if not isinstance(data, dict) or data.get("model") != self.model_id or self.model_id is None:
                    continue  # another enrollment's proposals: reset() removes them
                images = data["images"]
                for name, items in images.items():
                    self._results[str(name)] = [_item(d) for d in items]
            except Exception as exc:  # a chunk is written atomically: a bad one is foreign; its images are redone
                logger.warning("ignoring %s (%s)", path, exc)
        if self.decisions_path.exists() and self.model_id is not None:
            try:
                data = read_json(self.decisions_path, what="proposal decisions")
                if isinstance(data, dict) and data.get("model") == self.model_id:
                    self._decisions = {str(k): v for k, v in dict(data["decisions"]).items() if v in DECISIONS}
            except Exception as exc:
                logger.warning("ignoring %s (%s)", self.decisions_path, exc)

    def reset(self, model_id: str) -> None:
        """Forget every proposal and decision (a new enrollment): their files are removed."""
        with self._lock:
            for path in self.folder.glob(_CHUNK_GLOB):
                path.unlink(missing_ok=True)
            self.decisions_path.unlink(missing_ok=True)
            self.model_id, self._results, self._decisions, self._next_chunk = model_id, {}, {}, 0

    @property
    def done(self) -> set[str]:
        """Names of the images that have proposals (possibly none found) for the current model."""
        with self._lock:
            return set(self._results)

    def add_chunk(self, results: Mapping[str, list[dict[str, Any]]]) -> None:
        """Store the proposals of a chunk of images (written to its own file before memory changes)."""
        clean = {str(n): [_item(d) for d in items] for n, items in results.items()}
        with self._lock:
            path = self.folder / f"chunk-{self._next_chunk:06d}.json"
            atomic_write_bytes(json.dumps({"model": self.model_id, "images": clean}).encode("utf-8"), path)
            self._next_chunk += 1
            self._results.update(clean)

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._results.values())

    def items(self, name: str) -> list[dict[str, Any]]:
        """The proposals of image ``name``, each with its ``rank``, ``key`` and ``status`` (pending / accepted / rejected)."""
        with self._lock:
            out = []
            for rank, p in enumerate(self._results.get(name, [])):
                key = proposal_key(name, rank)
                out.append({**p, "box": list(p["box"]), "rank": rank, "key": key,
                            "status": self._decisions.get(key, "pending")})
            return out

    def names(self) -> list[str]:
        with self._lock:
            return list(self._results)

    def decide(self, keys: Iterable[str], decision: str) -> list[str]:
        """Record ``decision`` for the proposals ``keys`` that exist; returns those keys."""
        with self._lock:
            known = [k for k in keys if self._exists(k)]
            if known:
                self._decisions.update({k: decision for k in known})
                data = {"model": self.model_id, "decisions": self._decisions}
                atomic_write_bytes(json.dumps(data).encode("utf-8"), self.decisions_path)
            return known

    def _exists(self, key: str) -> bool:
        name, _, rank = key.rpartition("#")
        return rank.isdigit() and int(rank) < len(self._results.get(name, []))


def _item(d: Mapping[str, Any]) -> dict[str, Any]:
    box = [float(v) for v in d["box"]]
    if len(box) != 4:
        raise ValueError(f"expected 4 box coordinates, got {len(box)}")
    return {"box": box, "label": str(d["label"]), "score": float(d["score"])}


def _chunk_number(path: Path) -> int:
    digits = path.stem.rpartition("-")[2]
    return int(digits) if digits.isdigit() else 0
