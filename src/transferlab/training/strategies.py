"""Strategies: which backbone parameters train, how BatchNorm behaves, learning-rate groups, and the
stages of a training.

- ``freeze`` (:class:`Freeze`): the backbone is fixed (feature extraction); only the head trains, on
  cached features.
- ``unfreeze`` (:class:`Unfreeze`): fastai's ``fine_tune`` recipe: the head first on cached features, then
  every layer on pixels, the backbone at ``lr * backbone_lr_mult`` (its earlier blocks lower with
  ``layer_decay`` < 1: :func:`param_groups`).
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


def block_depths(backbone) -> dict[str, int]:
    """Backbone parameter name -> how many ``layer_decay`` steps its learning rate lies below the last block's.

    Block i of n (``backbone.blocks``, input to output) is ``n - 1 - i`` steps down: the last block 0, the
    first ``n - 1``. A parameter in no block takes the depth of the nearest block before it in parameter
    order (e.g. a final conv/norm after the last block learns like the last block); one before the first
    block (the stem) lies one step below the first block, ``n``: the smallest learning rate.
    """
    n = len(backbone.blocks)
    block_of = {name: i for i, block in enumerate(backbone.blocks) for name in block}
    depths, depth = {}, n
    for name, _ in backbone.named_parameters():
        if name in block_of:
            depth = n - 1 - block_of[name]
        depths[name] = depth
    return depths


def _decay_split(params: list, lr: float, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation parameters (1-D tensors), as timm and fastai do."""
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": ps, "lr": lr, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]


def param_groups(model, lr: float, backbone_lr_mult: float, weight_decay: float,
                 head_only: bool = False, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with one learning-rate rule (the backbone only unless ``head_only``):

    - the head at ``lr``;
    - the backbone's last block at ``lr * backbone_lr_mult``, and each earlier block ``layer_decay`` times the
      block after it: ``lr * backbone_lr_mult * layer_decay ** depth`` with the depth of :func:`block_depths`
      (the stem, before the first block, one step lower still; parameters after the last block as the last
      block). ``layer_decay`` 1 (the default): the whole backbone at ``lr * backbone_lr_mult``.

    Only parameters that require gradients; per learning rate (head first, then the backbone from the input
    on) one group with weight decay and one without it for 1-D tensors.
    """
    groups = _decay_split([p for p in model.head.parameters() if p.requires_grad], lr, weight_decay)
    if head_only:
        return groups
    depths = block_depths(model.backbone)
    by_lr: dict[float, list] = {}
    for name, param in model.backbone.named_parameters():
        if param.requires_grad:
            by_lr.setdefault(lr * backbone_lr_mult * layer_decay ** depths[name], []).append(param)
    for group_lr, params in by_lr.items():
        groups += _decay_split(params, group_lr, weight_decay)
    return groups
