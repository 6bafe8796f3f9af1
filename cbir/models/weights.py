"""Pretrained weights from files that are already on this machine, never from a download routine.

Three places hold published weights: a file the user names (``--pretrained_weights``), the torch hub cache
(torchvision's ImageNet checkpoints) and the Hugging Face cache (timm's and transformers' checkpoints). Each
lookup here only looks; a missing file is one clear line that says where it was expected and how to go on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cbir.errors import CbirError

SCRATCH_HINT = "pass --pretrained_weights FILE, or train from scratch with --scratch"


def load_state_dict_file(path: str | Path) -> dict:
    """A state dict from a PyTorch or safetensors file; wrappers (``state_dict``, ``model``) and ``module.`` dropped."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any unpickling failure is the user's file, not our bug
        raise CbirError(f"{path} is not a PyTorch weights file ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CbirError(f"{path} does not hold a state dict (name → tensor)")
    # nn.DataParallel saves every key under "module."; the published KimiaNet file is one such.
    return {k.removeprefix("module."): v for k, v in state.items()}


def torchvision_weights(weights_enum, name: str, weights_file: str | None) -> dict:
    """The state dict of a torchvision ImageNet checkpoint, from ``weights_file`` or the torch hub cache."""
    if weights_file:
        return load_state_dict_file(weights_file)
    file_name = Path(weights_enum.url).name
    cached = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not cached.is_file():
        raise CbirError(
            f"ImageNet weights for '{name}' are not in the torch cache ({cached}); copy {file_name} "
            f"there or {SCRATCH_HINT}"
        )
    return load_state_dict_file(cached)


def hf_cached_file(repo_id: str, filenames: tuple[str, ...]) -> Path | None:
    """The first of ``filenames`` of a Hugging Face repository that the local HF cache holds, else None."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            found = try_to_load_from_cache(repo_id, filename)
        except Exception:  # noqa: BLE001 — a malformed repo id or cache is "not cached", not a crash
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin", "pytorch_model.pth")


def load_checked(module: nn.Module, state: dict, source: str, what: str, *, ignore: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` and refuse a file that does not fit: one line naming what is off.

    ``ignore`` lists key prefixes of the file that are expected to be left out (a classifier we replace).
    """
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    own = module.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if wrong_shape or missing or unexpected:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong_shape)):
            if keys:
                details.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CbirError(f"{source} does not hold {what} weights: {', '.join(details)}")
    module.load_state_dict(state)


class Normalize(nn.Module):
    """Per-channel normalisation inside a network whose inputs stay in [0, 1] (autoencoders, BYOL).

    The buffers are not saved: they are constants of the architecture, not weights.
    """

    def __init__(self, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std
