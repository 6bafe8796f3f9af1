"""One registry of feature extractors: a name → how to build its backbone and how to feed it.

Each entry carries its preprocessing (input size, mean, std), as timm's pretrained configs do, so that training,
indexing and search all prepare images the same way and nothing about a model is repeated on the command line.
A new extractor is one ``@register_backbone`` function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from cbir.data import IMAGENET_MEAN, IMAGENET_STD
from cbir.errors import CbirError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[..., tuple[nn.Module, int]]  # build(pretrained, weights_file) -> (module giving (B, F) features, F)
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    description: str = ""
    pretrained_source: str = ""


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, **spec):
    def decorator(build):
        BACKBONES[name] = BackboneSpec(name=name, build=build, **spec)
        return build

    return decorator


def get_backbone(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise CbirError(f"unknown extractor '{name}'; choose one of: {', '.join(list_models())}") from None


def list_models() -> list[str]:
    return list(BACKBONES)
