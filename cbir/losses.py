"""Training losses: one registry, one call shape, ``loss(embeddings, labels, indices_tuple=None)``.

As in pytorch-metric-learning (PML), ``embeddings`` is (B, D), ``labels`` (B,), and ``indices_tuple`` names the
rows that pair up: triplets ``(anchor, positive, negative)`` or pairs ``(anchor, positive, anchor, negative)``.
When it is None, the loss's own miner draws them from the batch:

* group losses (``margin``, ``proxy_nca_pp``, ``softmax``, ``softtriple``) score a class-balanced batch; the margin
  loss mines negatives by distance-weighted sampling, the proxy losses need no tuples;
* pair losses (``triplet``, ``BCE``, ``contrastive``, ``cosine``, ``infonce``) score Deep-Ranking style rows that a
  :class:`RowMiner` draws: each anchor, a positive of its class, a negative of another. Created with
  ``augmented=True`` the batch holds two augmented views of each image (the first views, then the second ones)
  and the positive is the anchor's own second view; with ``non_contrastive=True`` there are positive pairs only.

Proxies, class weights, centres and the margin loss's β are ``nn.Parameter``s of the loss module, handed to the
optimiser through ``param_groups`` with their own learning rate: the thesis never registered them, so they never
trained. Their sizes follow ``num_classes`` and ``num_features``.

Where PML has the loss it is used as is; our own code is limited to what it lacks (the BCE pair loss, the row
miner, the pair → PML index plumbing) and to the distance-weighted miner, whose PML version departs from the
paper's reference code (see ``DistanceWeightedMiner``).

Every loss is computed in float32 with autocast off: PML casts its proxies to the embeddings' dtype in place, which
would turn the master weights into float16 under mixed precision, and ProxyNCA++'s softmax (logits down to -36)
underflows in float16, where PML then silently drops the sample.
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning.utils import common_functions as pml_c_f
from torch import nn

from cbir.errors import ParameterError

__all__ = [
    "LOSSES",
    "LossSpec",
    "MetricLoss",
    "RowMiner",
    "DistanceWeightedMiner",
    "create_loss",
    "list_losses",
    "row_losses",
    "check_row_options",
]


def _fp32(device: torch.device):
    """Autocast off for the loss: see the module docstring."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to switch off
        return nullcontext()


