"""Rank frozen candidates by k-fold cross-validation of the product's own head on cached features.

Each fold trains the head exactly as ``--strategy freeze`` does (same head, optimizer, schedule, epochs,
label smoothing), on the other folds' features, and scores the held-out fold; every training image is scored
once by a head that never saw it. On cached features a fold costs milliseconds to seconds, so this is the
cheap, low-noise ranking step; only the best candidates are fine-tuned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..data.heldout import Folds
from ..models.heads import make_head
from ..options import parse_head_spec
from ..runtime.precision import Policy, torch_threads
from ..training.batches import BatchOrder, feature_batches
from ..training.loop import LoopSpec, TrainLoop, make_optimizer
from ..training.strategies import param_groups


@dataclass
class CrossValidation:
    """Out-of-fold figures of one head on one feature set."""

    accuracy: float
    log_loss: float
    fold_accuracies: list[float]
    seconds: float
    n_images: int

    @property
    def standard_error(self) -> float:
        """Binomial standard error of the out-of-fold accuracy (every training image is one trial)."""
        return math.sqrt(max(self.accuracy * (1 - self.accuracy), 1e-12) / max(1, self.n_images))


def fit_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int, head: str, cfg) -> nn.Module:
    """A head trained on ``features`` with the freeze recipe of ``cfg`` (a resolved TrainConfig whose
    ``epochs`` are the head's), fp32 on the CPU, seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    module = make_head(features.shape[1], parse_head_spec(head), num_classes, cfg.dropout)
    groups = param_groups(SimpleNamespace(head=module, backbone=None), cfg.lr, cfg.backbone_lr_mult,
                          cfg.weight_decay, head_only=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    order = BatchOrder(cfg.batch_size, cfg.seed, "head")
    spec = LoopSpec(module, feature_batches(features, labels, order), loss_fn, make_optimizer(cfg.optimizer, groups,
                    cfg.lr), cfg.epochs, Policy("cpu", "fp32", channels_last=False), "head", cfg.warmup_epochs,
                    seed=cfg.seed)
    TrainLoop(spec).fit()
    return module.eval()


def cross_validate(features: torch.Tensor, labels: torch.Tensor, num_classes: int, head: str, cfg,
                   folds: Folds) -> CrossValidation:
    """Out-of-fold accuracy and log-loss of ``head`` trained with ``cfg``'s freeze recipe."""
    started = time.perf_counter()
    features = features.float()
    probabilities = torch.zeros(len(labels), num_classes)
    accuracies = []
    with torch_threads(1), torch.no_grad():
        for train, held in folds.splits:
            train_idx, held_idx = torch.as_tensor(train), torch.as_tensor(held)
            with torch.enable_grad():
                module = fit_head(features[train_idx], labels[train_idx], num_classes, head, cfg)
            probs = torch.softmax(module(features[held_idx]), 1)
            probabilities[held_idx] = probs
            accuracies.append(float((probs.argmax(1) == labels[held_idx]).float().mean()))
    correct = probabilities.argmax(1) == labels
    picked = probabilities[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return CrossValidation(float(correct.float().mean()), float(-picked.log().mean()), accuracies,
                           time.perf_counter() - started, len(labels))
