"""Feature extractors: one registry, one extractor class, one checkpoint format."""

from cbir.models.backbones import POOLINGS
from cbir.models.extractor import (DEFAULT_FEATURES, MAX_FEATURES, TTA_COUNTS, Extractor, create_extractor,
                                   load_extractor, prefers_channels_last, read_checkpoint, save_extractor,
                                   stored_state, tta_count)
from cbir.models.registry import BACKBONES, check_model_name, get_backbone, list_models, register_backbone
from cbir.models.catalog import describe_models, models_table

__all__ = [
    "BACKBONES", "DEFAULT_FEATURES", "MAX_FEATURES", "POOLINGS", "TTA_COUNTS", "Extractor", "check_model_name",
    "create_extractor", "describe_models", "get_backbone", "list_models", "load_extractor", "models_table",
    "prefers_channels_last", "read_checkpoint", "register_backbone", "save_extractor", "stored_state",
    "tta_count",
]
