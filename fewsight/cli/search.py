"""``fewsight search``: index the objects of images, query by an example crop."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fewsight.cli.common import check_float, image_files, load_dldenet, output_dir, output_file

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
                         "image ids, boxes) and OUT/images.json (the image paths).")
    si.add_argument("--checkpoint", required=True, help="a DLDENet model.pt (or .ckpt)")
    si.add_argument("images", nargs="+", help="image files or folders")
    si.add_argument("--out", default="runs/gallery", help="output folder (default: runs/gallery)")
    si.add_argument("--score-threshold", type=float, default=0.3, help="index detections at least this score (0.3)")
    si.add_argument("--batch-size", type=int, default=8)
    si.add_argument("--embedder", help="embed the detected objects' crops with this crop embedder file (its whitening "
                    "applied) instead of the detector's embedding")
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


def _index(args: argparse.Namespace, model: Any, embedder: Any) -> int:
    from fewsight.data import load_image
    from fewsight.eval import write_json
    from fewsight.retrieval import index_images

    files = image_files(args.images)
    images = [load_image(f) for f in files]  # DataError naming a corrupt file, before any work
    gallery = index_images(model, images, score_threshold=args.score_threshold, batch_size=args.batch_size,
                           embedder=embedder)
    gallery_file, images_file = _gallery_paths(args.out)
    gallery.save(gallery_file)
    write_json({"images": [str(f) for f in files], "embedder": args.embedder}, images_file)
    print(f"indexed {len(gallery)} object(s) from {len(files)} image(s); wrote {gallery_file}")
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
    gallery = Gallery.load(gallery_file)
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
