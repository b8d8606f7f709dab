"""The HTTP face of the app: a FastAPI application over a :class:`~fewsight.app.service.Labeller`.

Endpoints (JSON unless said; every error is ``{"error": "<one line>"}`` with status 400 for bad input,
404 for an unknown image or path, 422 for a malformed body):

=========================================  =============================================================
``GET /``, ``GET /static/{app.js,app.css}``  the page (files of the package; no CDN)
``GET /api/status``                        folders, classes, counts, the proposal run
``GET /api/images?offset=&limit=``         a page of the image list (id, name, size, boxes, proposals)
``GET /api/images/{id}``                   the image's bytes; ``/thumb``: a small JPEG
``GET|PUT /api/images/{id}/annotations``   the image's boxes; PUT replaces them (last write wins)
``GET /api/skipped``                       files left out, with the reason
``POST /api/enroll``                       enroll the drawn boxes' new classes
``POST /api/propose`` ``{"limit"?}``       start proposing in the background; ``GET``: progress;
                                           ``DELETE``: stop
``GET /api/proposals?min_score=&status=&image=&offset=&limit=``  stored proposals
``POST /api/proposals/{accept,reject}``    ``{"keys": [...]}`` or ``{"min_score": s}``
``POST /api/search``                       ``{"image", "box", "k"?}``: images most similar to a box
``POST /api/export`` ``{"format"}``        COCO / VOC / YOLO / CSV under ``<project>/exports/<format>``
=========================================  =============================================================

Images are reached only by their id in the listing, and static files only by name from a fixed
set, so no request reaches another file (no path traversal).
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from fewsight._io import short_repr
from fewsight.app.images import ImageInfo
from fewsight.app.service import Labeller
from fewsight.errors import FewsightError

__all__ = ["create_app"]

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "app.css": "text/css; charset=utf-8"}
MAX_PAGE = 1000

Finite = Annotated[float, Field(allow_inf_nan=False)]


class BoxIn(BaseModel):
    """One box of a PUT: pixels ``[x1, y1, x2, y2]`` and a class name (provenance kept when sent back)."""

    model_config = ConfigDict(extra="ignore")
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)]
    label: str
    source: Literal["drawn", "proposal"] = "drawn"
    score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    proposal: str | None = None


class BoxesIn(BaseModel):
    boxes: list[BoxIn]


class ProposeIn(BaseModel):
    limit: Annotated[int, Field(ge=1)] | None = None


class DecideIn(BaseModel):
    keys: list[str] | None = None
    min_score: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None


class SearchIn(BaseModel):
    image: int
    box: Annotated[list[Finite], Field(min_length=4, max_length=4)]
    k: Annotated[int, Field(ge=1, le=500)] = 12


class ExportIn(BaseModel):
    format: str


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}, got {short_repr(err.get('input'))}")
    return "; ".join(parts)


def create_app(images_dir: str | Path, checkpoint: str | Path, project_dir: str | Path,
               embedder: str | Path | None = None, **options: Any) -> FastAPI:
    """The app for ``images_dir`` with the DLDENet ``checkpoint``, state in ``project_dir``.

    ``options`` go to :class:`~fewsight.app.service.Labeller` (``resume``, ``search_score_threshold``,
    ``annotations``, ``device``). A checkpoint of another kind, an unreadable project file or a missing
    folder raises a :class:`~fewsight.errors.FewsightError` here, before any request.
    """
    labeller = Labeller(images_dir, checkpoint, project_dir, embedder, **options)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        labeller.shutdown()  # the run resumes when the next server starts on this project

    app = FastAPI(title="fewsight app", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.labeller = labeller

    @app.exception_handler(FewsightError)
    async def _bad_input(_: Request, exc: FewsightError) -> JSONResponse:
        return _error(400, " ".join(str(exc).split()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _malformed(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    def image(image_id: str) -> ImageInfo:
        try:
            return labeller.folder.get(image_id)
        except KeyError as exc:
            raise HTTPException(404, exc.args[0]) from None

    # -- the page ------------------------------------------------------------------------------------
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, f"static: expected one of {sorted(STATIC)}, got {name[:80]!r}")
        data = importlib.resources.files("fewsight.app").joinpath("static", name).read_bytes()
        return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    app.get("/", include_in_schema=False)(lambda: static("index.html"))
    app.get("/static/{name}", include_in_schema=False)(static)

    # -- images and annotations ----------------------------------------------------------------------
    @app.get("/api/status")
    def status() -> dict[str, Any]:
        return labeller.status()

    @app.get("/api/images")
    def images(offset: Annotated[int, Query(ge=0)] = 0,
               limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
        counts = labeller.annotations.counts()
        page = []
        for info in labeller.folder.images[offset : offset + limit]:
            pending = sum(p["status"] == "pending" for p in labeller.store.items(info.name))
            page.append({**info.as_json(), "boxes": counts.get(info.name, 0), "pending": pending,
                         "skipped": labeller.folder.is_skipped(info.name)})
        return {"total": len(labeller.folder), "offset": offset, "images": page,
                "skipped": len(labeller.folder.skipped)}

    @app.get("/api/skipped")
    def skipped() -> dict[str, Any]:
        return {"skipped": labeller.folder.skipped}

    @app.get("/api/images/{image_id}")
    def image_bytes(image_id: str) -> Response:
        what, kind = labeller.folder.browser_bytes(image(image_id))
        if isinstance(what, Path):
            return FileResponse(what, media_type=kind)
        return Response(what, media_type=kind)

    @app.get("/api/images/{image_id}/thumb")
    def thumb(image_id: str) -> Response:
        return Response(labeller.folder.thumbnail(image(image_id)), media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/images/{image_id}/annotations")
    def get_annotations(image_id: str) -> dict[str, Any]:
        info = image(image_id)
        return {"image": info.as_json(), "boxes": labeller.annotations.boxes(info.name),
                "proposals": labeller.store.items(info.name)}

    @app.put("/api/images/{image_id}/annotations")
    def put_annotations(image_id: str, body: BoxesIn) -> dict[str, Any]:
        info = image(image_id)
        stored = labeller.annotations.set_boxes(info.name, info.size, [b.model_dump(exclude_none=True)
                                                                       for b in body.boxes])
        return {"image": info.as_json(), "boxes": stored, "classes": list(labeller.annotations.classes)}

    # -- enroll, propose, decide ---------------------------------------------------------------------
    @app.post("/api/enroll")
    def enroll() -> dict[str, Any]:
        return labeller.enroll()

    @app.post("/api/propose")
    def propose(body: ProposeIn | None = None) -> dict[str, Any]:
        return labeller.propose(None if body is None else body.limit)

    @app.get("/api/propose")
    def progress() -> dict[str, Any]:
        return labeller.progress()

    @app.delete("/api/propose")
    def stop() -> dict[str, Any]:
        return labeller.stop()

    @app.get("/api/proposals")
    def proposals(min_score: Annotated[float, Query(ge=0, le=1, allow_inf_nan=False)] = 0.0,
                  status: Literal["pending", "accepted", "rejected"] | None = None,
                  image_id: Annotated[str | None, Query(alias="image")] = None,
                  offset: Annotated[int, Query(ge=0)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 200) -> dict[str, Any]:
        info = None if image_id is None else image(image_id)
        return labeller.proposals(image=info, min_score=min_score, status=status, offset=offset, limit=limit)

    @app.post("/api/proposals/{decision}")
    def decide(decision: Literal["accept", "reject"], body: DecideIn) -> dict[str, Any]:
        return labeller.decide(decision, body.keys, body.min_score)

    # -- search and export ---------------------------------------------------------------------------
    @app.post("/api/search")
    def search(body: SearchIn) -> dict[str, Any]:
        return labeller.search(image(str(body.image)), body.box, body.k)

    @app.post("/api/export")
    def export(body: ExportIn) -> dict[str, Any]:
        return labeller.export(body.format)

    return app
