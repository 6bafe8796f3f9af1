"""cbir: content-based image retrieval for biomedical images."""

__version__ = "0.1.0"
