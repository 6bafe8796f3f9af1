"""The native REST API: databases, images by id, search (one image or a batch), add, remove."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile as StarletteUpload

from cbir.labels import project_of

from . import schemas
from .auth import can_read, can_write
from .engine import Hit
from .errors import BadInput, Unprocessable
from .images import decode_upload, stored_image, thumbnail

router = APIRouter(prefix="/api", tags=["cbir"])
ERRORS = {code: {"model": schemas.Message} for code in (400, 401, 403, 404, 409, 413, 422, 503)}


def service(request: Request):
    return request.app.state.service


def image_urls(request: Request, name: str, image_id: int) -> dict:
    base = f"{request.scope.get('root_path', '')}/api/databases/{quote(name, safe='')}/images/{image_id}"
    return {"image_url": base, "thumbnail_url": f"{base}/thumbnail"}


def stored(request: Request, name: str, image_id: int, path: str, class_name: str) -> dict:
    return {"id": image_id, "class": class_name, "project": project_of(class_name) if class_name else "",
            "name": path.rsplit("/", 1)[-1], **image_urls(request, name, image_id)}


def check_k(request: Request, k: int) -> int:
    most = request.app.state.config.limits.max_k
    if not 1 <= k <= most:
        raise BadInput(f"k must be between 1 and {most}, got {k}")
    return k


def check_count(request: Request, files: list[UploadFile]) -> None:
    most = request.app.state.config.limits.max_batch
    if not files:
        raise BadInput("no image in the request")
    if len(files) > most:
        raise BadInput(f"{len(files)} images in one request; this server takes at most {most}")


async def uploaded(uploads: list[UploadFile]) -> list[tuple[bytes, str | None]]:
    """(bytes, file name) of each upload, for ``decoded`` to decode off the event loop (async routes)."""
    return [(await upload.read(), upload.filename) for upload in uploads]


def decoded(request: Request, files: list[tuple[bytes, str | None]]) -> list:
    limits = request.app.state.config.limits
    return [decode_upload(data, filename, limits) for data, filename in files]


def decode(request: Request, upload: UploadFile):
    """The image and bytes of one upload, read where the route runs (plain routes: a worker thread already)."""
    data = upload.file.read()
    image, = decoded(request, [(data, upload.filename)])
    return image, data


async def off_loop(request: Request, work):
    """``work()`` run in the service's worker threads: the searches' routes are async and hand only their blocking
    part (decoding, the model, Redis) to a thread. FastAPI runs a plain route through AnyIO's worker threads, a
    hand-off that costs about a millisecond a request here against a fifth of that for asyncio's executor; on a
    15 ms search that was most of what the service added to the bare library."""
    return await asyncio.get_running_loop().run_in_executor(request.app.state.workers, work)


def neighbours(request: Request, name: str, hits: list[Hit], query_class: str | None) -> list[dict]:
    return [{**stored(request, name, h.id, h.path, h.class_name), "rank": h.rank, "distance": h.distance,
             "same_class": (h.class_name == query_class) if query_class else None} for h in hits]


@router.get("/databases", response_model=schemas.DatabaseList, dependencies=[Depends(can_read)], responses=ERRORS)
def list_databases(request: Request):
    """The databases this server can search (those of its home, or of its Redis server)."""
    return {"databases": service(request).pool.names(), "default": request.app.state.config.db_name}


@router.post("/databases", response_model=schemas.DatabaseName, status_code=201, dependencies=[Depends(can_write)],
             responses=ERRORS)
def create_database(request: Request, body: schemas.DatabaseName):
    """Create an empty database; images added to it are embedded by the server's extractor."""
    service(request).create(body.name)
    return {"name": body.name}


@router.get("/databases/{name}", response_model=schemas.DatabaseInfo, dependencies=[Depends(can_read)],
            responses=ERRORS)
def database_info(request: Request, name: str):
    """What a database holds: images per class and project, its extractor and index."""
    info = service(request).info(name)
    classes = [{"name": c, "project": project_of(c) if c else "", "images": n} for c, n in info["classes"].items()]
    projects = Counter()
    for entry in classes:
        projects[entry["project"]] += entry["images"]
    extractor = info["extractor"]
    return {**info, "classes": classes, "projects": dict(sorted(projects.items())),
            "extractor": {key: extractor.get(key) for key in ("name", "num_features", "input_size", "fingerprint")}
            if extractor else None}


@router.delete("/databases/{name}", response_model=schemas.DatabaseName, dependencies=[Depends(can_write)],
               responses=ERRORS)
def drop_database(request: Request, name: str):
    """Delete a database: its images, its index and the files this server stored for it."""
    service(request).drop(name)
    return {"name": name}


@router.get("/databases/{name}/images", response_model=schemas.Listing, dependencies=[Depends(can_read)],
            responses=ERRORS)
def list_images(request: Request, name: str, class_name: str | None = Query(None, alias="class"),
                offset: int = Query(0, ge=0), limit: int = Query(24, ge=1, le=500)):
    """Stored images by id, optionally of one class (the page's sample grid)."""
    items = service(request).items(name)
    if class_name is not None:
        items = [item for item in items if item[2] == class_name]
    return {"database": name, "total": len(items), "offset": offset,
            "images": [stored(request, name, *item) for item in items[offset:offset + limit]]}


