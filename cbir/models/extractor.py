"""The feature extractor: backbone → (Deep Ranking) → linear head → L2-normalised vector, and its checkpoint.

The checkpoint is one file holding the weights and everything needed to rebuild the extractor (name, size,
preprocessing, class names), read back with ``torch.load(weights_only=True)``. Later commands need only the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from cbir.data import DEFAULT_AUGMENTATION, build_transform
from cbir.errors import CbirError, ParameterError
from cbir.files import atomic_path
from cbir.inference import check_flags
# Registration order is the order list_models() shows: the thesis's backbones, then the self-trained models.
from cbir.models import backbones as _backbones  # noqa: F401, I001
from cbir.models import timm_models as _timm_models  # noqa: F401 — deit and the timm:<name> family
from cbir.models import autoencoders as _autoencoders  # noqa: F401
from cbir.models import byol as _byol  # noqa: F401
from cbir.models.backbones import POOLINGS
from cbir.models.registry import BACKBONES, get_backbone

CHECKPOINT_FORMAT = 1
#: The largest embedding a head may have: far above any retrieval use, far below what exhausts memory.
MAX_FEATURES = 65536
#: The embedding head's size unless asked otherwise. 512 was chosen over 128 on validation data (README, Training
#: recipes, issue #14): ahead on the classes trained on in every seed, unseen classes within the spread; a vector
#: costs 2 KB in float32.
DEFAULT_FEATURES = 512


class DeepRanking(nn.Module):
    """Deep Ranking (Wang et al. 2014): the CNN's 4096-d vector beside two shallow multi-scale branches."""

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.to4096 = nn.Linear(feature_dim, 4096)
        self.branch1 = nn.Sequential(nn.Conv2d(3, 96, 8, stride=16, padding=1), nn.MaxPool2d(3, 4, 1))
        self.branch2 = nn.Sequential(nn.Conv2d(3, 96, 7, stride=32, padding=4), nn.MaxPool2d(7, 2, 3))
        # 96×4×4 per branch at 224 px; the adaptive pool keeps other input sizes working.
        self.to4x4 = nn.AdaptiveMaxPool2d(4)

    def forward(self, x):
        deep = F.normalize(self.to4096(self.backbone(x)), dim=1)
        shallow = torch.cat([torch.flatten(self.to4x4(branch(x)), 1) for branch in (self.branch1, self.branch2)], 1)
        return torch.cat([deep, F.normalize(shallow, dim=1)], 1)


#: How many right-angle orientations test-time augmentation may average: the image and its mirror image, the four
#: rotations, or all eight (the four rotations, each mirrored).
TTA_COUNTS = (2, 4, 8)


def orientations(x: torch.Tensor, count: int = 8) -> torch.Tensor:
    """``count`` right-angle orientations of a batch of square images, stacked (see ``TTA_COUNTS``)."""
    t = x.transpose(2, 3)  # torch.rot90(x, 1, (2, 3)) is t.flip(2), by -1 t.flip(3)
    if count == 2:
        return torch.cat([x, x.flip(3)])
    if count == 4:
        return torch.cat([x, t.flip(2), x.flip(2, 3), t.flip(3)])
    return torch.cat([x, x.flip(3), x.flip(2), x.flip(2, 3), t, t.flip(3), t.flip(2), t.flip(2, 3)])


def tta_count(config: dict) -> int:
    """The orientations a checkpoint's configuration averages over; 0 for none (``True``, before the count: 8)."""
    tta = config.get("tta") or 0
    return 8 if tta is True else int(tta)


