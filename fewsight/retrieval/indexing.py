"""Index the objects of many image files in resumable chunks: :func:`index_files`.

Images stream through a ``torch.utils.data.DataLoader`` (decoded by the caller's ``load_image``, in
``num_workers`` processes), detection and embedding run batch by batch (:func:`detect_objects`), and
the objects of every ``chunk_images`` consecutive images are written to one chunk file. A killed
run started again with the same inputs skips the chunks already written, and the gallery is then
assembled from all chunks in order, so it equals an uninterrupted run's (same items in the same
order; the same embeddings bit for bit, chunk boundaries being whole batches).

Files in ``chunk_dir`` (all written atomically, so a chunk file is complete or absent):

* ``manifest.json`` — the inputs: absolute file paths, a digest of the model's (and embedder's)
  architecture and weights, class names, ``score_threshold``, ``nms_threshold``, ``batch_size``,
  ``chunk_images``. A resume with other inputs is refused (a :class:`~fewsight.errors.DataError`
  naming the manifest and what differs).
* ``NNNNN.pt`` — chunk ``k`` (``torch.save``, loads with ``weights_only=True``): the objects of the
  images ``[k * chunk_images, (k + 1) * chunk_images)``: ``embeddings`` ``Tensor[N, D]`` float32,
  ``labels`` / ``image_ids`` ``Long[N]`` (image id = index in ``files``), ``boxes`` ``Tensor[N, 4]``
  xyxy, ``skipped`` ``[[image id, reason], ...]`` and the manifest's digest.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from fewsight.models import DLDENet
    >>> model = DLDENet(2, levels=(3, 4, 5), fpn_channels=16, embedding_dim=8, score_threshold=0.0)
    >>> images = {"a.png": torch.rand(3, 64, 64), "b.png": torch.rand(3, 64, 48)}
    >>> work = Path(tempfile.mkdtemp()) / "chunks"
    >>> run = index_files(model, list(images), work, load_image=lambda p: images[p.name], batch_size=1,
    ...                   score_threshold=0.0, chunk_images=1, progress=False)
    >>> run.chunks, sorted(p.name for p in work.iterdir())
    (2, ['00000.pt', '00001.pt', 'manifest.json'])
    >>> set(run.gallery.image_ids.tolist()) <= {0, 1}
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fewsight._io import atomic_write_bytes, read_json, short_repr
from fewsight.errors import DataError, InvalidArgumentError
from fewsight.retrieval.gallery import Gallery
from fewsight.retrieval.objects import detect_objects

__all__ = ["CHUNK_FORMAT", "IndexRun", "clear_chunks", "index_files"]

CHUNK_FORMAT = "fewsight.index-chunk"
MANIFEST_FORMAT = "fewsight.index-manifest"
_VERSION = 1
_MANIFEST = "manifest.json"
_CHUNK = re.compile(r"^\d{5,}\.pt$")
# atomic_write_bytes's temporary files: ".NAME.XXXXXXXX.tmp" beside NAME (left behind by a kill).
_TEMP = re.compile(r"^\.(\d{5,}\.pt|manifest\.json)\..+\.tmp$")
#: Default chunk size: the multiple of ``batch_size`` nearest this many images.
CHUNK_IMAGES = 256


class IndexRun(NamedTuple):
    """What :func:`index_files` made.

    Attributes:
        gallery: the objects of every image, in file order (see :func:`index_files`).
        skipped: ``(file, reason)`` of the unreadable images left out (``on_error="skip"``).
        resumed: chunks found complete at the start (``0``: a fresh run).
        chunks: chunks in all.
    """

    gallery: Gallery
    skipped: list[tuple[Path, str]]
    resumed: int
    chunks: int


class _Files(Dataset[Any]):
    """``(index, image | None, reason | None)`` per file: a bad file comes back as a reason, not an
    exception, so it reaches the main process intact from a worker and can be skipped there."""

    def __init__(self, files: Sequence[Path], load_image: Callable[[Path], Tensor]) -> None:
        self.files, self.load_image = files, load_image

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None]:
        try:
            return i, self.load_image(self.files[i]), None
        except DataError as exc:
            return i, None, exc.reason


def _as_list(batch: list[Any]) -> list[Any]:
    return batch  # module level: picklable for DataLoader workers


def _digest_module(module: nn.Module | None) -> str | None:
    """sha256 of a module's architecture (``to_spec()`` where it has one) and its state dict."""
    if module is None:
        return None
    h = hashlib.sha256(type(module).__name__.encode())
    spec = getattr(module, "to_spec", None)
    if callable(spec):
        h.update(json.dumps(spec(), sort_keys=True, default=str).encode())
    for key, t in sorted(module.state_dict().items()):
        if not isinstance(t, Tensor):  # extra state (class names, settings)
            h.update(f"{key}={json.dumps(t, sort_keys=True, default=str)};".encode())
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidArgumentError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def clear_chunks(chunk_dir: str | os.PathLike[str]) -> None:
    """Delete what :func:`index_files` wrote in ``chunk_dir`` (chunks, manifest, temporary files of a
    killed write), and the folder when that leaves it empty; other files are left alone."""
    folder = Path(chunk_dir)
    if not folder.is_dir():
        return
    # The manifest first: a kill half-way leaves chunks without one, which the next run discards.
    (folder / _MANIFEST).unlink(missing_ok=True)
    for p in folder.iterdir():
        if _CHUNK.match(p.name) or _TEMP.match(p.name):
            p.unlink(missing_ok=True)
    if not any(folder.iterdir()):
        folder.rmdir()


