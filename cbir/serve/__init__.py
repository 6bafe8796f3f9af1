"""cbir-serve: the retrieval service — an HTTP API, its OpenAPI page and a web page — over the same databases the
commands use.

A front, like ``cbir/cli``: it parses requests and calls the package (extractors, ``cbir.database``); nothing in the
package imports it. ``create_app(ServeConfig(...))`` builds the FastAPI application; ``cbir-serve`` runs it under
uvicorn.
"""

from .app import create_app
from .config import Limits, ServeConfig

__all__ = ["Limits", "ServeConfig", "create_app"]
