"""cbir.losses: every loss trains, every learnable loss parameter trains, sizes follow the data."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbir.losses import (
    LOSSES,
    DistanceWeightedMiner,
    MetricLoss,
    create_loss,
    list_losses,
    RowMiner,
    row_losses,
)

ALL = ["margin", "proxy_nca_pp", "softmax", "softtriple", "triplet", "BCE", "contrastive", "cosine", "infonce"]
PAIRS = ["triplet", "BCE", "contrastive", "cosine", "infonce"]
GROUP = [n for n in ALL if n not in PAIRS]

NUM_CLASSES, NUM_FEATURES, IN_FEATURES, PER_CLASS = 4, 16, 32, 6
# the spec's defaults (--lr, --lr_proxies, --beta_lr)
LR, LR_PROXIES, BETA_LR = 1e-4, 1e-5, 5e-4


def make_problem(seed: int = 0):
    """4 separable classes in 32-d (class centres + noise), and a linear 32 → 16 embedding to train."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(NUM_CLASSES, IN_FEATURES, generator=gen)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    inputs = centres[labels] + 1.5 * torch.randn(len(labels), IN_FEATURES, generator=gen)
    torch.manual_seed(seed)
    net = torch.nn.Linear(IN_FEATURES, NUM_FEATURES)
    return net, inputs, labels


def triplet_rows(labels: torch.Tensor):
    """Fixed Deep-Ranking style rows: positive = next image of the anchor's class, negative = one of the next class."""
    index = torch.arange(len(labels))
    positive = (index // PER_CLASS) * PER_CLASS + (index + 1) % PER_CLASS
    negative = (index + PER_CLASS) % len(labels)
    assert torch.all(labels[positive] == labels) and torch.all(labels[negative] != labels)
    return positive, negative


def loss_value(loss: MetricLoss, net, inputs, labels, contrastive: bool = True) -> torch.Tensor:
    """The loss on the one call shape; pair losses get fixed rows (PML triplets, or positive pairs only)."""
    embeddings = F.normalize(net(inputs), dim=1)
    if loss.name not in PAIRS:
        return loss(embeddings, labels)
    anchor = torch.arange(len(labels))
    positive, negative = triplet_rows(labels)
    rows = (anchor, positive, negative) if contrastive else (anchor, positive, anchor[:0], anchor[:0])
    return loss(embeddings, labels, rows)


def on_rows(loss: MetricLoss, anchor, positive, negative=None) -> torch.Tensor:
    """A pair loss on explicit rows, through the one call shape: the rows stacked, PML indices into them."""
    embeddings = torch.cat([anchor, positive] + ([negative] if negative is not None else []))
    rows = torch.arange(len(anchor))
    indices = (rows, rows + len(rows), rows + 2 * len(rows)) if negative is not None else (rows, rows + len(rows),
                                                                                           rows[:0], rows[:0])
    return loss(embeddings, torch.zeros(len(embeddings), dtype=torch.long), indices)


def optimiser(loss: MetricLoss, net, lr=LR, lr_proxies=LR_PROXIES, beta_lr=BETA_LR):
    groups = [{"params": list(net.parameters())}] + loss.param_groups(lr_proxies=lr_proxies, beta_lr=beta_lr)
    return torch.optim.Adam(groups, lr=lr, weight_decay=4e-4)


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_names_and_kinds():
    assert list_losses() == ALL and list(LOSSES) == ALL
    assert row_losses() == PAIRS
    for name in ALL:
        loss = create_loss(name, num_classes=NUM_CLASSES, num_features=NUM_FEATURES)
        assert isinstance(loss, MetricLoss) and isinstance(loss, torch.nn.Module)
        assert isinstance(loss.miner, RowMiner) == (name in PAIRS)


def test_row_options_are_refused_for_losses_that_draw_no_rows():
    with pytest.raises(ValueError, match="augmented apply to the pair losses"):
        create_loss("margin", num_classes=3, num_features=8, augmented=True)
    loss = create_loss("triplet", num_classes=3, num_features=8, augmented=True, non_contrastive=True)
    assert loss.miner.augmented and loss.miner.non_contrastive


def test_row_miner_draws_valid_rows_reproducibly():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3])  # class 3 has no positive: never an anchor
    embeddings = torch.zeros(len(labels), 4)
    miner = RowMiner()
    miner.generator.manual_seed(5)
    anchor, positive, negative = miner(embeddings, labels)
    assert anchor.tolist() == [0, 1, 2, 3, 4, 5]
    assert (labels[positive] == labels[anchor]).all() and (positive != anchor).all()
    assert (labels[negative] != labels[anchor]).all()
    miner.generator.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(miner(embeddings, labels), (anchor, positive, negative)))
    # two views: the first views of 3 images, then their second views; the positive is the anchor's second view
    views = torch.tensor([0, 1, 1, 0, 1, 1])
    anchor, positive, negative = RowMiner(augmented=True)(torch.zeros(6, 4), views)
    assert anchor.tolist() == [0, 1, 2] and positive.tolist() == [3, 4, 5]
    assert (views[negative] != views[anchor]).all() and (negative < 3).all()
    pairs = RowMiner(non_contrastive=True)(embeddings, labels)
    assert len(pairs) == 4 and len(pairs[2]) == len(pairs[3]) == 0


