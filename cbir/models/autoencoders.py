"""Autoencoders that learn their own features by reconstructing their input: VAE, contractive, convolutional.

Inputs and targets are images in [0, 1] (their registry entries set mean 0, std 1) and every decoder ends in a
sigmoid, so reconstruction targets and outputs live in the same range. The thesis fed ImageNet-normalised
targets to sigmoid outputs, which no decoder can match.

Each module's ``forward`` gives the embedding (VAE: the mean μ, deterministic; contractive: the 128-d bottleneck;
convolutional: the flattened encoder output), ``training_loss(images)`` its own objective and
``reconstruct(images)`` the decoded images in [0, 1].
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from cbir.errors import CbirError
from cbir.models.registry import register_backbone
from cbir.models.weights import Normalize, load_checked, torchvision_weights

IN_01 = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
FROM_SCRATCH = "none (trains from scratch)"

# Weight of the contractive penalty beside the mean squared error. The thesis weighted it 100 against the
# per-image *sum* of squared errors over 224×224×3 values, i.e. about 7e-4 against the mean; we keep that ratio.
CONTRACTIVE_WEIGHT = 1e-3


class VAE(nn.Module):
    """Fully connected VAE (Kingma & Welling; PyTorch's example): pixels → 400 → 20-d latent → 400 → pixels."""

    def __init__(self, input_size: int, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.input_size = input_size
        pixels = 3 * input_size * input_size
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU(inplace=True))
        self.mu = nn.Linear(hidden, latent)
        self.logvar = nn.Linear(hidden, latent)
        # Logits out: the sigmoid is applied in reconstruct() and, fused, inside the loss (stable, autocast-safe).
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, pixels))

    def encode(self, x):
        hidden = self.encoder(x)
        return self.mu(hidden), self.logvar(hidden)

    def forward(self, x):
        return self.encode(x)[0]  # μ: the same vector for the same image, unlike a sample of the posterior

    def _logits(self, z):
        return self.decoder(z).view(-1, 3, self.input_size, self.input_size)

    def reconstruct(self, x):
        return torch.sigmoid(self._logits(self.encode(x)[0]))

    def training_loss(self, x):
        x = x.clamp(0, 1)
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        # Summed over pixels and latent units as in the paper, averaged over the batch so the scale does not
        # follow --batch_size.
        bce = F.binary_cross_entropy_with_logits(self._logits(z), x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (bce + kl) / len(x)


class ContractiveAutoencoder(nn.Module):
    """Fully connected contractive autoencoder (Rifai et al. 2011),
    pixels → 512 → 256 → 128 → 256 → 512 → pixels.

    The penalty is the squared Frobenius norm of the bottleneck layer's Jacobian, in closed form for its sigmoid
    units: Σ_j (h_j (1 − h_j))² Σ_i W_ji². (The thesis used that formula on ReLU units, where it is not the
    derivative.)
    """

    def __init__(self, input_size: int, bottleneck: int = 128):
        super().__init__()
        self.input_size = input_size
        pixels = 3 * input_size * input_size
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 512), nn.ReLU(inplace=True),
                                     nn.Linear(512, 256), nn.ReLU(inplace=True))
        self.bottleneck = nn.Linear(256, bottleneck)
        self.decoder = nn.Sequential(nn.Linear(bottleneck, 256), nn.ReLU(inplace=True),
                                     nn.Linear(256, 512), nn.ReLU(inplace=True), nn.Linear(512, pixels))

    def forward(self, x):
        return torch.sigmoid(self.bottleneck(self.encoder(x)))

    def _decode(self, h):
        return torch.sigmoid(self.decoder(h)).view(-1, 3, self.input_size, self.input_size)

    def reconstruct(self, x):
        return self._decode(self(x))

    def training_loss(self, x):
        x = x.clamp(0, 1)
        h = self(x)
        mse = F.mse_loss(self._decode(h), x)
        slope = h * (1 - h)
        penalty = (slope.pow(2) @ self.bottleneck.weight.pow(2).sum(1)).mean()
        return mse + CONTRACTIVE_WEIGHT * penalty


