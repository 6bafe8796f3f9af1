"""The routes of Cytomine's retrieval service (``Cytomine-ULiege/Cytomine-cbir``), same requests and answers, so
that platform can point at cbir-serve unchanged. A Cytomine *storage* is a cbir database; its images are kept by
the platform's file name, which is how it removes them.

Unlike the original: ids come from the database's atomic counter, the index is kept in memory (not re-read from
disk on every request), and the same token rules as the native API apply (``--auth none`` for a platform that
sends none).
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, File, Query, Request, UploadFile
from pydantic import BaseModel

from .api import ERRORS, check_k, decode, decoded, off_loop, service, uploaded
from .auth import can_read, can_write
from .engine import check_filename
from .errors import BadInput, Conflict, NotFound

router = APIRouter(prefix="/api", tags=["Cytomine compatibility"])


class StorageName(BaseModel):
    name: str


def existing_storage(request: Request, name: str) -> str:
    if name not in service(request).pool.names():
        raise NotFound(f"Storage with name '{name}' not found.")
    return name


@router.get("/storages", response_model=list[str], dependencies=[Depends(can_read)], responses=ERRORS)
def get_storages(request: Request):
    """Every storage (database) name."""
    return service(request).pool.names()


@router.post("/storages", dependencies=[Depends(can_write)], responses=ERRORS)
def create_storage(request: Request, body: StorageName | None = Body(None),
                   name: str | None = Query(None, description="older clients send the name here")):
    """Create a storage: JSON ``{"name": ...}`` (or ``?name=``)."""
    storage = body.name if body is not None else name
    if not storage:
        raise BadInput("the storage needs a name: send {\"name\": ...}")
    if storage in service(request).pool.names():
        raise Conflict(f"Storage with name '{storage}' already exists.")
    service(request).create(storage)
    return {"message": f"Created storage with name: {storage}"}


@router.get("/storages/{name}", dependencies=[Depends(can_read)], responses=ERRORS)
def get_storage(request: Request, name: str):
    return {"name": existing_storage(request, name)}


@router.delete("/storages/{name}", dependencies=[Depends(can_write)], responses=ERRORS)
def delete_storage(request: Request, name: str):
    """Delete a storage with its images and index."""
    service(request).drop(existing_storage(request, name))
    return {"message": f"Deleted storage with name: {name}"}


@router.post("/images", dependencies=[Depends(can_write)], responses=ERRORS)
def index_image(request: Request, image: UploadFile = File(), storage: str = Query(),
                index: str = Query("index", description="echoed back; a storage has one index")):
    """Index one image into a storage under its file name (409 when that name is there already)."""
    filename = check_filename(image.filename)
    existing_storage(request, storage)
    picture, data = decode(request, image)
    added = service(request).add(storage, [(picture, data, filename)], "", cytomine=True)
    return {"ids": [added[0].id], "storage": storage, "index": index}


@router.delete("/images/{filename}", dependencies=[Depends(can_write)], responses=ERRORS)
def remove_image(request: Request, filename: str, storage: str = Query(), index: str = Query("index")):
    """Remove an image indexed by ``POST /api/images``, by its file name."""
    check_filename(filename)
    existing_storage(request, storage)
    return {"id": service(request).remove_cytomine(storage, filename), "storage": storage, "index": index}


@router.post("/search", dependencies=[Depends(can_read)], responses=ERRORS)
async def search(request: Request, image: UploadFile = File(), nrt_neigh: int = Query(),
                 storage: list[str] = Query(description="repeat to search several storages at once"),
                 index: str = Query("index")):
    """The ``nrt_neigh`` nearest images over the storages named, as ``[file name, distance]`` pairs."""
    check_k(request, nrt_neigh)
    files = await uploaded([image])

    def work():
        query, = decoded(request, files)
        for name in storage:
            existing_storage(request, name)
        return service(request).search_many(storage, query, nrt_neigh)

    found = await off_loop(request, work)
    return {"query": image.filename, "storage": storage, "index": index,
            "similarities": [[hit.path.rsplit("/", 1)[-1], hit.distance] for _, hit in found]}
