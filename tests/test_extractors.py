"""Every extractor, end to end at its tiniest input: one training step, save, reload, index and search.

Weights are random (pretrained=False: no ImageNet weights on this machine); what is checked is what a user relies
on — each model trains with its own objective, its checkpoint rebuilds the very same extractor from the file
alone, and its vectors go through the real database, where an image finds itself first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cbir.data import Sample, load_image
from cbir.database import Database
from cbir.embedding import embed
from cbir.errors import CbirError
from cbir.losses import create_loss
from cbir.models import (
    check_model_name,
    create_extractor,
    describe_models,
    list_models,
    load_extractor,
    models_table,
    save_extractor,
)

THESIS_MODELS = {"densenet", "resnet", "vgg", "inception", "knet", "swin", "vision", "cvt", "conv", "deit", "effnet",
                 "vae", "auto", "vgg16", "vgg11", "resnet18", "resnet50", "byol"}
# Registered beyond the thesis's: a larger EfficientNet-Lite for the histology recipe (issue #14).
REGISTERED = THESIS_MODELS | {"effnet_lite2"}
SELF_TRAINED = {"vae", "auto", "vgg16", "vgg11", "resnet18", "resnet50", "byol"}
# The tiniest input each architecture takes (Inception's stem needs 75 px; the conv autoencoders halve 5 times).
TINY = {name: 32 for name in REGISTERED} | {"inception": 75, "timm:vit_tiny_patch16_224": 32}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Two classes × two images, each its own noise so that no two embed alike.

    Each class holds a reddish and a bluish tile: colour, what an untrained network sees first, does not tell the
    classes apart, so the metric loss has something to correct (a loss of 0 would train nothing).
    """
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(0)
    samples = []
    for class_index, class_name in enumerate(["proj_a", "proj_b"]):
        (root / class_name).mkdir()
        for i in range(2):
            base = np.array([200, 60, 60]) if i == 0 else np.array([60, 60, 200])
            pixels = np.clip(base + rng.normal(0, 50, (80, 80, 3)) + 30 * class_index, 0, 255).astype(np.uint8)
            path = root / class_name / f"tile{i}.png"
            Image.fromarray(pixels).save(path)
            samples.append(Sample(str(path), class_name))
    return samples


def train_one_step(extractor, samples) -> float:
    """One optimiser step the way the training loop takes it; returns the loss."""
    transform = extractor.transform(train=True)
    images = torch.stack([transform(load_image(s.path)) for s in samples])
    labels = torch.tensor([0 if s.class_name == "proj_a" else 1 for s in samples])
    extractor.train()
    params = [p for p in extractor.parameters() if p.requires_grad]
    if extractor.trains_itself:
        loss_fn, loss = None, extractor.training_loss(images)
    else:
        loss_fn = create_loss("margin", num_classes=2, num_features=extractor.embedding_size)
        loss = loss_fn(extractor(images), labels)
    groups = [{"params": params}] + (loss_fn.param_groups(lr_proxies=1e-3, beta_lr=1e-3) if loss_fn else [])
    optimizer = torch.optim.Adam(groups, lr=1e-3)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    extractor.after_step()
    return loss.item()


def test_the_registry_holds_every_thesis_extractor_and_each_has_a_test():
    assert set(list_models()) == REGISTERED
    assert set(list_models()) <= set(TINY)  # a new entry needs its tiny size here, and so its end-to-end test
    assert check_model_name("timm:resnet18") == "timm:resnet18"


@pytest.mark.slow
def test_the_model_table_gives_size_input_parameters_and_weights_source():
    rows = {row["name"]: row for row in describe_models(num_features=128)}
    assert set(rows) == REGISTERED
    assert rows["densenet"]["embedding_size"] == 128 and rows["inception"]["input_size"] == 299
    assert rows["vae"]["embedding_size"] == 20 and rows["auto"]["embedding_size"] == 128
    assert {rows[n]["embedding_size"] for n in ("vgg16", "vgg11", "resnet18", "resnet50")} == {25088}
    assert rows["byol"]["embedding_size"] == 2048
    assert 7e6 < rows["densenet"]["parameters"] < 8e6 and 85e6 < rows["vision"]["parameters"] < 87e6
    assert all(row["pretrained_source"] for row in rows.values())
    assert {n for n, row in rows.items() if row["trains_itself"]} == SELF_TRAINED
    table = models_table()
    assert "timm:<name>" in table
    # the thesis's short names are explained beside them
    for name, meaning in (("conv", "ConvNeXt-Tiny"), ("vision", "ViT-B/16"), ("auto", "Contractive autoencoder")):
        assert meaning in next(line for line in table.splitlines() if line.split()[0] == name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TINY))