def test_unknown_loss_is_one_line_listing_the_names():
    with pytest.raises(ValueError) as info:
        create_loss("arcface", num_classes=3, num_features=8)
    message = str(info.value)
    assert "\n" not in message and "arcface" in message
    assert all(name in message for name in ALL)


@pytest.mark.parametrize("bad", [0, -1, 2.5, None])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        create_loss("softmax", num_classes=bad, num_features=8)
    with pytest.raises(ValueError):
        create_loss("softmax", num_classes=3, num_features=bad)


# ---------------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", ALL)
def test_a_few_adam_steps_lower_the_loss(name):
    net, inputs, labels = make_problem()
    loss = create_loss(name, num_classes=NUM_CLASSES, num_features=NUM_FEATURES)
    opt = optimiser(loss, net, lr=1e-2, lr_proxies=1e-2, beta_lr=1e-2)
    torch.manual_seed(1)  # the margin loss's negatives are drawn at random: same draws before and after
    before = loss_value(loss, net, inputs, labels).item()
    assert before > 0
    for step in range(25):
        value = loss_value(loss, net, inputs, labels)
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
    torch.manual_seed(1)
    after = loss_value(loss, net, inputs, labels).item()
    assert after < 0.7 * before, f"{name}: {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", PAIRS)
def test_pair_losses_without_negatives(name):
    """--non_contrastive: positives only; the loss is a finite scalar with gradients, and training lowers it."""
    net, inputs, labels = make_problem()
    loss = create_loss(name, num_classes=NUM_CLASSES, num_features=NUM_FEATURES)
    opt = optimiser(loss, net, lr=1e-2)
    before = loss_value(loss, net, inputs, labels, contrastive=False)
    assert before.dim() == 0 and torch.isfinite(before) and before.item() > 0
    for _ in range(25):
        value = loss_value(loss, net, inputs, labels, contrastive=False)
        opt.zero_grad()
        value.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
        opt.step()
    after = loss_value(loss, net, inputs, labels, contrastive=False).item()
    assert after < before.item()


@pytest.mark.parametrize("name", ALL)
def test_every_learnable_loss_parameter_is_registered_and_changes_after_one_step(name):
    """The thesis's fault: proxies / centres never reached the optimiser, so they never trained."""
    net, inputs, labels = make_problem()
    loss = create_loss(name, num_classes=NUM_CLASSES, num_features=NUM_FEATURES)
    groups = loss.param_groups(lr_proxies=LR_PROXIES, beta_lr=BETA_LR)
    own = list(loss.parameters())
    registered = [p for group in groups for p in group["params"]]
    assert {id(p) for p in registered} == {id(p) for p in own}
    if name in PAIRS:
        assert own == [] and groups == []
        return
    assert own, f"{name} should have learnable parameters"
    expected_lr = BETA_LR if name == "margin" else LR_PROXIES
    assert all(group["lr"] == expected_lr for group in groups)
    if name == "margin":
        assert all(group["weight_decay"] == 0 for group in groups)

    before = [p.detach().clone() for p in own]
    opt = optimiser(loss, net)  # the spec's default learning rates
    value = loss_value(loss, net, inputs, labels)
    opt.zero_grad()
    value.backward()
    opt.step()
    for old, new in zip(before, own):
        assert not torch.equal(old, new.detach()), f"{name}: a parameter of shape {tuple(new.shape)} did not move"


@pytest.mark.parametrize("num_classes, num_features", [(3, 10), (7, 24)])
def test_sizes_follow_classes_and_features(num_classes, num_features):
    shapes = {}
    for name in GROUP:
        loss = create_loss(name, num_classes=num_classes, num_features=num_features)
        shapes[name] = [tuple(p.shape) for p in loss.parameters()]
        embeddings = F.normalize(torch.randn(4 * num_classes, num_features), dim=1)
        labels = torch.arange(num_classes).repeat(4)
        assert torch.isfinite(loss(embeddings, labels))
    assert shapes["margin"] == [(num_classes,)]
    # layouts differ between the PML classes (and versions): compare as sorted shapes
    assert [sorted(s) for s in shapes["proxy_nca_pp"]] == [sorted((num_classes, num_features))]
    assert [sorted(s) for s in shapes["softmax"]] == [sorted((num_classes, num_features))]
    assert [sorted(s) for s in shapes["softtriple"]] == [sorted((num_classes * 10, num_features))]


def test_margin_beta_starts_at_1_2_per_class():
    loss = create_loss("margin", num_classes=5, num_features=8)
    (beta,) = list(loss.parameters())
    assert torch.allclose(beta.detach(), torch.full((5,), 1.2))


