"""One registry of feature extractors: a name → how to build its backbone and how to feed it.

Each entry carries its preprocessing (input size, mean, std), as timm's pretrained configs do, so that training,
indexing and search all prepare images the same way and nothing about a model is repeated on the command line.
A new extractor is one ``@register_backbone`` function.

A *family* (``timm:<name>``) is one resolver that turns the part after the prefix into an entry; what it resolved
(architecture, model arguments, preprocessing) is stored in the checkpoint, so a saved extractor rebuilds without
the folder or cache it first came from.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from cbir.data import IMAGENET_MEAN, IMAGENET_STD
from cbir.errors import CbirError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    # build(pretrained, weights_file, input_size) -> (module giving (B, F) features, F)
    build: Callable[..., tuple[nn.Module, int]]
    input_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    description: str = ""
    pretrained_source: str = ""
    kind: str = "cnn"
    # Trains with its own objective (module.training_loss) instead of a metric loss; embeds its own features
    # (no linear head): the autoencoders and BYOL.
    trains_itself: bool = False
    # The backbone never trains (KimiaNet: only the head learns).
    frozen: bool = False
    min_input_size: int = 32
    # What a family resolved for this name; stored in the checkpoint config as "backbone_config".
    extra: dict = field(default_factory=dict)

    def create(self, *, pretrained: bool, weights_file: str | None, input_size: int) -> tuple[nn.Module, int]:
        return self.build(pretrained=pretrained, weights_file=weights_file, input_size=input_size)


BACKBONES: dict[str, BackboneSpec] = {}
# prefix → resolve(rest_of_name, stored backbone_config or None) -> BackboneSpec
FAMILIES: dict[str, Callable[[str, dict | None], BackboneSpec]] = {}


def register_backbone(name: str, **spec):
    def decorator(build):
        BACKBONES[name] = BackboneSpec(name=name, build=build, **spec)
        return build

    return decorator


def register_family(prefix: str, resolve: Callable[[str, dict | None], BackboneSpec]) -> None:
    FAMILIES[prefix] = resolve


def get_backbone(name: str, stored: dict | None = None) -> BackboneSpec:
    """The registry entry for ``name``; ``stored`` is what a checkpoint recorded for a family member."""
    if name in BACKBONES:
        return BACKBONES[name]
    prefix, sep, rest = str(name).partition(":")
    if sep and prefix in FAMILIES:
        if not rest:
            raise CbirError(f"'{name}' names no model: write {prefix}:<model name>, e.g. timm:vit_base_patch16_224")
        return FAMILIES[prefix](rest, stored)
    families = "".join(f", or {p}:<name>" for p in FAMILIES)
    raise CbirError(f"unknown extractor '{name}'; choose one of: {', '.join(list_models())}{families}")


def check_model_name(name: str) -> str:
    """For argparse ``type=``: a registered name or a family member (``timm:<name>``), else argparse's error.

    ``choices=list_models()`` would refuse ``timm:<name>``; this accepts it (the family resolves it later).
    """
    prefix, sep, _ = name.partition(":")
    if name not in BACKBONES and not (sep and prefix in FAMILIES):
        families = "".join(f", or {p}:<name>" for p in FAMILIES)
        raise argparse.ArgumentTypeError(
            f"unknown extractor '{name}'; choose one of: {', '.join(list_models())}{families}")
    return name


def list_models() -> list[str]:
    return list(BACKBONES)