def _manifest_differences(old: Any, new: dict[str, Any]) -> list[str]:
    if not isinstance(old, dict) or old.get("format") != MANIFEST_FORMAT:
        got = old.get("format") if isinstance(old, dict) else type(old).__name__
        return [f"not a {MANIFEST_FORMAT!r} file (got {got!r})"]
    diffs = []
    for key, value in new.items():
        if key == "files":
            files = old.get("files")
            if files != value:
                if not isinstance(files, list):
                    diffs.append("files (unreadable list)")
                elif len(files) != len(value):
                    diffs.append(f"files ({len(files)} then, {len(value)} now)")
                else:
                    i = next(i for i, (a, b) in enumerate(zip(files, value)) if a != b)
                    diffs.append(f"files (#{i} was {files[i]}, now {value[i]})")
        elif key in ("model", "embedder"):
            if old.get(key) != value:
                diffs.append("embedder (none then)" if key == "embedder" and old.get(key) is None else
                             f"{key} (other weights or architecture)" if value is not None else f"{key} (none now)")
        elif old.get(key) != value:
            diffs.append(f"{key} ({old.get(key)!r} then, {value!r} now)")
    return diffs


def _chunk_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _read_chunk(path: Path, digest: str, start: int, end: int, dim: int) -> dict[str, Any]:
    """The chunk file ``path`` of images ``[start, end)``; :class:`DataError` naming it when it is not."""
    hint = "; delete it to compute this chunk again"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        reason = " ".join(str(exc).split()).split(". ", 1)[0][:120]
        raise DataError(path, f"not a readable index chunk ({type(exc).__name__}: {reason}){hint}") from None
    if not isinstance(state, dict) or state.get("format") != CHUNK_FORMAT or state.get("version") != _VERSION:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise DataError(path, f"expected a {CHUNK_FORMAT!r} version {_VERSION} file, got {got!r}{hint}")
    if state.get("manifest") != digest or (state.get("start"), state.get("end")) != (start, end):
        raise DataError(path, f"expected the chunk of images [{start}, {end}) of this manifest, got images "
                        f"[{state.get('start')}, {state.get('end')}) of another run{hint}")
    emb, labels, ids, boxes = (state.get(k) for k in ("embeddings", "labels", "image_ids", "boxes"))
    tensors = (emb, labels, ids, boxes)
    n = emb.shape[0] if isinstance(emb, Tensor) and emb.ndim == 2 else -1
    shapes_ok = (n >= 0 and all(isinstance(t, Tensor) for t in tensors) and tuple(emb.shape) == (n, dim)
                 and tuple(labels.shape) == (n,) and tuple(ids.shape) == (n,) and tuple(boxes.shape) == (n, 4))
    if not shapes_ok or (n and not bool(((ids >= start) & (ids < end)).all())):
        got = {k: tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
               for k, t in zip(("embeddings", "labels", "image_ids", "boxes"), tensors)}
        raise DataError(path, f"expected embeddings [N, {dim}], labels / image_ids [N] in [{start}, {end}) and "
                        f"boxes [N, 4], got {got}{hint}")
    skipped = state.get("skipped")
    if not isinstance(skipped, list) or not all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and start <= e[0] < end and isinstance(e[1], str)
        for e in skipped
    ):
        raise DataError(path, f"expected skipped images as [[image id in [{start}, {end}), reason], ...], got "
                        f"{short_repr(skipped)}{hint}")
    return state


def _progress(enabled: bool) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    # Off when stderr is not a terminal: rich would print the final bar into a log file or a pipe.
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=not (enabled and console.is_terminal))


