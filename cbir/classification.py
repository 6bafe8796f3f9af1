"""The classifier variant of the thesis (``classification_acc``): a linear classification head on frozen features,
scored at the class, project and "similar" levels by the same protocols as retrieval.

The head is one linear layer on the extractor's output: the embedding of a trained checkpoint, or the pooled
features of a frozen backbone (``--extractor NAME --num_features 0``). The training split is embedded once and the
head trained on those vectors (centred and scaled by the training mean and spread; cross-entropy, Adam), so no image is
decoded twice and no augmentation is applied.

Scoring reuses :func:`cbir.evaluation.evaluate`: the classifier answers a query with a "result list" of the ``k``
classes of highest logit, best first, in place of the ``k`` nearest images. So, per level:

* ``top1``: the predicted class is a hit (plain accuracy at the class level);
* ``top5``: a hit among the five classes of highest logit (top-5 accuracy);
* ``maj``: reported as n/a. The five classes of a prediction are distinct, so "at least 3 of 5 are the query's
  class" could never happen; the majority vote of a classifier is its top-1. ``mmv5`` (the most common of five
  distinct classes is the first) and ``precision_at_k`` (at most one of five) are n/a for the same reason.
  ``map_at_k`` stays: with one possible hit it is the reciprocal rank of the true class within the top five (MRR@5).

Timings: ``model`` is the embedding of the queries, ``search`` the head's forward pass.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from cbir.embedding import embed, embedding_search
from cbir.errors import CbirError
from cbir.evaluation import evaluate

log = logging.getLogger(__name__)

__all__ = ["ClassifierHead", "train_head", "head_search_function", "classification_accuracy",
           "ClassificationResult", "NOT_APPLICABLE"]

#: Scores that mean nothing for a list of distinct predicted classes; reported as n/a (NaN, ``null`` in JSON).
NOT_APPLICABLE = ("class_maj", "project_maj", "similar_maj", "mmv5", "precision_at_k")


@dataclass
class ClassifierHead:
    """A linear layer over standardised features, and the class of each output."""

    linear: nn.Linear
    class_names: list[str]
    mean: torch.Tensor
    scale: torch.Tensor

    @torch.no_grad()
    def logits(self, features: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        return self.linear((x - self.mean) / self.scale).numpy()

    def predict(self, features: np.ndarray, k: int = 1) -> list[list[str]]:
        """The ``k`` classes of highest logit of each row, best first."""
        logits = self.logits(features)
        k = min(k, logits.shape[1])
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        return [[self.class_names[j] for j in row] for row in order.tolist()]

    def state(self) -> dict:
        """Tensors and names only, for ``torch.save``; read back with ``torch.load(weights_only=True)``."""
        return {"weight": self.linear.weight.detach().clone(), "bias": self.linear.bias.detach().clone(),
                "mean": self.mean.clone(), "scale": self.scale.clone(), "class_names": list(self.class_names)}

    @classmethod
    def from_state(cls, state: dict) -> "ClassifierHead":
        weight = state["weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": state["bias"]})
        return cls(linear.eval(), list(state["class_names"]), state["mean"], state["scale"])


def train_head(features: np.ndarray, labels: list[str], *, num_epochs: int = 30, lr: float = 1e-2,
               batch_size: int = 64, weight_decay: float = 1e-4, seed: int = 0) -> tuple[ClassifierHead, list[dict]]:
    """Train a linear head on fixed features: (head, per-epoch loss and training accuracy)."""
    if num_epochs < 1:
        raise CbirError(f"--num_epochs must be at least 1, got {num_epochs}")
    if batch_size < 1:
        raise CbirError(f"--batch_size must be at least 1, got {batch_size}")
    class_names = sorted(set(labels))
    if len(class_names) < 2:
        raise CbirError(f"a classifier needs at least two classes in the training data, got {len(class_names)}")
    index = {name: i for i, name in enumerate(class_names)}
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.tensor([index[c] for c in labels])
    # Centred and scaled to unit spread, so one learning rate suits unit-length embeddings of any size. One scale
    # for every dimension: per-dimension standardisation would blow up the near-constant (noise) dimensions of
    # high-dimensional pooled features, and a head trained on few images overfits them.
    mean = x.mean(0)
    scale = torch.full_like(mean, max(float((x - mean).std(unbiased=False)), 1e-6))
    x = (x - mean) / scale
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(x.shape[1], len(class_names))
    with torch.no_grad():
        bound = 1.0 / math.sqrt(x.shape[1])
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.zero_()
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    history = []
    for epoch in range(1, num_epochs + 1):
        order = torch.randperm(len(x), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            rows = order[start:start + batch_size]
            logits = linear(x[rows])
            loss = loss_fn(logits, y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
            correct += int((logits.argmax(1) == y[rows]).sum())
        history.append({"epoch": epoch, "loss": total / len(x), "train_accuracy": correct / len(x)})
    linear.eval()
    return ClassifierHead(linear, class_names, mean, scale), history


def head_search_function(extractor, head: ClassifierHead, k: int = 5, *, batch_size: int = 32,
                         num_workers: int | None = None):
    """``search(paths)`` for :func:`cbir.evaluation.evaluate`: the ``k`` classes of highest logit as the results
    (see :func:`cbir.embedding.embedding_search`; ``search`` times the head).

    Each "result" is named ``<predicted class N>`` (never a real path, so it is never taken for the query itself).
    An unreadable query gets no result and counts as a miss.
    """

    def predict(vectors):
        classes = head.predict(vectors, k)
        return [[f"<predicted class {rank + 1}>" for rank in range(len(row))] for row in classes], classes

    return embedding_search(extractor, predict, batch_size=batch_size, num_workers=num_workers)


@dataclass
class ClassificationResult:
    report: Any  # cbir.evaluation.EvalReport, with the n/a scores blanked
    head: ClassifierHead
    history: list[dict] = field(default_factory=list)
    n_train: int = 0
    skipped_train: int = 0
    seconds_train: float = 0.0

    def format(self) -> str:
        last = self.history[-1]
        lines = [f"classification head: {len(self.head.class_names)} classes, trained on {self.n_train} images for "
                 f"{len(self.history)} epochs in {self.seconds_train:.1f} s (last epoch: loss {last['loss']:.4f}, "
                 f"training accuracy {last['train_accuracy']:.3f})"]
        if self.skipped_train:
            lines.append(f"skipped {self.skipped_train} unreadable training images")
        lines.append(self.report.format())
        lines.append("note: a classifier answers with distinct classes: top-5 = the true class among the 5 highest "
                     "logits; maj, mMV@5 and precision@5 are n/a; mAP@5 is the reciprocal rank of the true class")
        return "\n".join(lines)


def _blank_not_applicable(report) -> None:
    for key in NOT_APPLICABLE:
        if key in report.scores:
            report.scores[key] = math.nan
        # Out of the spread and intervals altogether, so no "n/a ± nan" is printed.
        if report.std is not None:
            report.std.pop(key, None)
        if report.ci is not None:
            report.ci.pop(key, None)
        if report.per_class is not None and key in report.per_class.columns:
            report.per_class[key] = math.nan


def require_two_classes(train_samples) -> None:
    """Said before any model is loaded or image embedded: a head needs two classes to tell apart."""
    n_classes = len({s.class_name for s in train_samples})
    if n_classes < 2:
        raise CbirError(f"a classifier needs at least two classes in the training data, got {n_classes}")


def classification_accuracy(extractor, train_samples, query_samples, *, measure: str = "all", k: int = 5,
                            num_epochs: int = 30, lr: float = 1e-2, head_batch_size: int = 64,
                            weight_decay: float = 1e-4, seed: int = 0, batch_size: int = 32,
                            num_workers: int | None = None, **evaluate_kwargs) -> ClassificationResult:
    """Train a head on ``train_samples``' features; score it on ``query_samples`` by the protocol ``measure``.

    ``evaluate_kwargs`` go to :func:`cbir.evaluation.evaluate` (``maps``, ``repeats``, ``max_queries``,
    ``remove_classes``, ``project_name``, ``class_name``, ``bootstrap``...).
    """
    require_two_classes(train_samples)
    start = time.perf_counter()
    embedded = embed(extractor, train_samples, batch_size=batch_size, num_workers=num_workers)
    if not embedded.samples:
        raise CbirError(f"none of the {len(train_samples)} training images could be read")
    head, history = train_head(embedded.vectors, [s.class_name for s in embedded.samples], num_epochs=num_epochs,
                               lr=lr, batch_size=head_batch_size, weight_decay=weight_decay, seed=seed)
    seconds_train = time.perf_counter() - start
    log.info("head trained in %.1f s: training accuracy %.3f", seconds_train, history[-1]["train_accuracy"])

    search = head_search_function(extractor, head, k, batch_size=batch_size, num_workers=num_workers)
    try:
        report = evaluate([s.path for s in query_samples], [s.class_name for s in query_samples], search,
                          measure=measure, k=k, seed=seed, **evaluate_kwargs)
    except ValueError as exc:
        raise CbirError(str(exc)) from None
    _blank_not_applicable(report)
    if len(head.class_names) < k:
        # Fewer classes than k: every prediction list is short by construction, not for want of asking.
        report.notes = [n for n in report.notes if "had fewer than" not in n]
        report.notes.append(f"only {len(head.class_names)} classes: top-{k} holds every class")
    unseen = sorted({s.class_name for s in query_samples} - set(head.class_names))
    if unseen:
        report.notes.append(f"{len(unseen)} query classes are not among the training classes and can never be "
                            f"predicted: {', '.join(unseen)}")
    report.settings["classifier"] = "linear head on frozen features"
    return ClassificationResult(report, head, history, n_train=len(embedded.samples),
                                skipped_train=len(embedded.skipped), seconds_train=seconds_train)