def _check_batch(name: str, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2 or labels.dim() != 1 or len(labels) != len(embeddings):
        raise ValueError(f"{name} loss expects embeddings (B, D) and labels (B,); "
                         f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")


# --------------------------------------------------------------------------------------------------------------
# the loss module
# --------------------------------------------------------------------------------------------------------------


class MetricLoss(nn.Module):
    """A training loss with its own learnable parameters (if any) and its own miner (if any).

    ``forward(embeddings, labels, indices_tuple=None)``; ``param_groups`` gives the optimiser groups for the loss's
    own parameters; ``reseed`` makes the miner's draws follow from a seed.
    """

    name: str = ""

    def __init__(self, miner: nn.Module | None = None):
        super().__init__()
        self.miner = miner

    def param_groups(self, *, lr_proxies: float, beta_lr: float) -> list[dict]:
        """Optimiser groups for this loss's own learnable parameters; [] when it has none."""
        return []

    def reseed(self, seed: int) -> None:
        """Seed the miner's own generator (a miner drawing from torch's global one follows ``torch.manual_seed``)."""
        generator = getattr(self.miner, "generator", None)
        if generator is not None:
            generator.manual_seed(seed)


class GroupLoss(MetricLoss):
    """A PML loss (and optional PML-shaped miner) over a labelled batch."""

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__(miner)
        self.name = name
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        _check_batch(self.name, embeddings, labels)
        with _fp32(embeddings.device):
            embeddings = F.normalize(embeddings.float(), dim=1)
            labels = labels.to(device=embeddings.device, dtype=torch.long, non_blocking=True)
            if indices_tuple is None and self.miner is not None:
                indices_tuple = self.miner(embeddings, labels)
            return self.loss(embeddings, labels, indices_tuple)


class ProxyLoss(GroupLoss):
    """A group loss whose proxies / class weights / centres train at ``lr_proxies``."""

    def param_groups(self, *, lr_proxies: float, beta_lr: float) -> list[dict]:
        # weight_decay 0: these weights are only ever used L2-normalised, so decay cannot regularise them; it only
        # shrinks their norm, which silently raises their effective step size.
        return [{"params": list(self.loss.parameters()), "lr": lr_proxies, "weight_decay": 0.0}]


class MarginLoss(GroupLoss):
    """Margin loss with a learnable per-class β, trained at ``beta_lr`` without weight decay."""

    def param_groups(self, *, lr_proxies: float, beta_lr: float) -> list[dict]:
        # Decay would pull β, a distance threshold, towards 0; Wu et al. train it with its own rate and no decay.
        return [{"params": list(self.loss.parameters()), "lr": beta_lr, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------------
# rows for the pair losses
# --------------------------------------------------------------------------------------------------------------


class RowMiner(nn.Module):
    """Deep-Ranking style rows of a balanced batch: per anchor one positive and (unless ``non_contrastive``) one
    negative, drawn at random from its own generator (see :meth:`MetricLoss.reseed`).

    Positive: another image of the anchor's class; with ``augmented``, the batch is the first views of B images
    followed by their second views, anchors are first views and the positive is the anchor's second view (row
    ``anchor + B``). Negative: an image of another class, among the first views. Anchors lacking either are left
    out. Returns PML triplets ``(anchor, positive, negative)``, or pairs ``(anchor, positive, empty, empty)`` when
    non-contrastive.

    The draw runs on the CPU from the labels alone: given CPU labels, no device synchronisation.
    """

    def __init__(self, *, augmented: bool = False, non_contrastive: bool = False):
        super().__init__()
        self.augmented = augmented
        self.non_contrastive = non_contrastive
        self.generator = torch.Generator()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        labels = labels.cpu()
        views = len(labels) // 2 if self.augmented else len(labels)
        labels = labels[:views]
        same = labels[:, None] == labels[None, :]
        negative_mask = ~same
        positive_mask = same & ~torch.eye(len(labels), dtype=torch.bool)
        usable = torch.ones(len(labels), dtype=torch.bool) if self.augmented else positive_mask.any(1)
        if not self.non_contrastive:
            usable &= negative_mask.any(1)
        anchor = usable.nonzero().squeeze(1)
        if len(anchor) == 0:
            positive = negative = anchor
        else:
            positive = anchor + views if self.augmented else torch.multinomial(
                positive_mask[anchor].float(), 1, generator=self.generator).squeeze(1)
            negative = anchor[:0] if self.non_contrastive else torch.multinomial(
                negative_mask[anchor].float(), 1, generator=self.generator).squeeze(1)
        rows = (anchor, positive, anchor[:0], negative) if self.non_contrastive else (anchor, positive, negative)
        return tuple(r.to(embeddings.device, non_blocking=True) for r in rows)


def _rows(indices_tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(anchor, positive, negative or None) rows from PML triplets or from pairs without negatives."""
    if len(indices_tuple) == 3:
        return indices_tuple
    anchor, positive, negative_anchor, negative = indices_tuple
    if len(negative):
        raise ValueError("pair losses take triplets (anchor, positive, negative) or positive pairs only "
                         "(anchor, positive, empty, empty)")
    return anchor, positive, None


class PairLoss(MetricLoss):
    """A loss over (anchor, positive, negative) rows; without negatives it uses the positive pairs only."""

    def __init__(self, *, augmented: bool = False, non_contrastive: bool = False):
        super().__init__(RowMiner(augmented=augmented, non_contrastive=non_contrastive))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        _check_batch(self.name, embeddings, labels)
        if indices_tuple is None:
            indices_tuple = self.miner(embeddings, labels)
        anchor, positive, negative = _rows(indices_tuple)
        if len(anchor) == 0:  # no usable anchor in this batch: a step that changes nothing
            return embeddings.sum() * 0.0
        with _fp32(embeddings.device):
            # Rows are gathered first and normalised after, each by itself, as the loss sees them.
            return self.pair_loss(F.normalize(embeddings[anchor].float(), dim=1),
                                  F.normalize(embeddings[positive].float(), dim=1),
                                  None if negative is None else F.normalize(embeddings[negative].float(), dim=1))

    def pair_loss(self, anchor, positive, negative):  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------------------
# margin loss with distance-weighted sampling
# --------------------------------------------------------------------------------------------------------------


class DistanceWeightedMiner(pml_miners.DistanceWeightedMiner):
    """Distance-weighted negative sampling, Wu et al. 2017, "Sampling Matters in Deep Embedding Learning", §4.

    Each (anchor, positive) pair of the batch gets one negative drawn with probability ∝ 1 / q(d), q being the
    density of pairwise distances between points spread uniformly on the unit sphere in D dimensions; distances are
    clipped below at ``cutoff`` (0.5) first, and negatives at ``nonzero_loss_cutoff`` (1.4) or beyond, which give no
    loss, are never drawn.

    PML's miner (which this keeps the interface and parameters of) departs from the paper's reference code
    (github.com/chaoyuaw/incubator-mxnet, example/gluon/embedding_learning/model.py) in two ways, fixed here:

    * an anchor whose every negative lies beyond ``nonzero_loss_cutoff`` is dropped with its positive pairs, so
      once the classes separate the loss stops pulling positives together (and can be 0 for a whole batch); the
      reference falls back to uniform sampling, as here (among negatives only);
    * the log-weights are shifted by one maximum over the whole matrix, including pairs that can never be drawn;
      in 128-d a pair at distance 1.99 has a log-weight of ~200, and every real candidate underflows to 0.
      Here each row is shifted by its own maximum over its candidates.
    """

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        dim = float(embeddings.size(1))
        dist = self.distance(embeddings, ref_emb).clamp(min=self.cutoff)
        # log(1 / q(d)); q(d) ∝ d^(D-2) (1 - d²/4)^((D-3)/2)
        log_weights = (2.0 - dim) * torch.log(dist) - ((dim - 3.0) / 2.0) * torch.log(
            (1.0 - 0.25 * dist.pow(2)).clamp(min=1e-12)
        )
        negative = labels.unsqueeze(1) != ref_labels.unsqueeze(0)
        candidate = negative & (dist < self.nonzero_loss_cutoff) & torch.isfinite(log_weights)
        log_weights = log_weights.masked_fill(~candidate, float("-inf"))
        row_max = log_weights.max(dim=1, keepdim=True).values
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        weights = torch.exp(log_weights - row_max)
        # no candidate: uniform over the anchor's negatives (the reference code's fallback)
        no_candidate = ~candidate.any(dim=1, keepdim=True)
        weights = torch.where(no_candidate, negative.to(weights.dtype), weights)

        same = ~negative
        if ref_emb is embeddings:
            same = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        has_negative = negative.any(dim=1, keepdim=True)
        anchor_idx, positive_idx = torch.nonzero(same & has_negative, as_tuple=True)
        if len(anchor_idx) == 0:
            empty = torch.empty(0, dtype=torch.long, device=labels.device)
            return empty, empty, empty
        negative_idx = torch.multinomial(weights[anchor_idx], 1, replacement=True).squeeze(1)
        return anchor_idx, positive_idx, negative_idx


def _margin(num_classes: int, num_features: int) -> MetricLoss:
    # Wu et al. 2017: margin 0.2, β learnable per class from 1.2, ν = 0 (no β regulariser).
    loss = pml_losses.MarginLoss(margin=0.2, nu=0.0, beta=1.2, learn_beta=True, num_classes=num_classes)
    miner = DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4)
    return MarginLoss("margin", loss, miner)


# --------------------------------------------------------------------------------------------------------------
# proxy / classification losses (PML)
# --------------------------------------------------------------------------------------------------------------


def _proxy_nca_pp(num_classes: int, num_features: int) -> MetricLoss:
    # ProxyNCA++ (Teh et al., ECCV 2020): softmax over -||3x̂ - 3p̂||² across all proxies, the positive one included.
    # ||3x̂ - 3p̂||² = 9 ||x̂ - p̂||², so PML's ProxyNCALoss on normalised squared Euclidean distance with
    # softmax_scale 9 is exactly it; "norm 3" is the paper's temperature T = 1/9 (no separate temperature).
    # Proxies start as randn / 8, as in the authors' code (github.com/euwern/proxynca_pp).
    loss = pml_losses.ProxyNCALoss(
        num_classes=num_classes,
        embedding_size=num_features,
        softmax_scale=9.0,
        weight_init_func=pml_c_f.TorchInitWrapper(nn.init.normal_, std=1.0 / 8.0),
    )
    return ProxyLoss("proxy_nca_pp", loss)


def _softmax(num_classes: int, num_features: int) -> MetricLoss:
    # Normalised softmax (Zhai & Wu 2019, "Classification is a strong baseline for deep metric learning"):
    # cosine logits over L2-normalised class weights, temperature 0.05.
    loss = pml_losses.NormalizedSoftmaxLoss(num_classes=num_classes, embedding_size=num_features, temperature=0.05)
    return ProxyLoss("softmax", loss)


def _softtriple(num_classes: int, num_features: int) -> MetricLoss:
    # SoftTriple (Qian et al., ICCV 2019): λ 20, γ 0.1, δ (margin) 0.01, K 10 centres per class; τ 0.2 is the weight
    # of the centre-merging regulariser, which PML provides as SparseCentersRegularizer.
    centers_per_class = 10
    loss = pml_losses.SoftTripleLoss(
        num_classes=num_classes,
        embedding_size=num_features,
        centers_per_class=centers_per_class,
        la=20.0,
        gamma=0.1,
        margin=0.01,
        weight_regularizer=pml_regularizers.SparseCentersRegularizer(num_classes, centers_per_class),
        weight_reg_weight=0.2,
    )
    return ProxyLoss("softtriple", loss)


# --------------------------------------------------------------------------------------------------------------
# pair losses
# --------------------------------------------------------------------------------------------------------------


def _pml_pairs(batch: int, with_negative: bool, device) -> tuple[torch.Tensor, ...]:
    """PML pair indices into cat([anchor, positive, negative]): (anchor, positive) and (anchor, negative) rows."""
    rows = torch.arange(batch, device=device)
    if with_negative:
        return rows, rows + batch, rows, rows + 2 * batch
    empty = rows[:0]
    return rows, rows + batch, empty, empty


class TripletLoss(PairLoss):
    """Triplet margin loss (torch), margin 0.2 on Euclidean distance: fits unit vectors (distances in [0, 2])."""

    def __init__(self, margin: float = 0.2, **rows):
        super().__init__(**rows)
        self.name = "triplet"
        self.criterion = nn.TripletMarginLoss(margin=margin, p=2.0)

    def pair_loss(self, anchor, positive, negative):
        if negative is None:  # positives only: the positive term of the triplet loss, d(a, p)
            return F.pairwise_distance(anchor, positive, p=2.0).mean()
        return self.criterion(anchor, positive, negative)


class BCEPairLoss(PairLoss):
    """Binary cross-entropy on the pair distance (own code: PML has no such loss).

    The similarity logit is ``scale · (threshold − d)``: a pair at distance 1 (cosine 0.5) is a coin toss, a
    positive at distance 0 scores logit 10, a negative at √2 (orthogonal) logit −4 (loss 0.016), so negatives that
    are merely orthogonal are left alone, unlike a threshold at √2 that would push every negative forever.
    """

    def __init__(self, threshold: float = 1.0, scale: float = 10.0, **rows):
        super().__init__(**rows)
        self.name = "BCE"
        self.threshold = threshold
        self.scale = scale

    def pair_loss(self, anchor, positive, negative):
        logits = self.scale * (self.threshold - F.pairwise_distance(anchor, positive, p=2.0))
        targets = torch.ones_like(logits)
        if negative is not None:
            neg_logits = self.scale * (self.threshold - F.pairwise_distance(anchor, negative, p=2.0))
            logits = torch.cat([logits, neg_logits])
            targets = torch.cat([targets, torch.zeros_like(neg_logits)])
        return F.binary_cross_entropy_with_logits(logits, targets)


class ContrastivePairLoss(PairLoss):
    """Contrastive loss (Hadsell et al. 2006) via PML: d(a, p) for positives, max(0, m − d(a, n)) for negatives.

    Margin m = 1.0 on Euclidean distance between unit vectors (cosine 0.5, also PML's default): negatives stop
    being pushed once that far apart. The thesis used 5, larger than any distance between unit vectors (at most 2),
    so every negative pair kept pushing forever and dominated the loss.
    """

    def __init__(self, margin: float = 1.0, **rows):
        super().__init__(**rows)
        self.name = "contrastive"
        self.criterion = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)

    def pair_loss(self, anchor, positive, negative):
        parts = [anchor, positive] + ([negative] if negative is not None else [])
        indices = _pml_pairs(len(anchor), negative is not None, anchor.device)
        return self.criterion(torch.cat(parts), indices_tuple=indices)


class CosinePairLoss(PairLoss):
    """Cosine embedding loss (torch): 1 − cos(a, p) for positives, max(0, cos(a, n)) for negatives (margin 0)."""

    def __init__(self, margin: float = 0.0, **rows):
        super().__init__(**rows)
        self.name = "cosine"
        self.criterion = nn.CosineEmbeddingLoss(margin=margin)

    def pair_loss(self, anchor, positive, negative):
        ones = torch.ones(len(anchor), device=anchor.device)
        if negative is None:
            return self.criterion(anchor, positive, ones)
        return self.criterion(
            torch.cat([anchor, anchor]), torch.cat([positive, negative]), torch.cat([ones, -ones])
        )


class InfoNCELoss(PairLoss):
    """NT-Xent / InfoNCE (SimCLR, Chen et al. 2020) via PML NTXentLoss, temperature 0.07.

    Row i's anchor and positive are the positive pair (both ways, as in SimCLR); every other embedding of the batch
    (other rows' anchors and positives, and the negatives when given) is a negative. With ``negative=None`` the
    in-batch negatives alone remain, which is what keeps this loss from collapsing in the non-contrastive mode.
    """

    def __init__(self, temperature: float = 0.07, **rows):
        super().__init__(**rows)
        self.name = "infonce"
        self.criterion = pml_losses.NTXentLoss(temperature=temperature)

    def pair_loss(self, anchor, positive, negative):
        batch = len(anchor)
        rows = torch.arange(batch, device=anchor.device)
        parts, labels = [anchor, positive], [rows, rows]
        if negative is not None:  # each explicit negative its own label: never anyone's positive
            parts.append(negative)
            labels.append(rows + batch)
        return self.criterion(torch.cat(parts), torch.cat(labels))


# --------------------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: ``build(num_classes, num_features, **row_options)``, and whether it scores rows a
    :class:`RowMiner` draws (then it takes the row options ``augmented`` and ``non_contrastive``)."""

    build: Callable[..., MetricLoss]
    draws_rows: bool = False


LOSSES: dict[str, LossSpec] = {
    "margin": LossSpec(_margin),
    "proxy_nca_pp": LossSpec(_proxy_nca_pp),
    "softmax": LossSpec(_softmax),
    "softtriple": LossSpec(_softtriple),
    "triplet": LossSpec(lambda num_classes, num_features, **rows: TripletLoss(**rows), draws_rows=True),
    "BCE": LossSpec(lambda num_classes, num_features, **rows: BCEPairLoss(**rows), draws_rows=True),
    "contrastive": LossSpec(lambda num_classes, num_features, **rows: ContrastivePairLoss(**rows), draws_rows=True),
    "cosine": LossSpec(lambda num_classes, num_features, **rows: CosinePairLoss(**rows), draws_rows=True),
    "infonce": LossSpec(lambda num_classes, num_features, **rows: InfoNCELoss(**rows), draws_rows=True),
}


def list_losses() -> list[str]:
    """Every loss name ``create_loss`` accepts; ``margin`` (the default) first."""
    return list(LOSSES)


def row_losses() -> list[str]:
    """The losses that take ``augmented`` and ``non_contrastive``."""
    return [name for name, spec in LOSSES.items() if spec.draws_rows]


def _check_name(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ParameterError(f"unknown {{loss}} '{name}'; choose one of: {', '.join(list_losses())}", "loss")
    return LOSSES[name]


def check_row_options(name: str, *, augmented: bool = False, non_contrastive: bool = False) -> None:
    """Refuse the row options for a loss that draws no rows (they would be silently ignored)."""
    given = [option for option, on in (("augmented", augmented), ("non_contrastive", non_contrastive)) if on]
    if given and not _check_name(name).draws_rows:
        marked = " and ".join("{" + option + "}" for option in given)
        raise ParameterError(f"{marked} apply to the pair losses ({', '.join(row_losses())}), not to "
                             f"{{loss}} {name}", *given, "loss")


def create_loss(name: str, *, num_classes: int, num_features: int, augmented: bool = False,
                non_contrastive: bool = False) -> MetricLoss:
    """The loss ``name`` sized for ``num_classes`` classes and ``num_features``-d embeddings; the row options go
    to the miner of a pair loss (see the module docstring)."""
    spec = _check_name(name)
    check_row_options(name, augmented=augmented, non_contrastive=non_contrastive)
    for what, value in (("num_classes", num_classes), ("num_features", num_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ParameterError(f"{{{what}}} must be a positive integer, got {value!r}", what)
    rows = {"augmented": augmented, "non_contrastive": non_contrastive} if spec.draws_rows else {}
    loss = spec.build(int(num_classes), int(num_features), **rows)
    loss.name = name
    return loss
