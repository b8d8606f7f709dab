"""``fewsight search``: index the objects of images, query by an example crop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fewsight.cli.common import check_float, flag_errors, image_files, load_dldenet, output_dir, output_file

NAME = "search"


def add_parser(sub: Any) -> None:
    se = sub.add_parser(
        NAME,
        help="object search: index the objects of images, query by an example crop",
        description="Object search with a DLDENet's embeddings and a faiss index (needs fewsight[retrieval]). "
        "`search index` detects the objects of a set of images and stores their embeddings; `search query` "
        "finds the objects most like an example crop (or a box of an image).",
    )
    ssub = se.add_subparsers(dest="search", required=True, metavar="ACTION")
    si = ssub.add_parser("index", help="build a gallery from the objects detected in images",
                         description="Detect objects in images and write OUT/gallery.pt (faiss index + labels, "
                         "image ids, boxes) and OUT/images.json (the image paths). Images stream through in batches; "
                         "the objects are written to OUT/chunks/ as they are done, so a killed run started again "
                         "with the same inputs resumes where it stopped (--restart discards them); OUT/chunks/ is "
                         "removed once the gallery is written.")
    si.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    si.add_argument("images", nargs="+", help="image files or folders")
    si.add_argument("--out", default="runs/gallery", help="output folder (default: runs/gallery)")
    si.add_argument("--score-threshold", type=float, default=0.3, help="index detections at least this score (0.3)")
    si.add_argument("--batch-size", type=int, default=8)
    si.add_argument("--embedder", help="embed the detected objects' crops with this crop embedder file (its whitening "
                    "applied) instead of the detector's embedding")
    si.add_argument("--chunk-images", type=int, metavar="N",
                    help="write the objects of every N images to OUT/chunks/ as they are done (a multiple of "
                    "--batch-size; default: the multiple nearest 256); a killed run started again with the same "
                    "inputs resumes from them")
    si.add_argument("--restart", action="store_true",
                    help="discard the chunks of an interrupted run in OUT/chunks/ instead of resuming")
    si.add_argument("--workers", type=int, default=0, metavar="N", help="processes decoding images (default 0: none)")
    si.add_argument("--skip-corrupt", action="store_true",
                    help="leave out unreadable images (listed, and in OUT/images.json) instead of stopping")
    si.add_argument("--quiet", action="store_true", help="no progress bar")
    si.add_argument("--backend", choices=("faiss", "milvus"), default="faiss",
                    help="where the vectors live: faiss (embedded, default; the index in its own file beside "
                    "gallery.pt, memory-mapped by `search query`) or a Milvus collection (needs fewsight[milvus])")
    si.add_argument("--index", metavar="SPEC",
                    help="faiss index factory string (default Flat: exact; e.g. HNSW32, IVF4096,PQ32x8,RFlat) or "
                    "Milvus index type (default FLAT)")
    si.add_argument("--uri", help="Milvus: a local .db file (default OUT/gallery.db, embedded milvus-lite) or a "
                    "server, http://host:19530 (token from the environment variable FEWSIGHT_MILVUS_TOKEN)")
    sq = ssub.add_parser("query", help="find the gallery objects most like an example",
                         description="Embed an example object (a crop, or --box of an image) and print the k most "
                         "similar gallery objects (cosine); with --out, also OUT/results.json and OUT/results.png.")
    sq.add_argument("--checkpoint", required=True, help="the DLDENet the gallery was built with")
    sq.add_argument("--gallery", required=True, help="a folder from `search index` (or its gallery.pt)")
    sq.add_argument("--image", required=True, help="the example: a crop of the object, or an image with --box")
    sq.add_argument("--box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="the object's box in --image")
    sq.add_argument("--k", type=int, default=10, help="results (default 10)")
    sq.add_argument("--out", help="folder for results.json and results.png")
    sq.add_argument("--embedder", help="the crop embedder the gallery was built with (search index --embedder)")
    sq.add_argument("--csls", action="store_true",
                    help="rank by CSLS with the gallery itself as the reference sample: demotes gallery items that are "
                    "close to everything (hubs)")


def _gallery_paths(path: str) -> tuple[Path, Path]:
    p = Path(path)
    folder = p if p.is_dir() or p.suffix == "" else p.parent
    return (folder / "gallery.pt" if p.is_dir() or p.suffix == "" else p), folder / "images.json"


def _embedder(path: str | None) -> Any:
    if path is None:
        return None
    from fewsight.fewshot import CropEmbedder
    from fewsight.hub import load_model

    return load_model(path, expect=CropEmbedder)


def run(args: argparse.Namespace) -> int:
    if args.search == "index":
        check_float("--score-threshold", args.score_threshold, low=0.0, high=1.0)
        files = image_files(args.images)
        gallery_file, images_file = _gallery_paths(args.out)
        inputs = [args.checkpoint, args.embedder, *args.images, *files]
        output_dir(images_file.parent, inputs)
        output_file(gallery_file, inputs)
        output_file(images_file, inputs)
        # Clearing the chunks folder deletes *.pt files there: never the checkpoint's or embedder's folder.
        model_folders = [Path(p).parent for p in (args.checkpoint, args.embedder) if p is not None]
        output_dir(_chunk_dir(args.out), [*inputs, *model_folders])
    else:
        if args.k < 1:
            from fewsight.errors import InvalidArgumentError

            raise InvalidArgumentError(f"--k: expected an int >= 1, got {args.k}")
        for v in args.box or ():
            check_float("--box", v)
        if args.out is not None:
            gallery_file, images_file = _gallery_paths(args.gallery)
            output_dir(args.out, [args.checkpoint, args.embedder, args.gallery, gallery_file, images_file, args.image],
                       names=["results.json", "results.png"])
    model = load_dldenet(args.checkpoint)
    if args.search == "index":
        return _index(args, model, _embedder(args.embedder))
    return _query(args, model, _embedder(args.embedder))


def _chunk_dir(out: str) -> Path:
    return _gallery_paths(out)[1].parent / "chunks"


def _gallery_factory(args: argparse.Namespace) -> Any:
    """``(dim, class_names) -> Gallery``: the one place ``search index`` makes its gallery."""
    import os

    from fewsight.retrieval import Gallery, make_backend

    options: dict[str, Any] = {}
    uri = args.uri
    if args.backend == "milvus":
        uri = uri or str(_gallery_paths(args.out)[1].parent / "gallery.db")
        # Not a flag: a token on the command line is visible to every user of the machine.
        if os.environ.get("FEWSIGHT_MILVUS_TOKEN"):
            options["token"] = os.environ["FEWSIGHT_MILVUS_TOKEN"]

    def make(dim: int, class_names: list[str]) -> Any:
        return Gallery(dim, class_names=class_names, backend=make_backend(args.backend, index=args.index, uri=uri, **options))

    return make


def _index(args: argparse.Namespace, model: Any, embedder: Any) -> int:
    from fewsight.data import load_image
    from fewsight.errors import DataError
    from fewsight.eval import write_json
    from fewsight.retrieval.indexing import clear_chunks, index_files

    files = image_files(args.images)
    gallery_file, images_file = _gallery_paths(args.out)
    chunk_dir = _chunk_dir(args.out)
    try:
        with flag_errors("--batch-size", "batch_size"), flag_errors("--chunk-images", "chunk_images"), \
                flag_errors("--workers", "num_workers"):
            run = index_files(model, files, chunk_dir, load_image=load_image, batch_size=args.batch_size,
                              score_threshold=args.score_threshold, embedder=embedder, chunk_images=args.chunk_images,
                              num_workers=args.workers, on_error="skip" if args.skip_corrupt else "raise",
                              restart=args.restart, progress=not args.quiet, log=print,
                              gallery_factory=_gallery_factory(args))
    except DataError as exc:
        if exc.path.parent == chunk_dir:  # the chunks of other inputs: the library names restart=True
            raise DataError(exc.path, exc.reason.replace("pass restart=True", "pass --restart")) from None
        raise
    gallery = run.gallery
    # faiss: the index in a file of its own beside gallery.pt, which `search query` memory-maps.
    gallery.save(gallery_file.parent if args.backend == "faiss" else gallery_file,
                 layout="folder" if args.backend == "faiss" else "file")
    skipped = [str(f) for f, _ in run.skipped]
    write_json({"images": [str(f) for f in files], "embedder": args.embedder, "skipped": skipped}, images_file)
    clear_chunks(chunk_dir)  # the gallery holds them now; a rerun starts afresh
    print(f"indexed {len(gallery)} object(s) from {len(files) - len(skipped)} image(s); wrote {gallery_file}"
          + (f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""))
    return 0


def _read_images_json(path: Path) -> dict[str, Any]:
    """The image list ``search index`` wrote beside the gallery (``{}`` when absent)."""
    from fewsight.errors import DataError

    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(path, f"expected the JSON that `fewsight search index` writes, got unreadable text ({exc})") from None
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not (images is None or (isinstance(images, list)
                                                              and all(isinstance(p, str) for p in images))):
        got = type(info).__name__ if not isinstance(info, dict) else f"'images' of {images!r:.60}"
        raise DataError(path, f'expected a JSON object {{"images": [image paths], "embedder": ...}}, got {got}')
    return info


def _crop(image: Any, box: Any) -> Any:
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    return image[:, max(y1, 0) : max(y2, y1 + 1), max(x1, 0) : max(x2, x1 + 1)]


def _query(args: argparse.Namespace, model: Any, embedder: Any) -> int:
    import torch

    from fewsight.data import load_image
    from fewsight.errors import DataError
    from fewsight.eval import plot_search_results, write_json
    from fewsight.retrieval import Gallery, embed_crop

    gallery_file, images_file = _gallery_paths(args.gallery)
    # A gallery whose faiss index has a file of its own is memory-mapped, not read into memory.
    gallery = Gallery.load(gallery_file, mmap="auto")
    info = _read_images_json(images_file)
    paths = info.get("images")
    if bool(info.get("embedder")) != (embedder is not None):
        built = f"with the crop embedder {info['embedder']}" if info.get("embedder") else "with the detector's embedding"
        raise DataError(gallery_file, f"the gallery was built {built}; query it the same way (--embedder)")
    query_image = load_image(args.image)
    box = torch.tensor(args.box, dtype=torch.float32) if args.box else None
    if box is not None and not (box[2] > box[0] and box[3] > box[1]):
        raise DataError(args.image, f"--box: expected x1 < x2 and y1 < y2, got {args.box}")
    query = embed_crop(model, query_image, box=box, embedder=embedder)
    if not bool(query.norm() > 0):
        raise DataError(args.image, f"--box {args.box}: the query object matches no anchor of the detector (is the box inside the image?)")
    if gallery.dim is not None and query.shape[0] != gallery.dim:
        raise DataError(gallery_file, f"the gallery holds {gallery.dim}-D embeddings, the model gives {query.shape[0]}-D")
    reference = gallery.embeddings() if args.csls and len(gallery) else None
    # At most every gallery item: a huge --k allocates nothing more.
    found = gallery.search(query[None], k=max(1, min(args.k, len(gallery))), csls_reference=reference)
    rows = []
    names = list(model.classes)
    for rank, (i, score) in enumerate(zip(found.indices[0].tolist(), found.scores[0].tolist()), start=1):
        if i < 0:
            break
        image_id = int(found.image_ids[0, rank - 1])
        if paths and not 0 <= image_id < len(paths):
            raise DataError(images_file, f"expected an image path for each image id of {gallery_file}, got "
                            f"{len(paths)} path(s) and image id {image_id}")
        label = int(found.labels[0, rank - 1])
        row = {"rank": rank, "score": round(score, 4), "image": paths[image_id] if paths else image_id,
               "box": [round(v, 1) for v in found.boxes[0, rank - 1].tolist()],
               "label": names[label] if 0 <= label < len(names) else None}
        rows.append(row)
        print(f"{rank:3d}  {row['score']:.4f}  {row['image']}  box {row['box']}  ({row['label']})")
    if not rows:
        print("the gallery is empty")
    if args.out:
        out = Path(args.out)
        write_json({"query": args.image, "box": args.box, "results": rows}, out / "results.json")
        if rows and paths:
            cache: dict[str, Any] = {}
            crops = [(f"#{r['rank']} {r['score']:.2f}", _crop(cache.setdefault(r["image"], load_image(r["image"])),
                                                             r["box"])) for r in rows]
            plot_search_results(_crop(query_image, box) if box is not None else query_image, crops,
                                out / "results.png")
        print(f"wrote {out / 'results.json'}")
    return 0
