"""The table of extractors (``cbir-train --list_models``, the README, the benchmark): what each one embeds.

Every model is built on PyTorch's ``meta`` device: shapes and parameter counts without allocating or initialising
a single weight, so the table costs seconds (mostly importing timm, transformers and byol-pytorch), not the
minutes that initialising VGG19's and the autoencoders' 100M+ weights would take.
"""

from __future__ import annotations

import torch

from cbir.models.extractor import DEFAULT_FEATURES, Extractor
from cbir.models.registry import BACKBONES


def _row(name: str, num_features: int) -> dict:
    spec = BACKBONES[name]
    row = {
        "name": name,
        "description": spec.description,
        "kind": spec.kind,
        "trains_itself": spec.trains_itself,
        "embedding_size": None,
        "input_size": spec.input_size,
        "parameters": None,
        "pretrained_source": spec.pretrained_source,
    }
    config = {"model": name, "num_features": num_features, "dr_model": False, "input_size": None,
              "pretrained": False, "class_names": []}
    try:
        with torch.device("meta"):
            extractor = Extractor(config, pretrained=False)
    except Exception:  # noqa: BLE001 — a model that cannot be built on meta still gets its row, without numbers
        return row
    row["embedding_size"] = extractor.embedding_size
    row["parameters"] = sum(p.numel() for p in extractor.parameters())
    return row


def describe_models(num_features: int = DEFAULT_FEATURES) -> list[dict]:
    """One row per registered extractor, in registry order, as a dict with the keys

    ``name``, ``description``, ``kind`` (cnn, transformer, autoencoder, self-supervised), ``trains_itself``,
    ``embedding_size`` (at this ``num_features``; the autoencoders and BYOL embed their own size),
    ``input_size`` (px, square), ``parameters`` (all weights the checkpoint holds, head included) and
    ``pretrained_source``. ``timm:<name>`` (any timm architecture) is a family, not a row.
    """
    return [_row(name, num_features) for name in BACKBONES]


def models_table(num_features: int = DEFAULT_FEATURES) -> str:
    """describe_models() as aligned text, plus the timm family line: each short name (the thesis's: ``conv``,
    ``vision``, ``auto``...) beside the architecture it stands for."""
    header = ("name", "what it is", "kind", "embedding", "input", "parameters", "pretrained weights")
    lines = [header]
    for row in describe_models(num_features):
        parameters = f"{row['parameters'] / 1e6:.1f}M" if row["parameters"] else "?"
        lines.append((row["name"], row["description"], row["kind"], str(row["embedding_size"] or "?"),
                      str(row["input_size"]), parameters, row["pretrained_source"]))
    lines.append(("timm:<name>", "any timm architecture", "timm", str(num_features), "model's", "model's",
                  "HF/torch cache, timm:local-dir:PATH, or --pretrained_weights"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(line, widths)), line[-1]]).rstrip()
                     for line in lines)