@router.get("/databases/{name}/images/{image_id}", dependencies=[Depends(can_read)], responses=ERRORS,
            response_class=Response)
def get_image(request: Request, name: str, image_id: int):
    """The stored image itself, found by id in the database (never by a path a client sends)."""
    path, _ = service(request).entry(name, image_id)
    data, media_type = stored_image(path)
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})


@router.get("/databases/{name}/images/{image_id}/thumbnail", dependencies=[Depends(can_read)], responses=ERRORS,
            response_class=Response)
def get_thumbnail(request: Request, name: str, image_id: int):
    """A JPEG of the stored image, at most 256 px a side."""
    path, _ = service(request).entry(name, image_id)
    return Response(thumbnail(path), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.post("/databases/{name}/images", response_model=schemas.AddResult, dependencies=[Depends(can_write)],
             responses=ERRORS)
def add_images(request: Request, name: str, images: list[UploadFile] = File(description="one or more images"),
               label: str = Form("", description="their class, e.g. pbc_neutrophil (may be empty)")):
    """Add images with a class label. Each file is kept privately by the server and embedded by the database's
    extractor; the same file sent twice is stored once."""
    check_count(request, images)
    if len(label) > 200 or any(ch in label for ch in "\0\n\r/\\"):
        raise BadInput("label must be one line of at most 200 characters without '/' or '\\'")
    uploads = []
    for upload in images:
        image, data = decode(request, upload)
        uploads.append((image, data, upload.filename or "upload"))
    svc = service(request)
    added = svc.add(name, uploads, label)
    return {"database": name, "images": svc.count(name),
            "added": [{**stored(request, name, a.id, a.path, a.class_name), "new": a.new} for a in added]}


@router.delete("/databases/{name}/images/{image_id}", response_model=schemas.RemoveResult,
               dependencies=[Depends(can_write)], responses=ERRORS)
def remove_image(request: Request, name: str, image_id: int):
    """Remove an image by id (and its file, when this server stored it; a file indexed by cbir-index stays)."""
    svc = service(request)
    removed = svc.remove(name, [image_id])
    return {"database": name, "removed": removed, "images": svc.count(name)}


# The one-image search reads its form itself: FastAPI's declared File and Form parameters and the response model's
# validation cost about 0.1 ms a request here (README, "The service": Speed), of the 3-4 ms the whole service adds to
# a 15 ms search, whose goal (at most 1.25x the bare library) it meets by about as little. The form is still described
# at /docs (SEARCH_FORM) and still checked: each bad field gets a 422 with one line, as FastAPI would give.
SEARCH_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary", "description": "the query image"},
        "k": {"type": "integer", "default": 10, "description": "neighbours wanted"},
        "query_class": {"type": "string", "description": "the query's class, when known: marks each neighbour "
                                                         "same_class true or false"},
        "nprobe": {"type": "integer", "minimum": 1, "description": "inverted lists searched (approximate index "
                                                                   "only)"}}}}}}}


def form_number(form, field: str, default: int | None) -> int | None:
    value = form.get(field)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise Unprocessable(f"{field}: a whole number expected, got {str(value)[:40]!r}") from None


@router.post("/databases/{name}/search", response_model=schemas.SearchResult, dependencies=[Depends(can_read)],
             responses=ERRORS, openapi_extra=SEARCH_FORM)
async def search(request: Request, name: str):
    """The k stored images most similar to an uploaded one, nearest first."""
    started = time.perf_counter()
    async with request.form(max_files=1, max_fields=8) as form:
        image = form.get("image")
        if not isinstance(image, StarletteUpload):
            raise Unprocessable("image: the query image is missing (a multipart file field named 'image')")
        k = check_k(request, form_number(form, "k", 10))
        nprobe = form_number(form, "nprobe", None)
        if nprobe is not None and nprobe < 1:
            raise Unprocessable(f"nprobe: at least 1, got {nprobe}")
        query_class = form.get("query_class") or None  # a file under that name is refused above: one file only
        files = await uploaded([image])
    hits = (await off_loop(request, lambda: service(request).search(name, decoded(request, files), k,
                                                                    nprobe=nprobe)))[0]
    return JSONResponse({"database": name, "k": k, "filename": image.filename or "", "query_class": query_class,
                         "neighbours": neighbours(request, name, hits, query_class),
                         "seconds": time.perf_counter() - started})


@router.post("/databases/{name}/search/batch", response_model=schemas.BatchSearchResult,
             dependencies=[Depends(can_read)], responses=ERRORS)
async def search_batch(request: Request, name: str, images: list[UploadFile] = File(description="the query images"),
                       k: int = Form(10), nprobe: int | None = Form(None, ge=1)):
    """Several query images at once (embedded in one pass); one result per image, in the order sent."""
    started = time.perf_counter()
    check_k(request, k)
    check_count(request, images)
    files = await uploaded(images)
    found = await off_loop(request, lambda: service(request).search(name, decoded(request, files), k, nprobe=nprobe))
    seconds = time.perf_counter() - started
    return {"database": name, "k": k, "seconds": seconds, "results": [
        {"database": name, "k": k, "filename": upload.filename or "", "query_class": None,
         "neighbours": neighbours(request, name, hits, None), "seconds": seconds}
        for upload, hits in zip(images, found)]}
