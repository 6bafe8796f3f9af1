"""BYOL (Grill et al. 2020) on a ResNet50, through the maintained ``byol-pytorch`` package.

The embedding is the backbone representation (the pooled 2048-d ResNet50 output), not the projection. Inputs
are images in [0, 1]: the two views are augmented on the batch tensor (colour jitter, grey, flip, blur, crop) and
the network normalises with the ImageNet statistics itself, so the same weights embed un-augmented images at
index and search time. After each optimiser step the target network follows the online one by an exponential
moving average: the training loop calls ``after_step()``.
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision import transforms as T

from cbir.models.registry import register_backbone
from cbir.models.weights import Normalize, load_checked, torchvision_weights


def byol_augmentation(input_size: int) -> nn.Module:
    """byol-pytorch's default views without its final normalisation (the network normalises)."""
    from byol_pytorch.byol_pytorch import RandomApply

    return nn.Sequential(
        RandomApply(T.ColorJitter(0.8, 0.8, 0.8, 0.2), p=0.3),
        T.RandomGrayscale(p=0.2),
        T.RandomHorizontalFlip(),
        RandomApply(T.GaussianBlur((3, 3), (1.0, 2.0)), p=0.2),
        T.RandomResizedCrop((input_size, input_size), antialias=True),
    )


class BYOLModel(nn.Module):
    def __init__(self, net: nn.Module, input_size: int, moving_average_decay: float = 0.99):
        super().__init__()
        from byol_pytorch import BYOL

        # BYOL's constructor runs one warm-up forward (it creates the projector and the target network): without
        # augmentation, and with the backbone in eval mode so that random input does not shift pretrained
        # BatchNorm statistics. image_size only sizes that warm-up and the default views we replace, so small is
        # enough. The paper's BYOL: no simplicial embedding (byol-pytorch's newer default).
        net.eval()
        self.learner = BYOL(net, image_size=32, hidden_layer=-1, augment_fn=nn.Identity(),
                            moving_average_decay=moving_average_decay, use_simplicial_embeddings=False)
        self.learner.augment1 = self.learner.augment2 = byol_augmentation(input_size)
        self.learner.train()

    def forward(self, x):
        return self.learner.net(x)

    def training_loss(self, x):
        return self.learner(x.clamp(0, 1))

    def after_step(self) -> None:
        self.learner.update_moving_average()


@register_backbone("byol", kind="self-supervised", trains_itself=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                   description="BYOL on ResNet50 (byol-pytorch)",
                   pretrained_source="torchvision ImageNet ResNet50 (torch cache)")
def byol(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    state = torchvision_weights(weights, "byol", weights_file) if pretrained else None
    resnet = torchvision.models.resnet50(weights=None)
    if state is not None:
        load_checked(resnet, state, weights_file or "the torch-cache checkpoint", "torchvision resnet50")
    resnet.fc = nn.Identity()
    return BYOLModel(nn.Sequential(Normalize(), resnet), input_size), 2048