def test_losses_stay_float32_under_autocast():
    """Mixed precision: PML would cast the proxies themselves to the half dtype; the loss keeps them float32."""
    net, inputs, labels = make_problem()
    for name in ALL:
        loss = create_loss(name, num_classes=NUM_CLASSES, num_features=NUM_FEATURES)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            embeddings = net(inputs)
            assert embeddings.dtype == torch.bfloat16
            value = loss_value(loss, lambda x: x, embeddings, labels)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert all(p.dtype == torch.float32 for p in loss.parameters()), name


# ---------------------------------------------------------------------------------------------------- semantics


def test_distance_weighted_miner_draws_only_close_negatives():
    torch.manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    embeddings = F.normalize(torch.randn(16, 32), dim=1)
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    anchor, positive, negative = miner(embeddings, labels)
    assert len(anchor) == 16 * 3  # every (anchor, positive) pair of the batch, one negative each
    assert torch.all(labels[anchor] == labels[positive]) and torch.all(anchor != positive)
    assert torch.all(labels[anchor] != labels[negative])
    distances = torch.cdist(embeddings, embeddings)
    has_close = ((distances < 1.4) & (labels[:, None] != labels[None, :])).any(dim=1)
    drawn = distances[anchor, negative]
    assert torch.all(drawn[has_close[anchor]] < 1.4)


def test_margin_loss_keeps_pulling_positives_when_negatives_are_far():
    """Paper's reference code: no negative within 1.4 → uniform negative, positives still pulled together.

    (PML's own miner drops such anchors, so the loss of this batch would be 0 and the loose classes stay loose.)
    """
    torch.manual_seed(0)
    dim = 128
    direction = F.normalize(torch.randn(dim), dim=0)
    spread = 0.11 * torch.randn(8, dim)
    embeddings = torch.cat([direction + spread[:4], -direction + spread[4:]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    unit = F.normalize(embeddings, dim=1)
    distances = torch.cdist(unit, unit)
    assert distances[:4, 4:].min() > 1.4 and distances[:4, :4].max() > 1.0  # far negatives, loose positives
    loss = create_loss("margin", num_classes=2, num_features=dim)
    assert loss(embeddings, labels).item() > 0


def test_margin_loss_on_a_batch_without_negatives_is_zero_not_a_crash():
    loss = create_loss("margin", num_classes=3, num_features=8)
    embeddings = torch.randn(6, 8, requires_grad=True)
    value = loss(embeddings, torch.zeros(6, dtype=torch.long))
    value.backward()
    assert value.item() == 0 and embeddings.grad is not None


def test_bce_pair_loss_values():
    loss = create_loss("BCE", num_classes=2, num_features=2)
    a = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0]])  # d = 0 → logit 10
    n = torch.tensor([[0.0, 1.0]])  # d = √2 → logit 10 (1 − √2)
    logit_n = 10 * (1 - 2**0.5)
    expected = 0.5 * (F.softplus(torch.tensor(-10.0)) + F.softplus(torch.tensor(logit_n)))
    assert torch.allclose(on_rows(loss, a, p, n), expected, atol=1e-5)
    assert torch.allclose(on_rows(loss, a, p), F.softplus(torch.tensor(-10.0)), atol=1e-5)


def test_contrastive_margin_fits_unit_vectors():
    loss = create_loss("contrastive", num_classes=2, num_features=2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # d = 0 and d = √0.8
    far = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])  # d = 2 and √2: both beyond the margin → no negative loss
    assert torch.allclose(on_rows(loss, a, p, far), torch.tensor(0.8**0.5), atol=1e-4)  # mean over non-zero positives
    near = torch.tensor([[0.8, 0.6], [0.8, 0.6]])  # d = √0.4 < 1 → pushed
    assert on_rows(loss, a, p, near).item() > on_rows(loss, a, p, far).item()


def test_infonce_is_simclr_nt_xent():
    torch.manual_seed(0)
    a, p = F.normalize(torch.randn(6, 8), dim=1), F.normalize(torch.randn(6, 8), dim=1)
    z = torch.cat([a, p])
    logits = z @ z.T / 0.07
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(6, 12), torch.arange(0, 6)])
    expected = F.cross_entropy(logits, targets)
    loss = create_loss("infonce", num_classes=2, num_features=8)
    assert torch.allclose(on_rows(loss, a, p), expected, atol=1e-4)
    n = F.normalize(torch.randn(6, 8), dim=1)
    assert on_rows(loss, a, p, n).item() > on_rows(loss, a, p).item()  # explicit negatives join the denominator


def test_pair_loss_shape_mismatch_is_refused():
    loss = create_loss("triplet", num_classes=2, num_features=8)
    with pytest.raises(ValueError):
        loss(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    rows = torch.arange(2)
    with pytest.raises(ValueError, match="triplets"):  # pairs with negatives: not a shape the pair losses take
        loss(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), (rows, rows + 2, rows, rows + 2))
