"""Feature extractors: one registry, one extractor class, one checkpoint format."""

from cbir.models.extractor import Extractor, create_extractor, load_extractor, read_checkpoint, save_extractor
from cbir.models.registry import BACKBONES, get_backbone, list_models, register_backbone

__all__ = [
    "BACKBONES", "Extractor", "create_extractor", "get_backbone", "list_models", "load_extractor", "read_checkpoint",
    "register_backbone", "save_extractor",
]
