"""Strategies: which backbone parameters train, how BatchNorm behaves, and learning-rate groups.

- ``freeze``: the backbone is fixed (feature extraction); only the head trains.
- ``unfreeze``: every layer trains (fine-tuning), the backbone at ``lr * backbone_lr_mult``.
- ``partial``: the last ``unfreeze_last`` backbone blocks train, the earlier ones stay fixed.

BatchNorm ``frozen`` means eval mode (running statistics unchanged) and fixed affine parameters, even
while the rest of the backbone trains; ``train`` lets BatchNorm layers of trainable blocks update.
"""

from __future__ import annotations

from torch import nn

from .errors import TransferlabError

STRATEGIES = ("freeze", "unfreeze", "partial")
BN_MODES = ("frozen", "train")


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def trainable_backbone_params(backbone, strategy: str, unfreeze_last: int) -> set[str]:
    """Names (relative to the backbone) of the parameters the strategy trains."""
    if strategy == "freeze":
        return set()
    if strategy == "unfreeze":
        return {name for name, _ in backbone.named_parameters()}
    if strategy == "partial":
        blocks = backbone.blocks
        if not 1 <= unfreeze_last <= len(blocks):
            raise TransferlabError(f"--unfreeze-last {unfreeze_last}: {backbone.name} has {len(blocks)} blocks; "
                                   f"choose 1..{len(blocks)}")
        return {name for block in blocks[-unfreeze_last:] for name in block}
    raise TransferlabError(f"--strategy {strategy}: choose one of {', '.join(STRATEGIES)}")


def apply_strategy(model, strategy: str, unfreeze_last: int = 1, bn: str = "frozen") -> None:
    """Set ``requires_grad`` on the model (backbone + head) for a strategy and BatchNorm mode."""
    if bn not in BN_MODES:
        raise TransferlabError(f"--bn {bn}: choose one of {', '.join(BN_MODES)}")
    trainable = trainable_backbone_params(model.backbone, strategy, unfreeze_last)
    for name, param in model.backbone.named_parameters():
        param.requires_grad = name in trainable
    if bn == "frozen":
        for norm in _batchnorms(model.backbone):
            for param in norm.parameters():
                param.requires_grad = False
    for param in model.head.parameters():
        param.requires_grad = True


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