def _default_gallery(dim: int, class_names: list[str]) -> Gallery:
    return Gallery(dim, class_names=class_names)


@torch.no_grad()
def index_files(
    model: nn.Module,
    files: Sequence[str | os.PathLike[str]],
    chunk_dir: str | os.PathLike[str],
    *,
    load_image: Callable[[Path], Tensor],
    batch_size: int = 8,
    score_threshold: float = 0.3,
    nms_threshold: float = 0.5,
    embedder: nn.Module | None = None,
    chunk_images: int | None = None,
    num_workers: int = 0,
    on_error: str = "raise",
    restart: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    gallery_factory: Callable[[int, list[str]], Gallery] | None = None,
) -> IndexRun:
    """Detect and embed the objects of the image ``files`` (as :func:`index_images`) chunk by chunk
    into ``chunk_dir``, resuming from the chunks a killed run left there; returns an :class:`IndexRun`.

    Args:
        model: a DLDENet (with ``embed_boxes``); ``embedder``: embed the objects' crops with it instead.
        files: the images, in gallery order; an object's image id is its file's index here.
        chunk_dir: a folder for ``manifest.json`` and the chunk files (created; files named like
            chunks there are deleted when it holds no manifest, or with ``restart``).
        load_image: ``path -> Tensor[3, H, W]`` in [0, 1] (e.g. :func:`fewsight.data.load_image`),
            raising :class:`~fewsight.errors.DataError` for an unreadable file.
        chunk_images: images per chunk, a multiple of ``batch_size`` so a resumed run batches the
            images as an uninterrupted one (default: the multiple nearest :data:`CHUNK_IMAGES`).
        num_workers: DataLoader processes decoding images (0: in this process).
        on_error: ``"raise"``: an unreadable image stops the run with its ``DataError`` (the chunks
            done are kept); ``"skip"``: it is left out, reported through ``log`` and in ``skipped``.
        restart: discard the chunks of an earlier run instead of resuming.
        progress: a rich progress bar on stderr (only when stderr is a terminal).
        log: called with one-line messages (``"resuming: K of M chunks done"``, skipped images).
        gallery_factory: ``(dim, class_names) -> Gallery`` the chunks are added to (default
            ``Gallery(dim, class_names=class_names)``).

    Raises :class:`~fewsight.errors.DataError` naming ``manifest.json`` when ``chunk_dir`` holds the
    chunks of other inputs (``restart=True`` discards them), or naming a chunk file that is corrupt.
    """
    if not callable(getattr(model, "embed_boxes", None)):
        raise InvalidArgumentError(f"model: expected a DLDENet (with embed_boxes), got {type(model).__name__}")
    batch_size = _check_int("batch_size", batch_size, 1)
    num_workers = _check_int("num_workers", num_workers, 0)
    if chunk_images is None:
        chunk_images = max(1, round(CHUNK_IMAGES / batch_size)) * batch_size
    chunk_images = _check_int("chunk_images", chunk_images, 1)
    if chunk_images % batch_size:
        raise InvalidArgumentError(f"chunk_images: expected a multiple of batch_size={batch_size} (a resumed run "
                                   f"must batch the images as an uninterrupted one), got {chunk_images}")
    for name, value in (("score_threshold", score_threshold), ("nms_threshold", nms_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgumentError(f"{name}: expected a finite number, got {value!r}")
    if on_error not in ("raise", "skip"):
        raise InvalidArgumentError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
    paths = [Path(f) for f in files]
    folder = Path(chunk_dir)
    dim = model.classifier.embedding_dim if embedder is None else int(embedder.dim)
    manifest = {
        "format": MANIFEST_FORMAT, "version": _VERSION,
        "files": [os.path.abspath(p) for p in paths],
        "model": _digest_module(model), "embedder": _digest_module(embedder), "class_names": list(model.classes),
        "score_threshold": float(score_threshold), "nms_threshold": float(nms_threshold),
        "batch_size": batch_size, "chunk_images": chunk_images,
    }
    text = json.dumps(manifest, indent=1)
    digest = hashlib.sha256(text.encode()).hexdigest()
    bounds = [(s, min(s + chunk_images, len(paths))) for s in range(0, len(paths), chunk_images)]
    chunk_files = [folder / f"{k:05d}.pt" for k in range(len(bounds))]

    manifest_file = folder / _MANIFEST
    if restart or not manifest_file.is_file():
        clear_chunks(folder)  # without a manifest, chunk files left here are of unknown inputs
        atomic_write_bytes(text.encode(), manifest_file)
    else:
        diffs = _manifest_differences(read_json(manifest_file, what="index manifest"), manifest)
        if diffs:
            raise DataError(manifest_file, f"expected the inputs of the run that wrote these chunks, got different "
                            f"{'; '.join(diffs)}; resume with the same inputs, or pass restart=True to discard them")
        for p in folder.iterdir():
            if _TEMP.match(p.name):
                p.unlink(missing_ok=True)  # a write cut short by a kill
    done = [p.is_file() for p in chunk_files]
    for (start, end), p, ok in zip(bounds, chunk_files, done):
        if ok:
            _read_chunk(p, digest, start, end, dim)  # a corrupt chunk is reported now, not after the work
    resumed = sum(done)
    if resumed and log is not None:
        log(f"resuming: {resumed} of {len(bounds)} chunks done")

    todo = [k for k, ok in enumerate(done) if not ok]
    _compute(model, embedder, paths, load_image, bounds, todo, chunk_files, digest, dim=dim,
             batch_size=batch_size, score_threshold=score_threshold, nms_threshold=nms_threshold,
             num_workers=num_workers, on_error=on_error, progress=progress, log=log)

    # The one place the gallery is built: every chunk, in order.
    gallery = (gallery_factory or _default_gallery)(dim, list(model.classes))
    skipped: list[tuple[Path, str]] = []
    for (start, end), p in zip(bounds, chunk_files):
        state = _read_chunk(p, digest, start, end, dim)
        if len(state["embeddings"]):
            gallery.add(state["embeddings"], labels=state["labels"], image_ids=state["image_ids"],
                        boxes=state["boxes"])
        skipped += [(paths[int(i)], str(reason)) for i, reason in state["skipped"]]
    return IndexRun(gallery, skipped, resumed, len(bounds))


def _compute(
    model: nn.Module, embedder: nn.Module | None, paths: list[Path], load_image: Callable[[Path], Tensor],
    bounds: list[tuple[int, int]], todo: list[int], chunk_files: list[Path], digest: str, *, dim: int,
    batch_size: int, score_threshold: float, nms_threshold: float, num_workers: int, on_error: str, progress: bool,
    log: Callable[[str], None] | None,
) -> None:
    """Write the chunks ``todo``, reading their images through one DataLoader."""
    if not todo:
        return
    device = next(model.parameters()).device
    # Batches never straddle a chunk: every chunk but the last is whole batches, as in a fresh run.
    batches = [list(range(s, min(s + batch_size, bounds[k][1]))) for k in todo for s in range(*bounds[k], batch_size)]
    loader = DataLoader(_Files(paths, load_image), batch_sampler=batches, collate_fn=_as_list, num_workers=num_workers)
    was_training = model.training
    model.eval()
    try:
        with _progress(progress) as bar:
            remaining = sum(bounds[k][1] - bounds[k][0] for k in todo)
            task = bar.add_task("index", total=len(paths), completed=len(paths) - remaining)
            items = iter(loader)
            for k in todo:
                start, end = bounds[k]
                parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
                skipped: list[list[Any]] = []
                for _ in range(start, end, batch_size):
                    batch = next(items)
                    for i, _, reason in batch:
                        if reason is not None:
                            if on_error == "raise":
                                raise DataError(paths[i], reason)
                            skipped.append([i, reason])
                            if log is not None:
                                log(f"skipped {paths[i]}: {reason}")
                    good = [(i, im.to(device)) for i, im, _ in batch if im is not None]
                    if good:
                        emb, labels, owner, boxes = detect_objects(
                            model, [im for _, im in good], score_threshold=score_threshold,
                            nms_threshold=nms_threshold, embedder=embedder)
                        ids = torch.tensor([i for i, _ in good], dtype=torch.long)
                        parts.append((emb.detach().cpu().float(), labels.cpu().long(), ids[owner.cpu()],
                                      boxes.detach().cpu().float()))
                    bar.advance(task, len(batch))
                state = {
                    "format": CHUNK_FORMAT, "version": _VERSION, "manifest": digest, "start": start, "end": end,
                    "embeddings": torch.cat([p[0] for p in parts]) if parts else torch.zeros(0, dim),
                    "labels": torch.cat([p[1] for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
                    "image_ids": torch.cat([p[2] for p in parts]) if parts else torch.zeros(0, dtype=torch.long),
                    "boxes": torch.cat([p[3] for p in parts]) if parts else torch.zeros(0, 4),
                    "skipped": skipped,
                }
                atomic_write_bytes(_chunk_bytes(state), chunk_files[k])
    finally:
        model.train(was_training)