class Extractor(nn.Module):
    """An image batch → L2-normalised (B, num_features) vectors. ``num_features=0`` keeps the pooled features.

    Models that train with their own objective (``trains_itself``: the autoencoders, BYOL) have no head: their
    embedding is their own representation, whatever ``num_features`` asked. For them the training loop calls
    ``training_loss(images)`` instead of a metric loss, and ``after_step()`` after each optimiser step.
    """

    def __init__(self, config: dict, pretrained: bool = False, weights_file: str | None = None):
        super().__init__()
        self._backbone_frozen = self._batchnorm_frozen = False
        spec = get_backbone(config["model"], config.get("backbone_config"))
        input_size = int(config.get("input_size") or spec.input_size)
        if input_size < spec.min_input_size:
            raise ParameterError(f"'{config['model']}' needs images of at least {spec.min_input_size} px; "
                                 f"{{input_size}} {input_size} is too small", "input_size")
        if spec.trains_itself and config.get("dr_model"):
            raise ParameterError(f"{{dr_model}} wraps a backbone trained by metric learning; '{config['model']}' "
                                 "trains itself with its own objective", "dr_model")
        backbone, feature_dim = spec.create(pretrained=pretrained, weights_file=weights_file, input_size=input_size)
        pooling = config.get("pooling") or "avg"  # checkpoints from before the key pooled by the average
        if pooling != "avg":
            if pooling not in POOLINGS:
                raise ParameterError(f"unknown {{pooling}} {pooling!r}; choose one of: {', '.join(POOLINGS)}",
                                     "pooling")
            if not hasattr(backbone, "pooling"):
                raise ParameterError(f"'{config['model']}' pools its features its own way; {{pooling}} {pooling} "
                                     "applies to densenet, kimianet, effnet and effnet_lite2", "pooling")
            backbone.pooling = pooling
        if tta_count(config) not in (0, *TTA_COUNTS):
            raise ParameterError(f"{{tta}} must be one of {', '.join(map(str, TTA_COUNTS))} orientations, got "
                                 f"{config['tta']!r}", "tta")
        if config.get("dr_model"):
            backbone, feature_dim = DeepRanking(backbone, feature_dim), 4096 + 2 * 96 * 16
        self.backbone = backbone
        self.spec = spec
        requested = 0 if spec.trains_itself else config["num_features"]
        num_features = requested or feature_dim
        self.head = nn.Linear(feature_dim, num_features) if requested else nn.Identity()
        self.config = {
            **config,
            "num_features": requested,
            "input_size": input_size,
            "mean": list(config.get("mean") or spec.mean),
            "std": list(config.get("std") or spec.std),
            "embedding_size": num_features,
            "pooling": pooling,
        }
        if spec.extra:
            self.config["backbone_config"] = spec.extra
        if spec.frozen:
            self.freeze_backbone()

    @property
    def embedding_size(self) -> int:
        return self.config["embedding_size"]

    @property
    def trains_itself(self) -> bool:
        """True when training calls ``training_loss`` (autoencoders, BYOL) rather than a metric loss."""
        return self.spec.trains_itself

    @property
    def can_reconstruct(self) -> bool:
        return hasattr(self.backbone, "reconstruct")

    def forward(self, x):
        count = tta_count(self.config)
        if count and not self.training:
            # Tissue has no up: the mean over its orientations is one vector however the image lies.
            vectors = F.normalize(self.head(self.backbone(orientations(x, count))), dim=1)
            return F.normalize(vectors.reshape(count, -1, vectors.shape[1]).mean(0), dim=1)
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def training_loss(self, images: torch.Tensor) -> torch.Tensor:
        """The model's own objective on a batch of [0, 1] images (contractive: MSE + penalty; VAE: BCE + KL;
        conv autoencoders: MSE; BYOL: its loss between two augmented views)."""
        if not self.trains_itself:
            raise CbirError(f"'{self.config['model']}' trains with a metric loss (--loss), not its own objective")
        return self.backbone.training_loss(images)

    def after_step(self) -> None:
        """Called by the training loop after each optimiser step (BYOL moves its target network here)."""
        hook = getattr(self.backbone, "after_step", None)
        if hook is not None:
            hook()

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Autoencoders: the decoded images, in [0, 1], for a batch prepared by ``transform()``."""
        if not self.can_reconstruct:
            raise CbirError(f"a '{self.config['model']}' extractor does not reconstruct images; only the "
                            f"autoencoders do ({', '.join(reconstructing_models())})")
        return self.backbone.reconstruct(images)

    def freeze_backbone(self) -> None:
        """Train the head only: the backbone's weights stop learning and its BatchNorm statistics stop moving."""
        if self.spec.trains_itself:
            raise ParameterError(f"{{freeze}} trains the head only, and '{self.config['model']}' has no head: it "
                                 "trains itself with its own objective", "freeze")
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self._backbone_frozen = True
        self.backbone.eval()

    def freeze_batchnorm(self) -> None:
        """Keep the backbone's BatchNorm statistics (the pretrained ones) while its weights learn: every batch is
        normalised as the embedding will be, not by the statistics of one class-balanced batch."""
        self._batchnorm_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self._backbone_frozen:
            # A frozen backbone in train mode would still drift its BatchNorm running statistics.
            self.backbone.eval()
        elif self._batchnorm_frozen:
            for module in self.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def transform(self, train: bool = False, augmentation: str = DEFAULT_AUGMENTATION):
        return build_transform(self.config["input_size"], self.config["mean"], self.config["std"], train=train,
                               augmentation=augmentation)

    def fingerprint(self) -> str:
        """A short hash of the weights: the database uses it to refuse vectors from another extractor."""
        digest = hashlib.sha256()
        for key, value in sorted(stored_state(self).items()):
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
        # The same weights give other vectors under these: another extractor to a database.
        count = tta_count(self.config)
        if count:  # eight hashed as before there was a count: those checkpoints keep their databases
            digest.update(b"tta" if count == 8 else b"tta%d" % count)
        if self.config["pooling"] != "avg":
            digest.update(self.config["pooling"].encode())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        """What a database records about the extractor its vectors came from."""
        return {
            "name": self.config["model"],
            "num_features": self.embedding_size,
            "dr_model": bool(self.config.get("dr_model")),
            "input_size": self.config["input_size"],
            "fingerprint": self.fingerprint(),
        }


