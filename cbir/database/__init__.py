"""The image database: Redis holds the truth (ids, paths, classes, vectors, extractor), FAISS the search index.

    from cbir.database import Database
    with Database.open("db", create=True) as db:
        db.set_extractor({"name": "densenet", "num_features": 128, "fingerprint": "..."})
        db.add(paths, classes, vectors)
        result = db.search(queries, k=10)

Without a Redis URL (``redis_url=`` or ``$CBIR_REDIS_URL``) each database runs its own embedded Redis, its data
in ``$CBIR_HOME/<name>/`` beside the FAISS index; nothing starts before ``Database.open``.
"""

from .core import Database, SearchResult, default_home, list_databases
from .errors import DatabaseError

__all__ = ["Database", "DatabaseError", "SearchResult", "default_home", "list_databases"]
