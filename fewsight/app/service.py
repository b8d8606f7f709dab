"""What the app does, without HTTP: enroll the drawn boxes, propose, decide, search and export.

:class:`Labeller` ties an image folder, a base DLDENet file (and optionally a crop embedder) and a
project folder (:mod:`fewsight.app.project`). Every operation is the library's own:

* enroll: :func:`fewsight.fewshot.enroll_support` with :class:`~fewsight.fewshot.EnrollSettings` defaults
  on a fresh copy of the base detector (wrapped in a :class:`~fewsight.fewshot.CropRescorer` when an
  embedder is given), from the boxes the person drew of classes the detector does not know. The support
  set is the library's (:func:`fewsight.fewshot.all_boxes_support` over the saved boxes, as
  ``enroll_from_dataset`` builds it): the images holding such a box, each of their other boxes (a known
  class, an accepted proposal) labelled ``-1`` — ignored, neither the class nor background — as
  :func:`~fewsight.fewshot.sample_support` does in the few-shot protocol. An object left unboxed on a
  support image counts as background. The result is the project's ``model.pt``
  (:func:`fewsight.hub.save_model`); its previous proposals are dropped.
* propose: :class:`~fewsight.app.propose.ProposeJob` in the background.
* search: :func:`fewsight.retrieval.embed_crop` of the drawn box against a gallery of the folder's
  objects (:func:`fewsight.retrieval.index_images`, the gallery of ``fewsight search``), built on first use.
* export: the dataset writers of :mod:`fewsight.data.formats` (COCO, VOC, YOLO, CSV).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewsight._io import atomic_write_bytes
from fewsight.app.images import ImageFolder, ImageInfo
from fewsight.app.project import Annotations, clean_boxes
from fewsight.app.proposals import DECISIONS, ProposalStore
from fewsight.app.propose import ProposeJob
from fewsight.data import get_format, open_dataset
from fewsight.data.export import EXPORT_FORMATS
from fewsight.errors import CheckpointError, DataError, InvalidArgumentError, check_choice
from fewsight.fewshot import CropEmbedder, CropRescorer, EnrollSettings, enroll_support
from fewsight.fewshot.support import all_boxes_support
from fewsight.hub import load_model, read_model_file, save_model
from fewsight.models import DLDENet

__all__ = ["ACCEPTED", "Labeller", "SavedBoxes", "file_digest"]

MODEL_FILE = "model.pt"
PROJECT_FILE = "project.json"


def file_digest(path: str | Path) -> str:
    """The first 16 hex digits of the SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


#: The class of accepted proposals in :class:`SavedBoxes` (a name no label can have: labels are printable).
ACCEPTED = "\x00accepted proposal"