def reconstructing_models() -> list[str]:
    return [name for name, spec in BACKBONES.items() if spec.kind == "autoencoder"]


def create_extractor(
    model: str = "densenet",
    num_features: int = DEFAULT_FEATURES,
    *,
    dr_model: bool = False,
    pretrained: bool = True,
    weights_file: str | None = None,
    input_size: int | None = None,
    class_names: list[str] | None = None,
    pooling: str = "avg",
) -> Extractor:
    if isinstance(num_features, bool) or not isinstance(num_features, int) or not 0 <= num_features <= MAX_FEATURES:
        raise ParameterError(f"{{num_features}} must lie between 1 and {MAX_FEATURES} (or be 0 for the backbone's "
                             f"own features), got {num_features!r}", "num_features")
    config = {
        "model": model,
        "num_features": num_features,
        "dr_model": dr_model,
        "input_size": input_size,
        "pretrained": pretrained,
        "class_names": list(class_names or []),
        "pooling": pooling,
    }
    return Extractor(config, pretrained=pretrained, weights_file=weights_file)


def prefers_channels_last(module: nn.Module) -> bool:
    """Whether ``module`` runs faster on NHWC tensors: it has 2-D convolutions (oneDNN on a CPU, tensor cores on a
    GPU). Training and the PyTorch encoder both switch on it; checkpoints keep the standard layout all the same."""
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def stored_state(module: nn.Module) -> dict:
    """The weights as a checkpoint keeps them: on the CPU, and contiguous (a model that trained in channels_last
    saves the standard layout)."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_extractor(path: str | Path, extractor: Extractor, **extra) -> Path:
    """Write the checkpoint atomically: a crash never leaves half a file under the final name, two writers never
    share a temporary file, and no temporary file outlives the call."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": extractor.config,
        "state_dict": stored_state(extractor),
        **extra,
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"weights file {path} does not exist; train one with cbir-train --weights {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — a foreign or damaged file is the user's, not a bug
        raise CbirError(f"{path} is not a cbir checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise CbirError(f"{path} is not a cbir checkpoint (no extractor configuration in it)")
    _check_checkpoint(payload, path)
    return payload


#: What a checkpoint's configuration must hold, and of which type (None allowed where the second type is None).
_CONFIG_FIELDS = {"model": (str,), "num_features": (int,), "embedding_size": (int,), "input_size": (int,),
                  "mean": (list,), "std": (list,), "class_names": (list,)}


def _check_checkpoint(payload: dict, path) -> None:
    """Refuse, in one line, a checkpoint whose configuration or weights do not have the shape cbir writes."""
    config, state = payload["config"], payload["state_dict"]
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise CbirError(f"{path} is not a cbir checkpoint (its config and state_dict are not mappings)")
    for name, types in _CONFIG_FIELDS.items():
        value = config.get(name)
        if value is None or isinstance(value, bool) or not isinstance(value, types):
            raise CbirError(f"{path} is a damaged checkpoint: its config field '{name}' is {value!r}, expected "
                            f"{' or '.join(t.__name__ for t in types)}")
    if not 0 <= config["num_features"] <= MAX_FEATURES or not 1 <= config["embedding_size"] <= 10 * MAX_FEATURES:
        raise CbirError(f"{path} is a damaged checkpoint: {config['num_features']} features, embedding size "
                        f"{config['embedding_size']}")
    for name in ("mean", "std"):
        if len(config[name]) != 3 or not all(isinstance(v, (int, float)) for v in config[name]):
            raise CbirError(f"{path} is a damaged checkpoint: its {name} is {config[name]!r}, expected 3 numbers")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CbirError(f"{path} is a damaged checkpoint: its state_dict does not map names to tensors")


def load_extractor(
    path: str | Path, *, model: str | None = None, num_features: int | None = None, dr_model: bool | None = None
) -> Extractor:
    """Rebuild the extractor a checkpoint describes; explicit settings that contradict it are refused."""
    payload = read_checkpoint(path)
    check_flags(payload["config"], path, model=model, num_features=num_features, dr_model=dr_model)
    return extractor_from_checkpoint(payload)


def extractor_from_checkpoint(payload: dict) -> Extractor:
    """The extractor a checkpoint read by :func:`read_checkpoint` describes, in eval mode."""
    extractor = Extractor(payload["config"], pretrained=False)
    try:
        extractor.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:  # missing, unexpected or mis-shaped weights
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise CbirError(f"the checkpoint's weights do not fit its '{payload['config']['model']}' configuration "
                        f"({first.rstrip(':.')})") from None
    extractor.eval()
    return extractor
