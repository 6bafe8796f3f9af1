"""Request and response shapes, declared once: validation and the OpenAPI page (/docs) follow from them."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    detail: str = Field(description="one line saying what went wrong")


class Health(BaseModel):
    status: str
    database: str = Field(description="the database the page opens on")
    extractor: str
    writes: bool = Field(description="whether this server accepts writes (it has a token, or --auth none)")
    auth: str


class StoredImage(BaseModel):
    model_config = ConfigDict(populate_by_name=True)  # answers use the alias: FastAPI serialises by alias

    id: int
    class_name: str = Field(alias="class")
    project: str
    name: str = Field(description="the file name (never the stored path)")
    image_url: str
    thumbnail_url: str


class Neighbour(StoredImage):
    rank: int
    distance: float = Field(description="squared L2 distance of the unit vectors, 2 - 2 cos: 0 = identical")
    same_class: bool | None = Field(description="whether the neighbour has the query's class, when that is known")


class SearchResult(BaseModel):
    database: str
    k: int
    filename: str
    query_class: str | None
    neighbours: list[Neighbour]
    seconds: float = Field(description="time the server spent on this request")


class BatchSearchResult(BaseModel):
    database: str
    k: int
    results: list[SearchResult]
    seconds: float


class AddedImage(StoredImage):
    new: bool = Field(description="false when the same file was stored already (nothing is stored twice)")


class AddResult(BaseModel):
    database: str
    added: list[AddedImage]
    images: int = Field(description="images in the database now")


class RemoveResult(BaseModel):
    database: str
    removed: list[int]
    images: int


class Listing(BaseModel):
    database: str
    total: int
    offset: int
    images: list[StoredImage]


class DatabaseList(BaseModel):
    databases: list[str]
    default: str


class DatabaseName(BaseModel):
    name: str


class ExtractorInfo(BaseModel):
    name: str
    num_features: int
    input_size: int | None = None
    fingerprint: str


class ClassCount(BaseModel):
    name: str
    project: str = Field(description="the class name less its last _segment (and a trailing _<digits>)")
    images: int


class DatabaseInfo(BaseModel):
    name: str
    images: int
    classes: list[ClassCount] = Field(description="images per class, by class name")
    projects: dict[str, int] = Field(description="images per project")
    extractor: ExtractorInfo | None
    index: str = Field(description="FAISS index: Flat is exact search")
    dim: int | None
    bytes_on_disk: int
    created: str | None
