"""The background proposal run: the enrolled detector over the image folder, with progress, stop and resume.

:class:`ProposeJob` runs in a thread and stores its results through a
:class:`~fewsight.app.proposals.ProposalStore` a chunk of images at a time (the first chunk after
one batch, so the first proposals show quickly). It proposes only the images the store does not
hold yet, so a run started again after a stop, a crash or a killed server continues where the
stored chunks end. ``propose.json`` in the project folder says whether a run was going on, so a
restarted server resumes it (:meth:`ProposeJob.interrupted`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewsight._io import atomic_write_bytes, read_json
from fewsight.app.images import ImageFolder
from fewsight.app.proposals import ProposalStore
from fewsight.errors import DataError

__all__ = ["PROPOSAL_FLOOR", "ProposeJob"]

#: Proposals below this score are not stored (the page's slider starts above it).
PROPOSAL_FLOOR = 0.05
STATE_FILE = "propose.json"
logger = logging.getLogger("fewsight.app")


class ProposeJob:
    """One proposal run at a time over ``folder`` with ``model`` (module docstring).

    Args:
        folder, store: the images and where their proposals go.
        model: the enrolled detector (eval mode; called under ``torch.no_grad``).
        labels: the class names to propose (a detection of another class is dropped).
        batch_size: images per forward pass; chunk_images: images per stored chunk.
    """

    def __init__(self, folder: ImageFolder, store: ProposalStore, model: nn.Module, labels: Collection[str], *,
                 batch_size: int = 4, chunk_images: int = 16) -> None:
        self.folder, self.store, self.model = folder, store, model
        self.labels = set(labels)
        self.batch_size, self.chunk_images = batch_size, chunk_images
        self.state_path = store.root / STATE_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._status: dict[str, Any] = {"state": "idle", "error": None, "run_done": 0, "run_total": 0,
                                        "started": None, "first_proposal_s": None, "elapsed_s": None}

    # -- the state file ------------------------------------------------------------------------------
    @staticmethod
    def interrupted(root: Path, model_id: str | None) -> dict[str, Any] | None:
        """The request of a run that was going on when the server stopped (``None``: none, or another model's)."""
        path = Path(root) / STATE_FILE
        if model_id is None or not path.exists():
            return None
        try:
            data = read_json(path, what="proposal state")
        except DataError as exc:
            logger.warning("ignoring %s (%s)", path, exc)
            return None
        if isinstance(data, dict) and data.get("running") and data.get("model") == model_id:
            return data
        return None

    def _write_state(self, running: bool, limit: int | None) -> None:
        data = {"running": running, "limit": limit, "model": self.store.model_id}
        atomic_write_bytes(json.dumps(data).encode("utf-8"), self.state_path)

    # -- control -------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, limit: int | None = None) -> bool:
        """Start proposing the images without proposals (at most ``limit`` of them); ``False`` when running."""
        with self._lock:
            if self.running:
                return False
            self._stop.clear()
            self._write_state(True, limit)
            todo = self.todo()
            todo = todo if limit is None else todo[:limit]
            self._status.update(state="running", error=None, run_done=0, run_total=len(todo), started=time.time(),
                                first_proposal_s=None, elapsed_s=0.0)
            self._thread = threading.Thread(target=self._run, args=(todo, limit), name="fewsight-propose", daemon=True)
            self._thread.start()
            return True

    def stop(self, *, wait: bool = True, forget: bool = True, on_progress: Callable[[], None] | None = None) -> None:
        """Ask the run to stop after its current batch (``wait``: until it has); ``forget``: a restarted server
        does not resume it (a shutdown passes ``False``, so the run continues after a restart)."""
        self._stop.set()
        thread = self._thread
        if wait and thread is not None:
            thread.join()
        if forget and self.state_path.exists():
            self._write_state(False, None)

    def todo(self) -> list[Any]:
        """The listed, readable images without proposals yet, in id order."""
        done = self.store.done
        return [im for im in self.folder.images if im.name not in done and not self.folder.is_skipped(im.name)]

    def progress(self) -> dict[str, Any]:
        """``{"state", "done", "total", "proposals", "run_done", "run_total", "first_proposal_s", "elapsed_s", "error"}``."""
        with self._lock:
            status = dict(self._status)
        names = {im.name for im in self.folder.images if not self.folder.is_skipped(im.name)}
        status["done"] = len(self.store.done & names)
        status["total"] = len(names)
        status["proposals"] = self.store.count()
        status.pop("started")
        return status

    # -- the run -------------------------------------------------------------------------------------
    def _run(self, todo: list[Any], limit: int | None) -> None:
        start = time.perf_counter()
        buffer: dict[str, list[dict[str, Any]]] = {}
        flushed = False
        try:
            for i in range(0, len(todo), self.batch_size):
                if self._stop.is_set():
                    break
                self._propose_batch(todo[i : i + self.batch_size], buffer)
                if buffer and (not flushed or len(buffer) >= self.chunk_images):
                    self.store.add_chunk(buffer)
                    buffer, flushed = {}, True
                    with self._lock:
                        if self._status["first_proposal_s"] is None:
                            self._status["first_proposal_s"] = round(time.perf_counter() - start, 3)
                with self._lock:
                    self._status["run_done"] = min(i + self.batch_size, len(todo))
                    self._status["elapsed_s"] = round(time.perf_counter() - start, 3)
            if buffer:
                self.store.add_chunk(buffer)
            finished = not self._stop.is_set()
            with self._lock:
                self._status.update(state="done" if finished else "stopped",
                                    elapsed_s=round(time.perf_counter() - start, 3))
            if finished:
                self._write_state(False, limit)
        except Exception as exc:  # shown on the page; the stored chunks stay and a new run continues from them
            logger.exception("proposal run failed")
            with self._lock:
                self._status.update(state="error", error=f"{type(exc).__name__}: {exc}")

    @torch.no_grad()
    def _propose_batch(self, batch: list[Any], buffer: dict[str, list[dict[str, Any]]]) -> None:
        images, names = [], []
        for info in batch:
            try:
                images.append(self.folder.load(info))
                names.append(info.name)
            except DataError:
                continue  # listed as skipped by the folder
        if not images:
            return
        device = next(self.model.parameters()).device
        classes = list(self.model.classes)
        for name, det in zip(names, self.model([im.to(device) for im in images])):
            items = []
            for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist()):
                if score >= PROPOSAL_FLOOR and classes[label] in self.labels:
                    items.append({"box": [round(v, 2) for v in box], "label": classes[label], "score": round(score, 5)})
            buffer[name] = sorted(items, key=lambda d: -d["score"])