class SavedBoxes:
    """The saved boxes of a project as a detection dataset for :mod:`fewsight.fewshot`'s support sets.

    Items ``(image, {"boxes", "labels"})`` for the folder's images with saved boxes, in id order; ``classes``
    are the drawn boxes' class names, then :data:`ACCEPTED`, the one class of every accepted proposal (so
    enrolling a drawn class never takes an accepted proposal as an example of it).
    """

    def __init__(self, folder: ImageFolder, snapshot: dict[str, list[dict[str, Any]]]) -> None:
        self.folder = folder
        self.infos = [info for info in folder.images if snapshot.get(info.name)]
        self.boxes = [snapshot[info.name] for info in self.infos]
        drawn = [b["label"] for boxes in self.boxes for b in boxes if b["source"] == "drawn"]
        self.classes = [*dict.fromkeys(drawn), ACCEPTED]

    def __len__(self) -> int:
        return len(self.infos)

    def get_target(self, i: int) -> dict[str, torch.Tensor]:
        boxes = self.boxes[i]
        labels = [self.classes.index(b["label"] if b["source"] == "drawn" else ACCEPTED) for b in boxes]
        return {"boxes": torch.tensor([b["box"] for b in boxes], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(labels, dtype=torch.long)}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.folder.load(self.infos[i]), self.get_target(i)


class Labeller:
    """The app's state and operations (module docstring).

    Args:
        images_dir: the folder of images to label (read only).
        checkpoint: a DLDENet model file; any other kind raises :class:`~fewsight.errors.CheckpointError`.
        project_dir: the project folder (created; not the image folder).
        embedder: optional :class:`~fewsight.fewshot.CropEmbedder` file for the crop stage and search.
        resume: restart a proposal run the previous server was doing when it stopped.
        search_score_threshold: detections at least this score go into the search gallery.
        annotations: a dataset (any format :func:`fewsight.data.open_dataset` reads, e.g. an export) whose
            boxes start a new project, matched to the folder's images by file name.
        device: where the networks run.
    """

    def __init__(self, images_dir: str | Path, checkpoint: str | Path, project_dir: str | Path,
                 embedder: str | Path | None = None, *, resume: bool = True, search_score_threshold: float = 0.3,
                 annotations: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.folder = ImageFolder(images_dir)
        self.root = Path(project_dir)
        if self.root.resolve() == self.folder.root.resolve():
            raise InvalidArgumentError(f"project: expected a folder other than the image folder {images_dir} "
                                       "(the project's files would be listed among the images)")
        self.device = torch.device(device)
        self.checkpoint = Path(checkpoint)
        self.base = load_model(checkpoint, expect=DLDENet).to(self.device)
        self.base_digest = file_digest(checkpoint)
        self.embedder = None if embedder is None else load_model(embedder, expect=CropEmbedder).to(self.device)
        self.embedder_path = None if embedder is None else str(embedder)
        self.search_score_threshold = float(search_score_threshold)
        self.root.mkdir(parents=True, exist_ok=True)
        new = not (self.root / "annotations.json").exists()
        self.annotations = Annotations(self.root)
        self._lock = threading.RLock()
        self._gallery_lock = threading.Lock()  # a first search indexes the folder: other operations go on
        self._gallery: Any = None
        self.model, self.model_id = self._load_enrolled()
        self.store = ProposalStore(self.root, self.model_id)
        self.job = self._new_job()
        info = {"images": str(self.folder.root.resolve()), "checkpoint": str(self.checkpoint.resolve()),
                "embedder": self.embedder_path}
        atomic_write_bytes(json.dumps(info, indent=1).encode("utf-8"), self.root / PROJECT_FILE)
        if annotations is not None and new:
            self.import_dataset(annotations)
        request = ProposeJob.interrupted(self.root, self.model_id) if resume else None
        if request is not None and self.job is not None:
            self.job.start(request.get("limit"))

    # -- models --------------------------------------------------------------------------------------
    def _load_enrolled(self) -> tuple[Any, str | None]:
        path = self.root / MODEL_FILE
        if not path.exists():
            return None, None
        meta = read_model_file(path).metadata
        if meta.get("base_digest") not in (None, self.base_digest):
            raise CheckpointError(f"{path}: enrolled from another base checkpoint ({meta.get('base_checkpoint')}) "
                                  f"than {self.checkpoint}; start with that checkpoint or another --project")
        if bool(meta.get("embedder")) != (self.embedder is not None):
            raise CheckpointError(f"{path}: enrolled {'with' if meta.get('embedder') else 'without'} a crop embedder; "
                                  "start the app the same way, or with another --project")
        model = load_model(path, expect=(DLDENet, CropRescorer)).to(self.device)
        return model, file_digest(path)

    def _new_job(self) -> ProposeJob | None:
        if self.model is None:
            return None
        return ProposeJob(self.folder, self.store, self.model, self.annotations.classes)

    @property
    def enrolled(self) -> list[str]:
        return [] if self.model is None else list(self.model.classes[len(self.base.classes):])

    def status(self) -> dict[str, Any]:
        """What the page shows at the top: folders, classes, counts, the proposal run."""
        counts = self.annotations.counts()
        return {"images_dir": str(self.folder.root), "project_dir": str(self.root), "checkpoint": str(self.checkpoint),
                "embedder": self.embedder_path, "base_classes": list(self.base.classes), "enrolled": self.enrolled,
                "classes": list(self.annotations.classes), "images": len(self.folder),
                "skipped": len(self.folder.skipped), "annotated_images": sum(1 for n in counts.values() if n),
                "boxes": sum(counts.values()), "propose": self.progress(), "export_formats": list(EXPORT_FORMATS)}

    # -- enrollment ----------------------------------------------------------------------------------
    def enroll(self) -> dict[str, Any]:
        """Enroll every class of drawn boxes the base detector does not know (module docstring)."""
        with self._lock:
            if self.job is not None:
                self.job.stop()
            snapshot = self.annotations.snapshot()
            base = set(self.base.classes)
            drawn = [b["label"] for boxes in snapshot.values() for b in boxes if b["source"] == "drawn"]
            names = [c for c in self.annotations.classes if c not in base and c in drawn]
            if not names:
                raise InvalidArgumentError(f"boxes: expected drawn boxes of at least one class the detector does not "
                                           f"know (it knows {sorted(base)}), got none")
            saved = SavedBoxes(self.folder, snapshot)
            support = all_boxes_support(saved, [saved.classes.index(n) for n in names])
            labels = torch.cat([t["labels"] for t in support.targets])
            counts = {n: int((labels == j).sum()) for j, n in enumerate(names)}
            model: Any = copy.deepcopy(self.base)
            if self.embedder is not None:
                model = CropRescorer(model, self.embedder).eval()
            settings = EnrollSettings()
            enroll_support(model, support.images(saved), support, names, settings)
            path = self.root / MODEL_FILE
            save_model(model, path, metadata={"enrolled": names, "shots": counts, "base_checkpoint": str(self.checkpoint),
                                              "base_digest": self.base_digest, "embedder": self.embedder_path,
                                              "calibrate": settings.calibrate, "rivalry": settings.rivalry})
            self.model, self.model_id = model.eval(), file_digest(path)
            self.store.reset(self.model_id)
            self.job = self._new_job()
            return {"enrolled": names, "boxes": counts, "support_images": len(support.indices), "classes": list(model.classes)}

    # -- proposals -----------------------------------------------------------------------------------
    def propose(self, limit: int | None = None) -> dict[str, Any]:
        """Start proposing the images without proposals (at most ``limit``); the run's progress."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise InvalidArgumentError(f"limit: expected an int >= 1 or null, got {limit!r}")
        with self._lock:
            if self.job is None:
                raise InvalidArgumentError("propose: expected an enrolled detector; draw boxes of new classes and "
                                           "enroll first")
            self.job.labels = set(self.annotations.classes)
            self.job.start(limit)
            return self.progress()

    def stop(self) -> dict[str, Any]:
        """Stop the proposal run after its current batch."""
        if self.job is not None:
            self.job.stop()
        return self.progress()

    def shutdown(self) -> None:
        """Stop the run at server shutdown, leaving it to be resumed by the next server."""
        if self.job is not None:
            self.job.stop(forget=False)

    def progress(self) -> dict[str, Any]:
        if self.job is None:
            return {"state": "no model", "done": 0, "total": len(self.folder), "proposals": 0, "run_done": 0,
                    "run_total": 0, "first_proposal_s": None, "elapsed_s": None, "error": None}
        return self.job.progress()

    def proposals(self, *, image: ImageInfo | None = None, min_score: float = 0.0, status: str | None = None,
                  offset: int = 0, limit: int = 200) -> dict[str, Any]:
        """Proposals (image id order, then score), filtered; ``{"total", "items", "images"}`` where ``images``
        lists the ids of the images with matching proposals."""
        if status is not None:
            check_choice("status", status, ("pending", *DECISIONS))
        infos = [image] if image is not None else [self.folder.by_name(n) for n in self.store.names()]
        matched: list[dict[str, Any]] = []
        for info in sorted((i for i in infos if i is not None), key=lambda i: i.id):
            for p in self.store.items(info.name):
                if p["score"] >= min_score and (status is None or p["status"] == status):
                    matched.append({**p, "image": info.id, "name": info.name})
        ids = sorted({p["image"] for p in matched})
        return {"total": len(matched), "items": matched[offset : offset + limit], "images": ids}

    def decide(self, decision: str, keys: Sequence[str] | None = None, min_score: float | None = None) -> dict[str, Any]:
        """Accept or reject proposals by key, or every pending one scoring at least ``min_score``. An accepted
        proposal becomes a box of its image (``source: "proposal"``); rejecting an accepted one removes it."""
        check_choice("decision", decision, ("accept", "reject"))
        if (keys is None) == (min_score is None):
            raise InvalidArgumentError("keys, min_score: expected exactly one of a list of proposal keys or a minimum "
                                       "score")
        with self._lock:
            if keys is None:
                chosen = self.proposals(min_score=float(min_score), status="pending", limit=10**9)["items"]
            else:
                wanted, chosen = set(keys), []
                for name in {k.rpartition("#")[0] for k in wanted}:
                    chosen += [{**p, "name": name} for p in self.store.items(name) if p["key"] in wanted]
                unknown = sorted(wanted - {p["key"] for p in chosen})
                if unknown:
                    raise InvalidArgumentError(f"keys: expected keys of stored proposals, got unknown {unknown[:5]}")
            by_image: dict[str, list[dict[str, Any]]] = {}
            for p in chosen:
                by_image.setdefault(p["name"], []).append(p)
            for name, items in by_image.items():
                info = self.folder.by_name(name)
                size = info.size if info is not None else self.annotations.size(name)
                if size is None:
                    continue
                if decision == "accept":
                    self.annotations.add_boxes(name, size, [{"box": p["box"], "label": p["label"], "source": "proposal",
                                                             "score": p["score"], "proposal": p["key"]} for p in items])
                else:
                    self.annotations.remove_proposals(name, [p["key"] for p in items])
            done = self.store.decide([p["key"] for p in chosen], "accepted" if decision == "accept" else "rejected")
            return {"decided": len(done), "decision": decision}

    # -- search --------------------------------------------------------------------------------------
    def search(self, info: ImageInfo, box: Sequence[float], k: int = 12) -> dict[str, Any]:
        """The ``k`` images whose objects are most similar to ``box`` of image ``info`` (best object per image)."""
        from fewsight.retrieval import embed_crop

        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 500:
            raise InvalidArgumentError(f"k: expected an int in [1, 500], got {k!r}")
        (clean,) = clean_boxes([{"box": box, "label": "query"}], info.size, "query")
        image = self.folder.load(info)
        query = embed_crop(self.base, image, box=torch.tensor(clean["box"]), embedder=self.embedder)
        if not bool(query.norm() > 0):
            raise InvalidArgumentError(f"box: expected a box the detector can embed, got {clean['box']} (it matches "
                                       "no anchor; draw it around an object)")
        gallery = self.gallery()
        if len(gallery) == 0:
            return {"results": [], "gallery": 0}
        found = gallery.search(query[None].cpu(), k=min(len(gallery), k * 10))
        results, seen = [], set()
        classes = list(self.base.classes)
        for rank in range(found.indices.shape[1]):
            if int(found.indices[0, rank]) < 0 or len(results) == k:
                break
            image_id = int(found.image_ids[0, rank])
            if image_id in seen:
                continue
            seen.add(image_id)
            label = int(found.labels[0, rank])
            results.append({"image": image_id, "name": self.folder.images[image_id].name,
                            "score": round(float(found.scores[0, rank]), 4),
                            "box": [round(v, 1) for v in found.boxes[0, rank].tolist()],
                            "label": classes[label] if 0 <= label < len(classes) else None})
        return {"results": results, "gallery": len(gallery)}

    def gallery(self) -> Any:
        """The search gallery of the folder's detected objects (built once, a batch of images at a time)."""
        from fewsight.retrieval import Gallery, index_images

        with self._gallery_lock:
            if self._gallery is None:
                dim = self.base.classifier.embedding_dim if self.embedder is None else self.embedder.dim
                gallery = Gallery(dim, class_names=list(self.base.classes))
                infos = list(self.folder.images)
                for start in range(0, len(infos), 16):
                    images, ids = [], []
                    for info in infos[start : start + 16]:
                        try:
                            images.append(self.folder.load(info))
                            ids.append(info.id)
                        except DataError:
                            continue
                    if images:
                        part = index_images(self.base, images, image_ids=ids, embedder=self.embedder,
                                            score_threshold=self.search_score_threshold)
                        if len(part):
                            gallery.add(part.embeddings(), labels=part.labels, image_ids=part.image_ids,
                                        boxes=part.boxes)
                self._gallery = gallery
            return self._gallery

    # -- import / export -----------------------------------------------------------------------------
    def import_dataset(self, path: str | Path) -> int:
        """Start the project with the boxes of the dataset at ``path`` (by image file name); returns the images matched."""
        dataset = open_dataset(path, images=None)
        boxes: dict[str, Any] = {}
        for i in range(len(dataset)):
            info = self.folder.by_name(Path(dataset.image_path(i)).name)
            if info is None:
                continue
            t = dataset.get_target(i)
            boxes[info.name] = (info.size, [{"box": b, "label": dataset.classes[k]}
                                            for b, k in zip(t["boxes"].tolist(), t["labels"].tolist())])
        if not boxes:
            raise DataError(path, f"no image of the dataset is in the image folder {self.folder.root}")
        self.annotations.set_many(boxes)
        return len(boxes)

    def export(self, fmt: str) -> dict[str, Any]:
        """Write every readable image and its boxes to ``exports/<fmt>/`` with the format's writer; for COCO
        also ``detections.json`` (COCO results: each box with its score, 1 for drawn boxes)."""
        check_choice("format", fmt, EXPORT_FORMATS)
        spec = get_format(fmt)
        classes = list(self.annotations.classes)
        if not classes:
            raise InvalidArgumentError("format: expected some boxes to export, got none (draw or accept boxes first)")
        snapshot = self.annotations.snapshot()
        infos = [i for i in self.folder.images if not self.folder.is_skipped(i.name)]
        exports = self.root / "exports"
        tmp, dest, old = exports / f".{fmt}.tmp", exports / fmt, exports / f".{fmt}.old"
        for p in (tmp, old):
            shutil.rmtree(p, ignore_errors=True)
        (tmp / spec.image_folder).mkdir(parents=True)
        targets, scores = [], []
        for info in infos:
            shutil.copyfile(info.path, tmp / spec.image_folder / info.name)
            boxes = snapshot.get(info.name, [])
            targets.append({"boxes": torch.tensor([b["box"] for b in boxes], dtype=torch.float64).reshape(-1, 4),
                            "labels": torch.tensor([classes.index(b["label"]) for b in boxes], dtype=torch.long)})
            scores.append([b.get("score", 1.0) for b in boxes])
        out = spec.writer(tmp, [i.name for i in infos], [i.size for i in infos], targets, classes)
        if fmt == "coco":
            results = [{"image_id": n + 1, "category_id": int(k) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
                       for n, (t, sc) in enumerate(zip(targets, scores))
                       for (x1, y1, x2, y2), k, s in zip(t["boxes"].tolist(), t["labels"].tolist(), sc)]
            atomic_write_bytes(json.dumps(results).encode("utf-8"), tmp / "detections.json")
        # Swap whole folders so a reader never sees half an export.
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        path = dest / Path(out).relative_to(tmp)
        return {"format": fmt, "path": str(path), "folder": str(dest), "images": len(infos),
                "boxes": sum(len(t["labels"]) for t in targets), "classes": classes}
