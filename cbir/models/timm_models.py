"""Any timm architecture as a backbone: ``timm:<name>``, plus the thesis's ``deit`` (DeiT-B distilled).

``<name>`` is what ``timm.create_model`` takes:

* a registry name, optionally with a pretrained tag: ``timm:vit_base_patch16_224.augreg2_in21k_ft_in1k``;
* ``local-dir:/path/to/folder``: a folder holding timm's ``config.json`` (architecture, model arguments,
  preprocessing) and its weights (``model.safetensors`` or ``pytorch_model.bin``) — how pathology foundation
  models such as UNI are published;
* ``hf-hub:org/repo``: the same, read from the local Hugging Face cache (never downloaded here).

The architecture, model arguments and preprocessing are resolved once and stored in the checkpoint, so a trained
extractor rebuilds without the folder or the cache. Weights load strictly (classifier aside), through the
architecture's own timm ``checkpoint_filter_fn`` (which converts foreign layouts and resamples position
embeddings to another input size); a file that does not fit is one line, never a half-random model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from cbir.data import IMAGENET_MEAN, IMAGENET_STD
from cbir.errors import CbirError
from cbir.models.registry import BackboneSpec, register_backbone, register_family
from cbir.models.weights import HF_WEIGHT_FILES, SCRATCH_HINT, hf_cached_file, load_checked, load_state_dict_file


def _pretrained_cfg(name: str) -> dict:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return cfg.to_dict() if cfg is not None else {}


def _local_weights(folder: Path) -> Path | None:
    return next((folder / f for f in HF_WEIGHT_FILES if (folder / f).is_file()), None)


def _cached_weights(cfg: dict) -> Path | None:
    """The published weights of a timm registry model if this machine already holds them (HF or torch cache)."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        filenames = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
        found = hf_cached_file(hub_id, filenames)
        if found:
            return found
    url = cfg.get("url")
    if url and url.endswith((".pth", ".pt", ".bin", ".safetensors")):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.is_file():
            return cached
    return None


def _read_folder_config(folder: Path, what: str) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CbirError(f"{what}: no timm config.json in {folder} (a timm model folder holds config.json and "
                        "model.safetensors or pytorch_model.bin)")
    try:
        config = json.loads(config_file.read_text())
        architecture = config["architecture"]
    except (ValueError, KeyError, TypeError):
        raise CbirError(f"{config_file} is not a timm model config (no 'architecture' in it)") from None
    return {"architecture": architecture, "model_args": dict(config.get("model_args") or {}),
            "pretrained_cfg": dict(config.get("pretrained_cfg") or {}), "folder": str(folder.resolve())}


def resolve_timm(name: str, stored: dict | None = None) -> dict:
    """architecture, model_args, preprocessing (and where published weights are) for a ``timm:`` name."""
    if stored:
        return stored
    import timm
    from timm.models import parse_model_name, split_model_name_tag

    try:
        source, model_id = parse_model_name(name)
    except ValueError as exc:
        raise CbirError(f"timm:{name}: {exc}") from None
    if source == "local-dir":
        found = _read_folder_config(Path(model_id).expanduser(), f"timm:{name}")
    elif source == "hf-hub":
        config_file = hf_cached_file(model_id, ("config.json",))
        if config_file is None:
            raise CbirError(f"timm:{name}: the Hugging Face cache does not hold {model_id} (nothing is downloaded "
                            f"here); download it where there is network, or give its folder as timm:local-dir:PATH")
        found = _read_folder_config(config_file.parent, f"timm:{name}")
    else:
        architecture, _tag = split_model_name_tag(model_id)
        if not timm.is_model(architecture):
            raise CbirError(f"timm has no model '{architecture}'; timm.list_models('*pattern*') lists the names")
        found = {"architecture": architecture, "model_args": {}, "pretrained_cfg": _pretrained_cfg(model_id),
                 "folder": None, "tag_name": model_id}
    if not timm.is_model(found["architecture"]):
        raise CbirError(f"timm:{name}: timm {timm.__version__} has no architecture '{found['architecture']}'")
    cfg = found.pop("pretrained_cfg")
    size = cfg.get("input_size") or (3, 224, 224)
    found.update({
        "input_size": int(size[-1]),
        "mean": [float(v) for v in cfg.get("mean") or IMAGENET_MEAN],
        "std": [float(v) for v in cfg.get("std") or IMAGENET_STD],
        # Models whose size is baked into their position embeddings take img_size; CNNs take any size.
        "fixed_input_size": bool(cfg.get("fixed_input_size", False)),
    })
    return found


