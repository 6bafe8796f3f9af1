"""Training losses: one registry, name → loss module that owns its learnable parameters.

Two call shapes, told apart by ``takes_triplets``:

* group losses (``margin``, ``proxy_nca_pp``, ``softmax``, ``softtriple``) take a class-balanced batch:
  ``loss(embeddings (B, D), labels (B,))``;
* pair losses (``triplet``, ``BCE``, ``contrastive``, ``cosine``, ``infonce``) take Deep-Ranking style tuples:
  ``loss(anchor (B, D), positive (B, D), negative (B, D) or None)``; ``None`` is the non-contrastive mode
  (positive pairs only).

Proxies, class weights, centres and the margin loss's β are ``nn.Parameter``s of the loss module, handed to the
optimiser through ``param_groups`` with their own learning rate: the thesis never registered them, so they never
trained. Their sizes follow ``num_classes`` and ``num_features``.

Where pytorch-metric-learning (PML) has the loss it is used as is; our own code is limited to what it lacks (the
BCE pair loss, the pair → PML index plumbing) and to the distance-weighted miner, whose PML version departs from
the paper's reference code (see ``DistanceWeightedMiner``).

Every loss is computed in float32 with autocast off: PML casts its proxies to the embeddings' dtype in place, which
would turn the master weights into float16 under mixed precision, and ProxyNCA++'s softmax (logits down to -36)
underflows in float16, where PML then silently drops the sample.
"""

from __future__ import annotations

import numbers
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import regularizers as pml_regularizers
from pytorch_metric_learning.utils import common_functions as pml_c_f
from torch import nn

from cbir.errors import CbirError

__all__ = [
    "LOSSES",
    "PAIR_LOSSES",
    "GROUP_LOSSES",
    "MetricLoss",
    "UnknownLossError",
    "DistanceWeightedMiner",
    "create_loss",
    "list_losses",
]


class UnknownLossError(CbirError, ValueError):
    """An unknown ``--loss`` name: a one-line message for the command line (and a ValueError for callers)."""


# --------------------------------------------------------------------------------------------------------------
# base classes
# --------------------------------------------------------------------------------------------------------------


def _fp32(device: torch.device):
    """Autocast off for the loss: see the module docstring."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to switch off
        return nullcontext()


class MetricLoss(nn.Module):
    """A training loss with its own learnable parameters (if any).

    ``takes_triplets`` says which call shape ``forward`` has (see the module docstring); ``param_groups`` gives the
    optimiser groups for the loss's own parameters.
    """

    name: str = ""
    takes_triplets: bool = False

    def param_groups(self, *, lr_proxies: float, beta_lr: float) -> list[dict]:
        """Optimiser groups for this loss's own learnable parameters; [] when it has none."""
        return []


class GroupLoss(MetricLoss):
    """A PML loss (and optional PML-shaped miner) over a labelled batch: ``forward(embeddings, labels)``."""

    takes_triplets = False

    def __init__(self, name: str, loss: nn.Module, miner: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.loss = loss
        self.miner = miner

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or labels.dim() != 1 or len(labels) != len(embeddings):
            raise ValueError(
                f"{self.name} loss expects embeddings (B, D) and labels (B,); "
                f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
            )
        with _fp32(embeddings.device):
            embeddings = F.normalize(embeddings.float(), dim=1)
            labels = labels.to(device=embeddings.device, dtype=torch.long)
            indices_tuple = self.miner(embeddings, labels) if self.miner is not None else None
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


class PairLoss(MetricLoss):
    """A loss over (anchor, positive, negative) rows; ``negative=None`` uses the positive pairs only."""

    takes_triplets = True

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None = None
    ) -> torch.Tensor:
        if anchor.dim() != 2 or positive.shape != anchor.shape or (
            negative is not None and negative.shape != anchor.shape
        ):
            shapes = ", ".join(str(tuple(t.shape)) for t in (anchor, positive, negative) if t is not None)
            raise ValueError(f"{self.name} loss expects anchor, positive (and negative) all (B, D); got {shapes}")
        with _fp32(anchor.device):
            anchor = F.normalize(anchor.float(), dim=1)
            positive = F.normalize(positive.float(), dim=1)
            if negative is not None:
                negative = F.normalize(negative.float(), dim=1)
            return self.pair_loss(anchor, positive, negative)

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


def _pair_indices(batch: int, with_negative: bool, device) -> tuple[torch.Tensor, ...]:
    """PML pair indices into cat([anchor, positive, negative]): (anchor, positive) and (anchor, negative) rows."""
    rows = torch.arange(batch, device=device)
    if with_negative:
        return rows, rows + batch, rows, rows + 2 * batch
    empty = rows[:0]
    return rows, rows + batch, empty, empty


class TripletLoss(PairLoss):
    """Triplet margin loss (torch), margin 0.2 on Euclidean distance: fits unit vectors (distances in [0, 2])."""

    def __init__(self, margin: float = 0.2):
        super().__init__()
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

    def __init__(self, threshold: float = 1.0, scale: float = 10.0):
        super().__init__()
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

    def __init__(self, margin: float = 1.0):
        super().__init__()
        self.name = "contrastive"
        self.criterion = pml_losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)

    def pair_loss(self, anchor, positive, negative):
        parts = [anchor, positive] + ([negative] if negative is not None else [])
        indices = _pair_indices(len(anchor), negative is not None, anchor.device)
        return self.criterion(torch.cat(parts), indices_tuple=indices)


class CosinePairLoss(PairLoss):
    """Cosine embedding loss (torch): 1 − cos(a, p) for positives, max(0, cos(a, n)) for negatives (margin 0)."""

    def __init__(self, margin: float = 0.0):
        super().__init__()
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

    def __init__(self, temperature: float = 0.07):
        super().__init__()
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

LOSSES: dict[str, Callable[[int, int], MetricLoss]] = {
    "margin": _margin,
    "proxy_nca_pp": _proxy_nca_pp,
    "softmax": _softmax,
    "softtriple": _softtriple,
    "triplet": lambda num_classes, num_features: TripletLoss(),
    "BCE": lambda num_classes, num_features: BCEPairLoss(),
    "contrastive": lambda num_classes, num_features: ContrastivePairLoss(),
    "cosine": lambda num_classes, num_features: CosinePairLoss(),
    "infonce": lambda num_classes, num_features: InfoNCELoss(),
}
PAIR_LOSSES = frozenset({"triplet", "BCE", "contrastive", "cosine", "infonce"})
GROUP_LOSSES = frozenset(LOSSES) - PAIR_LOSSES


def list_losses() -> list[str]:
    """Every loss name ``create_loss`` accepts; ``margin`` (the default) first."""
    return list(LOSSES)


def create_loss(name: str, *, num_classes: int, num_features: int) -> MetricLoss:
    """The loss ``name`` sized for ``num_classes`` classes and ``num_features``-d embeddings."""
    if name not in LOSSES:
        raise UnknownLossError(f"unknown loss '{name}'; choose one of: {', '.join(list_losses())}")
    for what, value in (("num_classes", num_classes), ("num_features", num_features)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    loss = LOSSES[name](int(num_classes), int(num_features))
    loss.name = name
    return loss
