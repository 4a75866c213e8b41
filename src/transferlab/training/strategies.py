"""Strategies: which backbone parameters train, how BatchNorm behaves, learning-rate groups, and the
stages of a training.

- ``freeze`` (:class:`Freeze`): the backbone is fixed (feature extraction); only the head trains, on
  cached features.
- ``unfreeze`` (:class:`Unfreeze`): fastai's ``fine_tune`` recipe: the head first on cached features, then
  every layer on pixels, the backbone at ``lr * backbone_lr_mult``.
- ``partial`` (:class:`Partial`): the same recipe, but only the last ``unfreeze_last`` backbone blocks
  train; the earlier ones stay fixed.

BatchNorm ``frozen`` means eval mode (running statistics unchanged) and fixed affine parameters, even
while the rest of the backbone trains; ``train`` lets BatchNorm layers of trainable blocks update.

A strategy owns whether a run needs decoded pixels at all (:attr:`Strategy.uses_pixels`): a frozen
backbone maps each image to the same vector, so it trains and tests on cached features only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import TransferlabError
from ..options import BN_MODES, STRATEGIES, check_choice


@dataclass(frozen=True)
class Stage:
    """One part of a training: ``head`` (the head alone, on cached features) or ``finetune`` (the
    trainable parts of the whole model, on pixels)."""

    name: str
    epochs: int

    @property
    def on_features(self) -> bool:
        return self.name == "head"


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class Strategy:
    """What trains, and in which stages. Subclasses set :attr:`name` and :meth:`trainable`."""

    name: ClassVar[str]
    uses_pixels: ClassVar[bool] = True  # False: training and testing need only cached features

    def __init__(self, epochs: int, head_epochs: int = 0, bn: str = "frozen", unfreeze_last: int = 1):
        check_choice("bn", bn, BN_MODES)
        self.epochs, self.head_epochs, self.bn, self.unfreeze_last = epochs, head_epochs, bn, unfreeze_last

    def trainable(self, backbone) -> set[str]:
        """Names (relative to the backbone) of the backbone parameters this strategy trains."""
        raise NotImplementedError

    def stages(self) -> list[Stage]:
        """The head first (cheap, on cached features), then fine-tuning; a stage of 0 epochs is left out."""
        return [s for s in (Stage("head", self.head_epochs), Stage("finetune", self.epochs)) if s.epochs > 0]

    def apply(self, model) -> None:
        """Set ``requires_grad`` on the model (backbone + head)."""
        trainable = self.trainable(model.backbone)
        for name, param in model.backbone.named_parameters():
            param.requires_grad = name in trainable
        if self.bn == "frozen":
            for norm in _batchnorms(model.backbone):
                for param in norm.parameters():
                    param.requires_grad = False
        for param in model.head.parameters():
            param.requires_grad = True

    def set_train_mode(self, model) -> None:
        set_train_mode(model, self.bn)


class Freeze(Strategy):
    name = "freeze"
    uses_pixels = False

    def trainable(self, backbone) -> set[str]:
        return set()

    def stages(self) -> list[Stage]:
        return [Stage("head", self.epochs)]


class Unfreeze(Strategy):
    name = "unfreeze"

    def trainable(self, backbone) -> set[str]:
        return {name for name, _ in backbone.named_parameters()}


class Partial(Strategy):
    name = "partial"

    def trainable(self, backbone) -> set[str]:
        blocks = backbone.blocks
        if not 1 <= self.unfreeze_last <= len(blocks):
            raise TransferlabError(f"--unfreeze-last {self.unfreeze_last}: {backbone.name} has {len(blocks)} "
                                   f"blocks; choose 1..{len(blocks)}")
        return {name for block in blocks[-self.unfreeze_last:] for name in block}


STRATEGY_CLASSES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Freeze, Unfreeze, Partial)}
assert tuple(STRATEGY_CLASSES) == STRATEGIES, "options.STRATEGIES and the strategy classes must agree"


def make_strategy(config) -> Strategy:
    """The strategy object of a (resolved) :class:`~transferlab.config.TrainConfig`."""
    check_choice("strategy", config.strategy, STRATEGIES)
    return STRATEGY_CLASSES[config.strategy](config.epochs, config.head_epochs, config.bn, config.unfreeze_last)


def apply_strategy(model, strategy: str, unfreeze_last: int = 1, bn: str = "frozen") -> Strategy:
    """Set ``requires_grad`` on the model for a strategy given by name; returns the strategy object."""
    check_choice("strategy", strategy, STRATEGIES)
    chosen = STRATEGY_CLASSES[strategy](0, 0, bn, unfreeze_last)
    chosen.apply(model)
    return chosen


def set_train_mode(model, bn: str) -> None:
    """``model.train()``, then put back into eval mode what must not update statistics.

    Modules of the backbone without trainable parameters stay in eval mode too (a frozen block's
    BatchNorm statistics and dropout must not change while later blocks train).
    """
    model.train()
    for norm in _batchnorms(model.backbone):
        block_trains = any(p.requires_grad for p in norm.parameters())
        if bn == "frozen" or not block_trains:
            norm.eval()
    if not any(p.requires_grad for p in model.backbone.parameters()):
        model.backbone.eval()


def param_groups(model, lr: float, backbone_lr_mult: float, weight_decay: float,
                 head_only: bool = False) -> list[dict]:
    """Head at ``lr``; trainable backbone parameters at ``lr * backbone_lr_mult`` (unless ``head_only``).

    No weight decay on biases and normalisation parameters (1-D tensors), as timm and fastai do.
    """
    groups = []
    parts = [(model.head, lr)] + ([] if head_only else [(model.backbone, lr * backbone_lr_mult)])
    for module, group_lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": ps, "lr": group_lr, "weight_decay": wd}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return groups