def _weights_path(resolved: dict, label: str, weights_file: str | None) -> Path:
    if weights_file:
        return Path(weights_file)
    if resolved.get("folder"):
        path = _local_weights(Path(resolved["folder"]))
        if path is None:
            raise CbirError(f"{label}: no model.safetensors or pytorch_model.bin in {resolved['folder']}")
        return path
    path = _cached_weights(_pretrained_cfg(resolved.get("tag_name") or resolved["architecture"]))
    if path is None:
        raise CbirError(f"pretrained weights for {label} are not on this machine (neither in the Hugging Face "
                        f"cache nor in the torch cache); {SCRATCH_HINT}")
    return path


def build_timm(resolved: dict, label: str, *, pretrained: bool, weights_file: str | None, input_size: int):
    import timm

    # Where the weights are is settled before the model is built: a missing file fails fast.
    path = _weights_path(resolved, label, weights_file) if pretrained else None
    kwargs = {**resolved["model_args"], "num_classes": 0}
    if resolved["fixed_input_size"]:
        kwargs["img_size"] = input_size
    try:
        model = timm.create_model(resolved["architecture"], pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise CbirError(f"{label}: timm cannot build {resolved['architecture']} with {kwargs} ({exc})") from None
    if path is not None:
        state = load_state_dict_file(path)
        # The architecture's own converter: foreign key layouts, position embeddings resampled to img_size.
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                state = filter_fn(state, model)
            except TypeError:
                state = filter_fn(state)
            except Exception as exc:  # noqa: BLE001 — a file of another architecture breaks the converter
                raise CbirError(f"{path} does not hold {label} weights ({exc.__class__.__name__}: {exc})") from None
        # With num_classes=0 the classifier has no weights here: the file's classifier is expected to be left over.
        classifier = model.pretrained_cfg.get("classifier") or ()
        classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        load_checked(model, state, str(path), label, ignore=tuple(f"{c}." for c in classifier))
    return model, getattr(model, "head_hidden_size", None) or model.num_features


def _timm_spec(name: str, stored: dict | None) -> BackboneSpec:
    resolved = resolve_timm(name, stored)
    label = f"timm:{name}"

    def build(pretrained: bool, weights_file: str | None = None, input_size: int = resolved["input_size"]):
        return build_timm(resolved, label, pretrained=pretrained, weights_file=weights_file, input_size=input_size)

    source = resolved.get("folder") or "timm (Hugging Face / torch cache)"
    return BackboneSpec(name=label, build=build, input_size=resolved["input_size"], mean=tuple(resolved["mean"]),
                        std=tuple(resolved["std"]), description=f"timm {resolved['architecture']}",
                        pretrained_source=f"{source} or --pretrained_weights", kind="timm", extra=resolved)


register_family("timm", _timm_spec)

_DEIT = "deit_base_distilled_patch16_224"


@register_backbone("deit", kind="transformer", description="DeiT-B distilled (timm)",
                   pretrained_source="timm ImageNet (Hugging Face cache)")
def deit(pretrained: bool, weights_file: str | None = None, input_size: int = 224):
    # Features: the mean of the class and distillation tokens, what the distilled model classifies at inference.
    resolved = {"architecture": _DEIT, "model_args": {}, "folder": None, "tag_name": _DEIT, "fixed_input_size": True}
    if input_size % 16:
        raise CbirError(f"'deit' cuts images into 16 px patches: --input_size must be a multiple of 16, "
                        f"not {input_size}")
    return build_timm(resolved, "deit", pretrained=pretrained, weights_file=weights_file, input_size=input_size)

