"""``fewsight app``: assisted labelling in the browser (a local web server; see :mod:`fewsight.app`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

NAME = "app"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        NAME,
        help="label a folder of images in the browser: draw, enroll, accept proposals, search, export",
        description="Serve a page (http://HOST:PORT/) to draw boxes on the images of a folder, enroll their classes "
        "into a DLDENet, review the detector's proposals over the folder, search by a drawn box, and export COCO / "
        "VOC / YOLO / CSV. State lives in the project folder, written after every change: stopping the server or "
        "closing the browser loses nothing, and a proposal run resumes when the server starts again.",
    )
    p.add_argument("--images", required=True, help="the folder of images to label (read only)")
    p.add_argument("--checkpoint", required=True, help="a DLDENet model file (model.pt from training)")
    p.add_argument("--embedder", metavar="FILE", help="a crop embedder file: enroll with the crop stage and search "
                   "with crop embeddings")
    p.add_argument("--project", help="the project folder (default: IMAGES.fewsight beside the image folder)")
    p.add_argument("--annotations", metavar="PATH", help="start a new project with the boxes of this dataset (a COCO "
                   ".json, a CSV file, a VOC or YOLO folder, e.g. an earlier export), matched by image file name")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", help="torch device of the networks (default cpu)")


def run(args: argparse.Namespace) -> int:
    from fewsight.cli.common import parse_device
    from fewsight.errors import InvalidArgumentError, MissingDependencyError

    if not 0 < args.port < 65536:
        raise InvalidArgumentError(f"--port: expected a port in 1..65535, got {args.port}")
    try:
        import uvicorn

        from fewsight.app.server import create_app
    except ImportError as exc:
        raise MissingDependencyError(f"fewsight app: needs the app extra (pip install \"fewsight[app]\"), "
                                     f"missing {exc.name}") from None
    images = Path(args.images)
    project = Path(args.project) if args.project else images.resolve().parent / f"{images.resolve().name}.fewsight"
    app = create_app(images, args.checkpoint, project, args.embedder, annotations=args.annotations,
                     device=parse_device(args.device))
    status = app.state.labeller.status()
    print(f"{status['images']} image(s) in {images} ({status['skipped']} skipped), project {project}")
    print(f"open http://{args.host}:{args.port}/ (Ctrl-C stops the server; nothing is lost)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