def test_extractor_trains_saves_reloads_and_finds_itself(name, tiles, tmp_path):
    size = TINY[name]
    torch.manual_seed(0)
    extractor = create_extractor(name, 8, pretrained=False, input_size=size, class_names=["proj_a", "proj_b"])
    assert extractor.trains_itself == (name in SELF_TRAINED)
    before = {k: v.clone() for k, v in extractor.state_dict().items()}

    loss = train_one_step(extractor, tiles)

    assert np.isfinite(loss)
    changed = {k for k, v in extractor.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
    assert changed, f"the training step changed no weight (loss {loss})"
    if name == "byol":  # after_step() moved the target network towards the online one
        assert any(k.startswith("backbone.learner.target_encoder.") for k in changed)
    path = save_extractor(tmp_path / f"{name.replace(':', '_')}.pt", extractor)
    again = load_extractor(path)
    extractor.eval()
    first = embed(extractor, tiles, batch_size=4, num_workers=0)
    second = embed(again, tiles, batch_size=4, num_workers=0)
    expected = extractor.embedding_size
    assert first.vectors.shape == (4, expected)
    assert np.allclose(np.linalg.norm(first.vectors, axis=1), 1, atol=1e-5)
    assert np.allclose(first.vectors, second.vectors, atol=1e-5)
    description = again.describe()
    assert description["fingerprint"] == extractor.fingerprint()
    assert again.config["input_size"] == size

    db = Database.open("x", create=True)
    try:
        db.set_extractor(description)
        db.add([s.path for s in second.samples], [s.class_name for s in second.samples], second.vectors)
        result = db.search(second.vectors, k=2)
    finally:
        db.close()
    assert [paths[0] for paths in result.paths] == [s.path for s in second.samples]


def test_self_trained_models_embed_their_own_code_not_a_head():
    vae = create_extractor("vae", 128, pretrained=False, input_size=32).eval()
    assert vae.embedding_size == 20 and isinstance(vae.head, torch.nn.Identity)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        # μ, not a sample: the same image embeds to the same vector every time.
        assert torch.equal(vae(images), vae(images))
        assert torch.allclose(vae(images), torch.nn.functional.normalize(vae.backbone.encode(images)[0], dim=1))
    conv = create_extractor("resnet18", 0, pretrained=False, input_size=64)
    assert conv.embedding_size == 512 * 2 * 2  # the flattened 512 × s/32 × s/32 code; 25088 at 224 px
    with pytest.raises(CbirError, match="has no head"):
        conv.freeze_backbone()
    with pytest.raises(CbirError, match="dr_model wraps"):
        create_extractor("vae", dr_model=True, pretrained=False, input_size=32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vae", "auto", "vgg11"])
def test_autoencoders_see_and_rebuild_images_in_0_1(name):
    extractor = create_extractor(name, pretrained=False, input_size=32).eval()
    assert extractor.config["mean"] == [0, 0, 0] and extractor.config["std"] == [1, 1, 1]
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        rebuilt = extractor.reconstruct(images)
    assert rebuilt.shape == images.shape and rebuilt.min() >= 0 and rebuilt.max() <= 1


def test_only_autoencoders_reconstruct():
    with pytest.raises(CbirError, match="does not reconstruct"):
        create_extractor("effnet", 8, pretrained=False, input_size=32).reconstruct(torch.rand(1, 3, 32, 32))
    with pytest.raises(CbirError, match="metric loss"):
        create_extractor("effnet", 8, pretrained=False, input_size=32).training_loss(torch.rand(2, 3, 32, 32))


@pytest.mark.slow
def test_freeze_trains_the_head_only_and_keeps_batchnorm_still(tiles):
    extractor = create_extractor("resnet", 8, pretrained=False, input_size=32)
    extractor.freeze_backbone()
    backbone_before = {k: v.clone() for k, v in extractor.backbone.state_dict().items()}
    head_before = extractor.head.weight.clone()
    train_one_step(extractor, tiles)
    assert all(torch.equal(v, backbone_before[k]) for k, v in extractor.backbone.state_dict().items())
    assert not torch.equal(extractor.head.weight, head_before)


def kimianet_layout(tmp_path):
    """A file laid out as KimiaNet publishes it: DataParallel(fully_connected(Sequential(features, pool), fc_4))."""
    import torchvision

    features = torchvision.models.densenet121(weights=None).features.state_dict()
    state = {f"module.model.0.{k}": torch.randn_like(v) if v.is_floating_point() else v for k, v in features.items()}
    state["module.fc_4.weight"], state["module.fc_4.bias"] = torch.randn(30, 1024), torch.randn(30)
    torch.save(state, tmp_path / "KimiaNetPyTorchWeights.pth")
    return tmp_path / "KimiaNetPyTorchWeights.pth", state


@pytest.mark.slow
def test_knet_loads_kimianets_published_file_and_keeps_it_frozen(tmp_path, tiles):
    path, state = kimianet_layout(tmp_path)
    extractor = create_extractor("knet", 8, pretrained=True, weights_file=str(path), input_size=32)
    conv0 = extractor.backbone.features.conv0.weight
    assert torch.equal(conv0, state["module.model.0.conv0.weight"])
    assert torch.equal(extractor.backbone.features.denseblock1.denselayer1.norm1.running_mean,
                       state["module.model.0.denseblock1.denselayer1.norm1.running_mean"])
    assert not any(p.requires_grad for p in extractor.backbone.parameters())
    backbone_before = {k: v.clone() for k, v in extractor.backbone.state_dict().items()}
    train_one_step(extractor, tiles)
    assert all(torch.equal(v, backbone_before[k]) for k, v in extractor.backbone.state_dict().items())


@pytest.mark.slow
def test_knet_without_or_with_a_wrong_file_says_what_to_do(tmp_path):
    with pytest.raises(CbirError, match="knet needs KimiaNet's weight file: pass --pretrained_weights"):
        create_extractor("knet", pretrained=True)
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(CbirError, match="does not hold KimiaNet"):
        create_extractor("knet", pretrained=True, weights_file=str(tmp_path / "resnet18.pth"))


def test_missing_pretrained_weights_offline_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    for name in ("vgg", "byol", "vgg16", "deit", "cvt", "timm:vit_tiny_patch16_224"):
        with pytest.raises(CbirError, match="--scratch"):
            create_extractor(name, pretrained=True, input_size=32)


@pytest.mark.slow
def test_timm_model_takes_pretrained_weights_from_a_local_file(tmp_path):
    import timm

    source = timm.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")  # with its ImageNet classifier, as published
    extractor = create_extractor("timm:resnet18", 8, pretrained=True, weights_file=str(tmp_path / "resnet18.pth"))
    assert torch.equal(extractor.backbone.conv1.weight, source.conv1.weight)
    torch.save({"conv1.weight": source.conv1.weight}, tmp_path / "partial.pth")
    with pytest.raises(CbirError, match="does not hold timm:resnet18 weights: .* missing"):
        create_extractor("timm:resnet18", pretrained=True, weights_file=str(tmp_path / "partial.pth"))
    with pytest.raises(CbirError, match="timm has no model 'not_a_model'"):
        create_extractor("timm:not_a_model", pretrained=False)


@pytest.mark.slow
def test_a_foundation_model_folder_loads_and_its_checkpoint_no_longer_needs_it(tmp_path, tiles):
    """UNI-style: a folder with timm's config.json (architecture + model arguments) and the weights."""
    import shutil

    import timm

    folder = tmp_path / "uni_like"
    folder.mkdir()
    model_args = {"init_values": 1e-5, "num_classes": 0, "img_size": 64}  # LayerScale: absent from the plain arch
    source = timm.create_model("vit_tiny_patch16_224", **model_args)
    torch.save(source.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "model_args": model_args,
        "pretrained_cfg": {"input_size": [3, 64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                           "fixed_input_size": True},
    }))
    extractor = create_extractor(f"timm:local-dir:{folder}", 8, pretrained=True)
    assert torch.equal(extractor.backbone.blocks[0].ls1.gamma, source.blocks[0].ls1.gamma)
    assert extractor.config["input_size"] == 64 and extractor.config["mean"] == [0.5, 0.5, 0.5]
    extractor.freeze_backbone()
    train_one_step(extractor, tiles)
    path = save_extractor(tmp_path / "uni_head.pt", extractor.eval())
    shutil.rmtree(folder)
    again = load_extractor(path)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(extractor(images), again(images), atol=1e-6)


def test_cbir_reconstruct_writes_each_image_beside_its_reconstruction(tiles, tmp_path, capsys):
    from cbir.cli.common import run
    from cbir.cli.reconstruct import main

    extractor = create_extractor("auto", pretrained=False, input_size=32)
    train_one_step(extractor, tiles)
    weights = save_extractor(tmp_path / "auto.pt", extractor)
    folder = str(Path(tiles[0].path).parents[1])  # the class folders
    assert run(main, ["--weights", str(weights), "--path", folder, "--out", str(tmp_path / "rec")]) == 0
    pngs = sorted((tmp_path / "rec").glob("*.png"))
    assert [p.name for p in pngs][:2] == ["proj_a_tile0_reconstruction.png", "proj_a_tile1_reconstruction.png"]
    assert len(pngs) == 4 and Image.open(pngs[0]).size == (32 + 4 + 32, 32)
    assert "wrote 4 input | reconstruction images" in capsys.readouterr().out


def test_cbir_reconstruct_refuses_a_non_autoencoder_in_one_line(tiles, tmp_path, capsys):
    from cbir.cli.common import run
    from cbir.cli.reconstruct import main

    weights = save_extractor(tmp_path / "effnet.pt", create_extractor("effnet", 8, pretrained=False, input_size=32))
    assert run(main, ["--weights", str(weights), "--path", tiles[0].path, "--out", str(tmp_path / "rec")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'effnet' extractor, which does not reconstruct images" in err
    assert not (tmp_path / "rec").exists()


def fake_hf_cache(cache, repo_id: str, files: dict) -> None:
    """The Hugging Face cache layout (refs/main → snapshots/<revision>/<file>) as huggingface_hub leaves it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, write in files.items():
        write(snapshot / name)


def test_timm_weights_come_from_the_hugging_face_cache_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    published = timm.create_model("vit_tiny_patch16_224", num_classes=1000)

    def save(path):
        save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(path))

    # A registry name: its pretrained tag's hub repository, as timm would have downloaded it.
    fake_hf_cache(tmp_path, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k", {"model.safetensors": save})
    extractor = create_extractor("timm:vit_tiny_patch16_224", 8, pretrained=True, input_size=32)
    assert torch.equal(extractor.backbone.patch_embed.proj.weight, published.patch_embed.proj.weight)
    assert extractor.config["mean"] == [0.5, 0.5, 0.5]  # the tag's own preprocessing
    # An hf-hub repository with timm's config.json (how UNI is published).
    config = {"architecture": "vit_tiny_patch16_224", "model_args": {"num_classes": 0},
              "pretrained_cfg": {"input_size": [3, 224, 224], "fixed_input_size": True}}
    fake_hf_cache(tmp_path, "lab/pathology-vit", {"model.safetensors": save,
                                                  "config.json": lambda p: p.write_text(json.dumps(config))})
    extractor = create_extractor("timm:hf-hub:lab/pathology-vit", 8, pretrained=True, input_size=32)
    assert torch.equal(extractor.backbone.blocks[0].attn.qkv.weight, published.blocks[0].attn.qkv.weight)
    with pytest.raises(CbirError, match="Hugging Face cache does not hold lab/other"):
        create_extractor("timm:hf-hub:lab/other", pretrained=True)


@pytest.mark.slow
def test_cvt_loads_the_published_transformers_checkpoint(tmp_path):
    from safetensors.torch import save_file
    from transformers import CvtConfig, CvtForImageClassification

    published = CvtForImageClassification(CvtConfig(depth=[1, 4, 16], embed_dim=[64, 192, 384], num_heads=[1, 3, 6],
                                                     num_labels=1000)).eval()
    save_file({k: v.contiguous() for k, v in published.state_dict().items()}, str(tmp_path / "model.safetensors"))
    extractor = create_extractor("cvt", 8, pretrained=True, weights_file=str(tmp_path / "model.safetensors"),
                                 input_size=32).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        # Our features are exactly what the published classifier reads.
        assert torch.allclose(published.classifier(extractor.backbone(images)), published(images).logits, atol=1e-5)