def _decoder(in_channels: int, convs_per_stage: tuple[int, ...], widths=(512, 256, 128, 64, 32)) -> nn.Sequential:
    """Five ×2 upsampling stages mirroring a /32 encoder, then 3 channels through a sigmoid."""
    layers, channels = [], in_channels
    for width, convs in zip(widths, convs_per_stage):
        layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
        for _ in range(convs):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
    layers += [nn.Conv2d(channels, 3, 3, padding=1), nn.Sigmoid()]
    return nn.Sequential(*layers)


class ConvAutoencoder(nn.Module):
    """A torchvision CNN's convolutional trunk as encoder (512 × s/32 × s/32), a mirrored upsampling decoder.

    The encoder normalises its [0, 1] input with the ImageNet statistics itself, so ImageNet weights can
    initialise it while the reconstruction target stays the raw image.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.normalize = Normalize()
        self.encoder = encoder
        self.decoder = decoder

    def encode(self, x):
        return self.encoder(self.normalize(x))

    def forward(self, x):
        return torch.flatten(self.encode(x), 1)

    def reconstruct(self, x):
        return self.decoder(self.encode(x))

    def training_loss(self, x):
        x = x.clamp(0, 1)
        return F.mse_loss(self.reconstruct(x), x)


def _check_multiple_of_32(name: str, input_size: int) -> None:
    if input_size % 32:
        raise CbirError(f"'{name}' halves the image five times and mirrors it back: --input_size must be a multiple "
                        f"of 32, not {input_size}")


def _conv_autoencoder(name: str, input_size: int, pretrained: bool, weights_file: str | None):
    _check_multiple_of_32(name, input_size)
    arch, weights_enum, convs = {
        "vgg16": (torchvision.models.vgg16, torchvision.models.VGG16_Weights.IMAGENET1K_V1, (3, 3, 3, 2, 2)),
        "vgg11": (torchvision.models.vgg11, torchvision.models.VGG11_Weights.IMAGENET1K_V1, (2, 2, 2, 1, 1)),
        "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, (2, 2, 2, 2, 1)),
        "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V2, (2, 2, 2, 2, 1)),
    }[name]
    # The encoder starts from ImageNet: the full classifier's weights load, then only its trunk is kept.
    state = torchvision_weights(weights_enum, name, weights_file) if pretrained else None
    model = arch(weights=None)
    if state is not None:
        load_checked(model, state, weights_file or "the torch-cache checkpoint", f"torchvision {name}")
    if name.startswith("vgg"):
        encoder = model.features  # 512 × s/32 × s/32 after the fifth pooling
    else:
        trunk = [model.conv1, model.bn1, model.relu, model.maxpool,
                 model.layer1, model.layer2, model.layer3, model.layer4]
        if name == "resnet50":
            # ResNet50's trunk ends in 2048 channels (100,352 values at 224 px); a 1×1 convolution brings it to the
            # 512 × 7 × 7 = 25,088-d code of the other autoencoders, a size a FAISS index can hold.
            trunk += [nn.Conv2d(2048, 512, 1, bias=False), nn.BatchNorm2d(512), nn.ReLU(inplace=True)]
        encoder = nn.Sequential(*trunk)
    side = input_size // 32
    return ConvAutoencoder(encoder, _decoder(512, convs)), 512 * side * side


AE_SPEC = dict(kind="autoencoder", trains_itself=True, **IN_01)


@register_backbone("vae", description="VAE (fully connected, 20-d μ)", pretrained_source=FROM_SCRATCH, **AE_SPEC)
def vae(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    return VAE(input_size), 20


@register_backbone("auto", description="Contractive autoencoder (128-d)", pretrained_source=FROM_SCRATCH, **AE_SPEC)
def auto(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    return ContractiveAutoencoder(input_size), 128


def _register_conv_autoencoder(name: str, description: str) -> None:
    def build(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
        return _conv_autoencoder(name, input_size, pretrained, weights_file)

    register_backbone(name, description=description, pretrained_source="torchvision ImageNet encoder (torch cache)",
                      **AE_SPEC)(build)


for _name, _description in (("vgg16", "VGG16 conv autoencoder"), ("vgg11", "VGG11 conv autoencoder"),
                            ("resnet18", "ResNet18 conv autoencoder"), ("resnet50", "ResNet50 conv autoencoder")):
    _register_conv_autoencoder(_name, _description)
