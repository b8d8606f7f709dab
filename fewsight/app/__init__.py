"""fewsight.app: assisted labelling in the browser (``fewsight app``).

A local web server (FastAPI + uvicorn, the ``app`` extra: ``pip install "fewsight[app]"``) and one
page served from the package: draw boxes on a folder's images, enroll their classes into a DLDENet,
let it propose boxes on the whole folder, accept or reject them, search by example, export as COCO,
VOC, YOLO or CSV. Everything lives in a project folder written after every change.

* :mod:`~fewsight.app.images` — the image folder (ids, thumbnails, unreadable files listed and skipped);
* :mod:`~fewsight.app.project` — the annotations file (atomic, last write wins per image);
* :mod:`~fewsight.app.proposals` / :mod:`~fewsight.app.propose` — proposals in chunks, the background run;
* :mod:`~fewsight.app.service` — the operations (:class:`Labeller`);
* :mod:`~fewsight.app.server` — the HTTP endpoints (:func:`create_app`) and ``static/`` the page.
"""

from fewsight.app.service import Labeller

__all__ = ["Labeller", "create_app"]


def create_app(*args, **kwargs):  # type: ignore[no-untyped-def]
    """:func:`fewsight.app.server.create_app` (imported on use: FastAPI is an optional dependency)."""
    from fewsight.app.server import create_app as create

    return create(*args, **kwargs)
