"""The training loop: every loss learns, the loss's own parameters train, resume repeats an unbroken run, two
processes under torchrun train one model, models that train themselves use their own objective, bad input is
refused in one line before any work.

Most tests train a tiny CNN registered here (a real backbone entry, only small) on a separable problem of four
colour classes at 32 px, so that a few steps show learning; the CLI and torchrun tests use the real effnet.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

import cbir.training as training
from cbir.cli import train as train_cli
from cbir.cli.common import run
from cbir.errors import CbirError
from cbir.losses import LOSSES
from cbir.models import BACKBONES, load_extractor, register_backbone
from cbir.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def _tiny(pretrained: bool = False, weights_file: str | None = None, input_size: int = 32):
    return _tiny_cnn(), 32


def _tiny_dropout(pretrained: bool = False, weights_file: str | None = None, input_size: int = 32):
    """With dropout, as the real backbones have (EfficientNet's drop-connect): training draws from torch's generator."""
    return nn.Sequential(_tiny_cnn(), nn.Dropout(0.2)), 32


class _TinyAutoencoder(nn.Module):
    """A self-training model of the registry's shape: its own loss, and an after_step hook it counts."""

    def __init__(self):
        super().__init__()
        self.encoder = _tiny_cnn()
        self.decoder = nn.Linear(32, 3 * 8 * 8)
        self.register_buffer("after_steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.encoder(x)

    def training_loss(self, x):
        target = F.adaptive_avg_pool2d(x, 8)
        return F.mse_loss(self.decoder(self.encoder(x)).view_as(target), target)

    def after_step(self):
        self.after_steps += 1


def _tiny_ae(pretrained: bool = False, weights_file: str | None = None, input_size: int = 32):
    return _TinyAutoencoder(), 32


@pytest.fixture(autouse=True, scope="module")
def tiny_backbones():
    """Test-only backbones, registered while this module runs: the registry is global, other modules list it."""
    register_backbone("test_tiny", input_size=32, description="test-only tiny CNN")(_tiny)
    register_backbone("test_tiny_dropout", input_size=32, description="test-only tiny CNN with dropout")(_tiny_dropout)
    register_backbone("test_tiny_ae", input_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                      description="test-only tiny autoencoder", kind="autoencoder", trains_itself=True)(_tiny_ae)
    yield
    for name in ("test_tiny", "test_tiny_dropout", "test_tiny_ae"):
        BACKBONES.pop(name, None)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def make_colour_classes(root: Path, per_class: int = 12, size: int = 32, classes=COLOURS) -> Path:
    """Four classes told apart by colour, with pixel noise: separable, so a few steps must lower any loss."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.array(COLOURS[name]) + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_classes(tmp_path_factory.mktemp("colours"))


def tiny_config(data, weights, **overrides) -> TrainConfig:
    settings = dict(training_data=str(data), weights=str(weights), model="test_tiny", num_features=16,
                    num_epochs=6, batch_size=16, images_per_class=4, lr=1e-3, lr_proxies=1e-2, num_workers=0,
                    progress=False, min_batches=0)  # one batch an epoch: these tests compare epochs
    return TrainConfig(**{**settings, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("loss, modes", [
    *[(name, {}) for name in LOSSES],
    ("infonce", {"augmented": True}),
    ("triplet", {"non_contrastive": True}),
    ("contrastive", {"augmented": True, "non_contrastive": True}),
])
def test_every_loss_lowers_its_value_on_a_separable_problem(colours, tmp_path, loss, modes):
    # basic's hue jitter blurs the colour classes: without it a random CNN already separates four flat colours,
    # a triplet loss starts at zero and there is nothing left to lower
    summary = train(tiny_config(colours, tmp_path / "w.pt", loss=loss, augmentation="basic", **modes))
    losses = [row["loss"] for row in summary["history"]]
    assert summary["loss"] == loss and len(losses) == 6 and all(np.isfinite(losses))
    # each epoch sees other batches: compare the first epoch with the mean of the last two
    assert np.mean(losses[-2:]) < 0.95 * losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["margin", "proxy_nca_pp", "softmax", "softtriple"])
def test_every_learnable_loss_parameter_trains_and_is_saved(colours, tmp_path, monkeypatch, loss):
    created = []

    def recording_create_loss(*args, **kwargs):
        loss_fn = LOSSES_FACTORY(*args, **kwargs)
        created.append((loss_fn, {n: p.detach().clone() for n, p in loss_fn.named_parameters()}))
        return loss_fn

    LOSSES_FACTORY = training.create_loss
    monkeypatch.setattr(training, "create_loss", recording_create_loss)
    train(tiny_config(colours, tmp_path / "w.pt", loss=loss, num_epochs=1, max_batches=2))
    (loss_fn, initial), = created
    assert initial, f"{loss} has no learnable parameter"
    saved = torch.load(tmp_path / "w.pt", weights_only=True)["training"]["loss_state"]
    for name, parameter in loss_fn.named_parameters():
        # every element moves (β of each class, each proxy / class weight / centre), and the checkpoint has it
        assert (parameter.detach() != initial[name]).all(), name
        assert torch.equal(saved[name], parameter.detach()), name


@pytest.mark.slow
def test_resume_after_one_epoch_equals_the_unbroken_run(colours, tmp_path):
    settings = dict(loss="margin", scheduler="exponential", gamma=0.5, num_epochs=2, max_batches=2, val_fraction=0.2,
                    model="test_tiny_dropout")
    # The unbroken run keeps a persistent DataLoader worker from epoch to epoch, the broken and resumed ones have
    # none: augmentation and dropout follow the seed, not the processes nor the loader's own use of the generator.
    unbroken = train(tiny_config(colours, tmp_path / "unbroken.pt", **settings, num_workers=1))
    train(tiny_config(colours, tmp_path / "broken.pt", **{**settings, "num_epochs": 1}))
    resumed = train(tiny_config(colours, tmp_path / "broken.pt", **settings, resume=str(tmp_path / "broken.pt")))
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert resumed["history"][1]["loss"] == pytest.approx(unbroken["history"][1]["loss"], rel=1e-5)
    assert resumed["history"][1]["lr"] == unbroken["history"][1]["lr"] == pytest.approx(0.5e-3)
    a = torch.load(tmp_path / "unbroken.pt", weights_only=True)
    b = torch.load(tmp_path / "broken.pt", weights_only=True)
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.float(), b["state_dict"][key].float(), atol=1e-6), key
    assert torch.allclose(a["training"]["loss_state"]["loss.beta"], b["training"]["loss_state"]["loss.beta"], atol=1e-6)
    assert b["training"]["scheduler"]["last_epoch"] == 2
    log_rows = [json.loads(line) for line in (tmp_path / "broken.log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log_rows] == [1, 2]


@pytest.mark.slow
def test_ema_saves_the_moving_average_and_resumes_as_the_unbroken_run(colours, tmp_path):
    settings = dict(loss="margin", num_epochs=2, max_batches=1, ema=0.99)  # one step an epoch
    unbroken = torch.load(train(tiny_config(colours, tmp_path / "unbroken.pt", **settings))["weights"],
                          weights_only=True)
    train(tiny_config(colours, tmp_path / "first.pt", **{**settings, "num_epochs": 1}))
    first = torch.load(tmp_path / "first.pt", weights_only=True)
    train(tiny_config(colours, tmp_path / "resumed.pt", **settings, resume=str(tmp_path / "first.pt")))
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=True)
    assert first["training"]["ema_steps"] == 1 and unbroken["training"]["ema_steps"] == 2
    for key, average in unbroken["state_dict"].items():
        raw = unbroken["training"]["raw_state"][key]
        assert torch.allclose(resumed["state_dict"][key].float(), average.float(), atol=1e-6), key
        assert torch.allclose(resumed["training"]["raw_state"][key].float(), raw.float(), atol=1e-6), key
        if average.is_floating_point():
            # the first step's weights are the average's start; the second moves it 2 ** -0.75 of the way (warm-up)
            expected = first["state_dict"][key].lerp(raw, 2 ** -0.75)
            assert torch.allclose(average, expected, atol=1e-6), key
    moved = [k for k, v in unbroken["state_dict"].items() if v.is_floating_point()
             and not torch.equal(v, unbroken["training"]["raw_state"][k])]
    assert moved, "the saved weights are the raw ones, not their average"
    # what cbir-index loads is the average
    extractor = load_extractor(tmp_path / "unbroken.pt")
    assert all(torch.equal(v, unbroken["state_dict"][k]) for k, v in extractor.state_dict().items())
    with pytest.raises(CbirError, match="trained with ema 0.99, not 0.0"):
        train(tiny_config(colours, tmp_path / "x.pt", num_epochs=3, max_batches=1, resume=str(tmp_path / "first.pt")))
    del first["training"]["raw_state"]  # a checkpoint that lost the raw weights cannot continue
    torch.save(first, tmp_path / "damaged.pt")
    with pytest.raises(CbirError, match="averaged state does not fit"):
        train(tiny_config(colours, tmp_path / "x.pt", **settings, resume=str(tmp_path / "damaged.pt")))


def test_resume_refuses_other_settings_and_finished_runs(colours, tmp_path):
    weights = tmp_path / "w.pt"
    train(tiny_config(colours, weights, loss="softmax", num_epochs=1, max_batches=1))
    with pytest.raises(CbirError, match="with loss softmax, not margin"):
        train(tiny_config(colours, tmp_path / "x.pt", loss="margin", num_epochs=2, resume=str(weights)))
    with pytest.raises(CbirError, match="already trained 1 epochs"):
        train(tiny_config(colours, tmp_path / "x.pt", loss="softmax", num_epochs=1, resume=str(weights)))


def test_resume_from_a_checkpoint_older_than_min_batches_compares_with_what_it_trained_with(colours, tmp_path, caplog):
    weights = tmp_path / "w.pt"
    train(tiny_config(colours, weights, num_epochs=1, max_batches=1))
    payload = torch.load(weights, weights_only=True)
    del payload["training"]["train_config"]["min_batches"]  # as written before the key existed: it trained with 0
    del payload["training"]["train_config"]["freeze_bn"]  # likewise: it trained without (today's default)
    torch.save(payload, weights)
    # 48 images fill 3 batches of 16: a minimum of 2 trains as 0 did, 16 does not
    for min_batches, warned in ((0, False), (2, False), (16, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cbir"):
            train(tiny_config(colours, tmp_path / f"r{min_batches}.pt", num_epochs=2, max_batches=1,
                              min_batches=min_batches, resume=str(weights)))
        assert any("min_batches" in r.getMessage() for r in caplog.records) == warned, caplog.text


def test_resume_says_when_asked_rates_or_augmentation_differ_from_the_checkpoint(colours, tmp_path, caplog):
    weights = tmp_path / "w.pt"
    train(tiny_config(colours, weights, num_epochs=1, max_batches=1, scheduler="exponential", gamma=0.5))
    cases = [({}, None), ({"lr": 1e-2}, "learning rates"), ({"gamma": 0.9}, "learning rates"),
             ({"augmentation": "stain"}, "augmentation stain differs"), ({"tta": 0}, "tta 0 differs")]
    for changed, warning in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cbir"):
            summary = train(tiny_config(colours, tmp_path / "r.pt", num_epochs=2, max_batches=1, resume=str(weights),
                                        **{"scheduler": "exponential", "gamma": 0.5, **changed}))
        messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert (messages == []) if warning is None else any(warning in m for m in messages), messages
        # the optimiser state wins: epoch 2 trains at the checkpoint's 1e-3 halved once, whatever --lr or --gamma said
        assert summary["history"][1]["lr"] == pytest.approx(1e-3 * 0.5)
        # the count asked is the one the new checkpoint embeds with, 0 included
        assert load_extractor(tmp_path / "r.pt").config["tta"] == changed.get("tta", 4)


def test_resume_with_more_epochs_fits_the_step_schedule_to_them_and_says_so(colours, tmp_path, caplog):
    weights = tmp_path / "w.pt"
    settings = dict(max_batches=1, scheduler="step", gamma=0.5)
    train(tiny_config(colours, weights, num_epochs=2, **settings))  # halves after epochs 1 and 2
    with caplog.at_level(logging.WARNING, logger="cbir"):
        summary = train(tiny_config(colours, tmp_path / "r.pt", num_epochs=6, resume=str(weights), **settings))
    assert any("fitted to 6 epochs" in r.getMessage() for r in caplog.records), caplog.text
    # from epoch 3 the milestones are 6's (3 and 6), as a cosine schedule's length is 6 epochs: not 2's, all passed
    assert [row["lr"] for row in summary["history"]] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1.25e-4, 1.25e-4, 1.25e-4])


def test_resume_of_a_model_that_trains_itself_does_not_warn_of_min_batches(colours, tmp_path, caplog):
    # --min_batches shapes class-balanced epochs only; an autoencoder's epoch is every image once under any value
    weights = tmp_path / "ae.pt"
    train(tiny_config(colours, weights, model="test_tiny_ae", num_epochs=1, max_batches=1))
    payload = torch.load(weights, weights_only=True)
    del payload["training"]["train_config"]["min_batches"]  # as written before the key existed
    torch.save(payload, weights)
    with caplog.at_level(logging.WARNING, logger="cbir"):
        summary = train(tiny_config(colours, tmp_path / "r.pt", model="test_tiny_ae", num_epochs=2, max_batches=1,
                                    min_batches=16, resume=str(weights)))
    assert [row["epoch"] for row in summary["history"]] == [1, 2]
    assert not any("min_batches" in r.getMessage() for r in caplog.records), caplog.text


def test_a_model_that_trains_itself_uses_its_own_loss_on_one_class(tmp_path):
    data = make_colour_classes(tmp_path / "one", per_class=24, classes=["red"])
    summary = train(tiny_config(data, tmp_path / "ae.pt", model="test_tiny_ae", num_epochs=3, lr=3e-3))
    losses = [row["loss"] for row in summary["history"]]
    assert summary["loss"] is None and losses[-1] < losses[0], losses
    payload = torch.load(tmp_path / "ae.pt", weights_only=True)
    # after_step ran once per optimiser step: 24 images in batches of 16 -> 2 steps an epoch
    assert int(payload["state_dict"]["backbone.after_steps"]) == 6
    assert load_extractor(tmp_path / "ae.pt")(torch.rand(2, 3, 32, 32)).shape == (2, 32)
    with pytest.raises(CbirError, match="trains with its own objective; loss margin does not apply"):
        train(tiny_config(data, tmp_path / "x.pt", model="test_tiny_ae", loss="margin"))


def test_generalise_1_trains_on_the_train_half_of_the_classes(synthetic_data, tmp_path):
    from cbir.labels import classes_for

    all_classes = sorted(p.name for p in synthetic_data["train"].iterdir())
    expected = classes_for("train", all_classes, 1)
    train(tiny_config(synthetic_data["train"], tmp_path / "g.pt", generalise=1, num_epochs=1, max_batches=1,
                      batch_size=8))
    config = torch.load(tmp_path / "g.pt", weights_only=True)["config"]
    assert config["class_names"] == expected and 0 < len(expected) < len(all_classes)


def test_generalise_3_trains_on_cluster_labels(synthetic_data, tmp_path):
    from cbir.labels import save_cluster_labels

    images = sorted(p for p in Path(synthetic_data["train"]).rglob("*.png"))
    labels = save_cluster_labels({str(p): i % 3 for i, p in enumerate(images)}, tmp_path / "clusters.json")
    train(tiny_config(synthetic_data["train"], tmp_path / "k.pt", generalise=3, cluster_labels=str(labels),
                      num_epochs=1, max_batches=1, batch_size=8))
    config = torch.load(tmp_path / "k.pt", weights_only=True)["config"]
    assert config["class_names"] == ["cluster_0", "cluster_1", "cluster_2"]


@pytest.mark.slow
def test_two_processes_under_torchrun_train_one_model_on_cpu(synthetic_data, tmp_path):
    weights = tmp_path / "ddp" / "effnet.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node", "2",
        "-m", "cbir.cli.train", "--parallel", "--model", "effnet", "--input_size", "32",
        "--training_data", str(synthetic_data["train"]), "--weights", str(weights), "--loss", "softmax",
        "--lr_proxies", "1e-2", "--num_epochs", "1", "--batch_size", "8", "--max_batches", "2", "--num_workers", "0",
        "--val_fraction", "0.25",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # one process speaks and writes; the ranks' weights (the softmax class weights included) were checked equal
    assert done.stdout.count("trained effnet + softmax") == 1 and "2 processes" in done.stdout
    assert sorted(p.name for p in weights.parent.iterdir()) == ["effnet.best.pt", "effnet.log.jsonl", "effnet.loss.png",
                                                                 "effnet.pt"]
    rows = [json.loads(line) for line in weights.with_name("effnet.log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1] and rows[0]["val_top1"] is not None
    payload = torch.load(weights, weights_only=True)
    assert payload["training"]["train_config"]["parallel"] and "optimizer" in payload["training"]


def test_parallel_without_torchrun_says_how_to_start_it(colours, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(CbirError, match="torchrun"):
        train(tiny_config(colours, tmp_path / "w.pt", parallel=True))


def one_line_error(capsys, argv) -> str:
    assert run(train_cli.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_is_refused_in_one_line_before_any_work(colours, tmp_path, capsys):
    weights = tmp_path / "out" / "w.pt"
    base = ["--model", "test_tiny", "--weights", str(weights), "--num_workers", "0"]
    one_class = make_colour_classes(tmp_path / "one", per_class=4, classes=["red"])
    assert "needs at least two class folders" in one_line_error(capsys, [*base, "--training_data", str(one_class)])
    lonely = make_colour_classes(tmp_path / "lonely", per_class=3, classes=["red", "green"])
    (lonely / "blue").mkdir()
    Image.new("RGB", (32, 32), (0, 0, 255)).save(lonely / "blue" / "only.png")
    assert "hold a single image (blue)" in one_line_error(capsys, [*base, "--training_data", str(lonely)])
    assert "--batch_size 6 must be a multiple" in one_line_error(
        capsys, [*base, "--training_data", str(colours), "--batch_size", "6"])
    assert "apply to the pair losses" in one_line_error(
        capsys, [*base, "--training_data", str(colours), "--augmented"])
    assert "--cluster_labels" in one_line_error(capsys, [*base, "--training_data", str(colours), "--generalise", "3"])
    assert "does not exist" in one_line_error(
        capsys, [*base, "--training_data", str(colours), "--resume", str(tmp_path / "missing.pt")])
    assert "trains with its own objective" in one_line_error(
        capsys, [*base[:1], "test_tiny_ae", *base[2:], "--training_data", str(colours), "--loss", "triplet"])
    assert not weights.parent.exists()  # refused before anything was written
    for field, value, message in (("scheduler", "linear", "unknown scheduler 'linear'"),
                                  ("augmentation", "mixup", "unknown augmentation 'mixup'"),
                                  ("head_lr_scale", 0.0, "head_lr_scale must be a positive number"),
                                  ("ema", 1.0, r"ema must be in \[0, 1\)"),
                                  ("loss", "arcface", "unknown loss 'arcface'"),
                                  ("precision", "fp16", "needs a GPU")):
        if field == "precision" and torch.cuda.is_available():
            continue
        with pytest.raises(CbirError, match=message):
            train(tiny_config(colours, weights, **{field: value}))


def test_the_histology_recipe_warms_up_decays_to_zero_and_trains_the_head_ten_times_faster(colours, tmp_path):
    recipe = dict(scheduler="cosine", head_lr_scale=10.0, augmentation="histology")
    summary = train(tiny_config(colours, tmp_path / "w.pt", loss="margin", num_epochs=2, **recipe))
    groups = torch.load(tmp_path / "w.pt", weights_only=True)["training"]["optimizer"]["param_groups"]
    backbone, head = groups[0], groups[1]
    assert head["initial_lr"] == pytest.approx(10 * backbone["initial_lr"]) == pytest.approx(1e-2)
    assert backbone["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine has reached zero after the last step
    first, last = (row["lr"] for row in summary["history"])
    assert 0 < first <= 1e-3 and last < first  # the rate the first epoch ended on, then lower
    # the schedule itself: a linear warm-up over a tenth of the steps, the peak, then a cosine to zero
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = training.build_scheduler(optimizer, "cosine", num_epochs=4, gamma=0.3, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.5, 1.0, 1.0, 0.9924], abs=1e-4)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] < 0.01


def test_freeze_bn_keeps_the_backbones_batchnorm_statistics_while_its_weights_learn(colours, tmp_path):
    def trained(name, **settings):  # both from the same initial weights: training seeds itself (seed 0)
        train(tiny_config(colours, tmp_path / name, loss="margin", num_epochs=2, pretrained=False, **settings))
        return torch.load(tmp_path / name, weights_only=True)

    frozen, moving = trained("frozen.pt", freeze_bn=True), trained("moving.pt", freeze_bn=False)
    statistics = ("backbone.1.running_mean", "backbone.1.running_var", "backbone.1.num_batches_tracked")
    # the statistics the backbone started with (a fresh BatchNorm's: mean 0, variance 1), not a batch's
    assert torch.equal(frozen["state_dict"][statistics[0]], torch.zeros(16))
    assert torch.equal(frozen["state_dict"][statistics[1]], torch.ones(16))
    assert frozen["state_dict"][statistics[2]] == 0
    assert all(not torch.equal(moving["state_dict"][key].float(), frozen["state_dict"][key].float())
               for key in statistics)
    # while the weights still learn, BatchNorm's own scale and shift (which start at 1 and 0) included
    assert not torch.equal(frozen["state_dict"]["backbone.1.weight"], torch.ones(16))
    assert not torch.equal(frozen["state_dict"]["backbone.1.bias"], torch.zeros(16))
    with pytest.raises(CbirError, match="trained with freeze_bn True, not False"):
        train(tiny_config(colours, tmp_path / "x.pt", loss="margin", num_epochs=3, pretrained=False,
                          freeze_bn=False, resume=str(tmp_path / "frozen.pt")))


def test_tta_makes_a_checkpoint_that_embeds_every_orientation_of_an_image_alike(colours, tmp_path):
    from cbir.models import load_extractor

    bar = torch.zeros(1, 3, 32, 32)
    bar[..., :8, :20] = 1.0  # an image with an up: a bright bar along one edge, off its centre
    turned = [bar.rot90(1, (2, 3)), bar.rot90(2, (2, 3)), bar.flip(3), bar.transpose(2, 3)]
    # which of those each count embeds as the image itself: none; the mirror image; the rotations; all; and with
    # no --tta (today's default, None here) the rotations: a tile turned on its side is the same query
    expected = {0: [False] * 4, 2: [False, False, True, False], 4: [True, True, False, False], 8: [True] * 4,
                None: [True, True, False, False]}
    for tta, alike_expected in expected.items():
        chosen = {} if tta is None else {"tta": tta}
        train(tiny_config(colours, tmp_path / f"{tta}.pt", num_epochs=1, pretrained=False, **chosen))
        extractor = load_extractor(tmp_path / f"{tta}.pt").eval()
        with torch.inference_mode():
            vectors = [extractor(image) for image in (bar, *turned)]
        alike = [torch.allclose(vectors[0], v, atol=1e-5) for v in vectors[1:]]
        assert alike == alike_expected, (tta, alike)
    assert [train_cli.parser().parse_args(["--training_data", "x", *flags]).tta
            for flags in ([], ["--tta"], ["--tta", "0"], ["--tta", "2"])] == [4, 8, 0, 2]
    with pytest.raises(CbirError, match="unknown tta 3; choose one of: 0, 2, 4, 8"):
        train(tiny_config(colours, tmp_path / "3.pt", tta=3))
    assert not (tmp_path / "3.pt").exists()


def test_the_cli_defaults_are_the_package_defaults():
    args = train_cli.parser().parse_args(["--training_data", "x"])
    for key, value in vars(TrainConfig(training_data="x")).items():
        if hasattr(args, key) and key not in ("model", "loss"):
            assert getattr(args, key) == value, key


def test_a_checkpoint_trained_with_the_old_defaults_still_loads_and_embeds_the_same(tmp_path):
    """tests/data/today_defaults_tiny.pt was written by cbir-train before the recipe changed (lr 1e-4, no
    scheduler, the thesis's augmentation), with the vectors that code gave four fixed images beside it."""
    from cbir.data import Sample
    from cbir.embedding import embed

    reference = json.loads((ROOT / "tests" / "data" / "today_defaults_tiny.json").read_text())
    rng = np.random.default_rng(reference["seed"])
    probes = []
    for i in range(4):
        path = tmp_path / f"probe{i}.png"
        Image.fromarray(rng.integers(0, 256, reference["shape"], dtype=np.uint8)).save(path)
        probes.append(Sample(str(path), "probe"))
    extractor = load_extractor(ROOT / "tests" / "data" / "today_defaults_tiny.pt")
    stored = torch.load(ROOT / "tests" / "data" / "today_defaults_tiny.pt", weights_only=True)
    assert stored["training"]["train_config"]["lr"] == 1e-4 and stored["training"]["train_config"]["scheduler"] is None
    vectors = embed(extractor, probes, num_workers=0).vectors
    assert np.allclose(vectors, np.array(reference["vectors"], dtype=np.float32), atol=1e-5)
