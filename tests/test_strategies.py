"""Strategies: which parameters train, BatchNorm behaviour, learning-rate groups."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_BACKBONE
from torch import nn

from transferlab.errors import TransferlabError
from transferlab.models.backbones import create_backbone
from transferlab.models.transfer import TransferModel
from transferlab.training.strategies import _batchnorms, apply_strategy, param_groups, set_train_mode


@pytest.fixture
def model() -> TransferModel:
    torch.manual_seed(0)
    backbone = create_backbone(TINY_BACKBONE, "none")
    backbone.preprocess = backbone.preprocess.with_input_size(64)
    return TransferModel(backbone, num_classes=3, head="16", dropout=0.0)


def _bn_param_ids(model) -> set[int]:
    return {id(p) for norm in _batchnorms(model.backbone) for p in norm.parameters()}


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_freeze_trains_only_the_head(model):
    apply_strategy(model, "freeze")
    assert _trainable(model) == {f"head.{n}" for n, _ in model.head.named_parameters()}
    assert _trainable(model.head)  # the head does train


def test_unfreeze_bn_frozen_trains_all_but_batchnorm(model):
    apply_strategy(model, "unfreeze", bn="frozen")
    bn_ids = _bn_param_ids(model)
    assert bn_ids  # the tiny backbone has BatchNorm layers
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) not in bn_ids), name


def test_unfreeze_bn_train_trains_everything(model):
    apply_strategy(model, "freeze")  # requires_grad is set both ways, not only switched on
    apply_strategy(model, "unfreeze", bn="train")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("n", [1, 2])
def test_partial_trains_the_last_n_blocks(model, n):
    backbone = model.backbone
    params = dict(backbone.named_parameters())
    expected = sum(params[name].numel() for block in backbone.blocks[-n:] for name in block)
    apply_strategy(model, "partial", unfreeze_last=n, bn="train")
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == expected
    assert 0 < trainable < sum(p.numel() for p in backbone.parameters())
    # the earliest block stays frozen, the last one trains
    assert not params[backbone.blocks[0][0]].requires_grad
    assert params[backbone.blocks[-1][0]].requires_grad
    assert all(p.requires_grad for p in model.head.parameters())


def test_partial_more_blocks_train_more(model):
    counts = []
    for n in (1, 2, 3):
        apply_strategy(model, "partial", unfreeze_last=n, bn="train")
        counts.append(sum(p.numel() for p in model.backbone.parameters() if p.requires_grad))
    assert counts[0] < counts[1] < counts[2]


def test_partial_bn_frozen_keeps_batchnorm_of_trained_blocks_fixed(model):
    apply_strategy(model, "partial", unfreeze_last=1, bn="frozen")
    bn_ids = _bn_param_ids(model)
    last = set(model.backbone.blocks[-1])
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == (name in last and id(p) not in bn_ids), name


@pytest.mark.parametrize("n", [0, 7, -1])
def test_partial_out_of_range_is_a_user_error(model, n):
    assert len(model.backbone.blocks) == 6
    with pytest.raises(TransferlabError, match=f"--unfreeze-last {n}: .* has 6 blocks"):
        apply_strategy(model, "partial", unfreeze_last=n)


def test_bad_strategy_and_bn_are_user_errors(model):
    with pytest.raises(TransferlabError, match="--strategy"):
        apply_strategy(model, "melt")
    with pytest.raises(TransferlabError, match="--bn"):
        apply_strategy(model, "unfreeze", bn="sometimes")


def _running_means(model) -> list[torch.Tensor]:
    return [norm.running_mean.clone() for norm in _batchnorms(model.backbone)]


def _train_steps(model, bn: str, steps: int = 2) -> None:
    groups = param_groups(model, 1e-2, 1.0, 0.0)
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        set_train_mode(model, bn)
        x = torch.randn(4, 3, 32, 32, generator=generator) * 3 + 1
        y = torch.randint(0, 3, (4,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_batchnorm_frozen_keeps_running_statistics(model):
    apply_strategy(model, "unfreeze", bn="frozen")
    before = _running_means(model)
    weights_before = model.backbone.blocks[-1][0]
    w0 = dict(model.named_parameters())[f"backbone.{weights_before}"].clone()
    _train_steps(model, "frozen")
    assert all(not norm.training for norm in _batchnorms(model.backbone))
    assert all(torch.equal(a, b) for a, b in zip(before, _running_means(model), strict=True))
    # ... while the convolutions did train
    assert not torch.equal(w0, dict(model.named_parameters())[f"backbone.{weights_before}"])


def test_batchnorm_train_updates_running_statistics(model):
    apply_strategy(model, "unfreeze", bn="train")
    before = _running_means(model)
    _train_steps(model, "train")
    assert any(not torch.equal(a, b) for a, b in zip(before, _running_means(model), strict=True))


def test_set_train_mode_freeze_keeps_backbone_in_eval(model):
    apply_strategy(model, "freeze")
    set_train_mode(model, "train")
    assert model.head.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())


def test_param_groups_learning_rates_and_weight_decay(model):
    apply_strategy(model, "unfreeze", bn="train")
    groups = param_groups(model, lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.05)
    head_ids = {id(p) for p in model.head.parameters()}
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    seen = []
    for group in groups:
        ids = {id(p) for p in group["params"]}
        assert ids <= head_ids or ids <= backbone_ids
        assert group["lr"] == pytest.approx(1e-3 if ids <= head_ids else 1e-4)
        for p in group["params"]:
            assert group["weight_decay"] == (0.0 if p.ndim == 1 else 0.05)
        seen += list(ids)
    assert len(seen) == len(set(seen))  # no parameter twice
    assert set(seen) == head_ids | backbone_ids  # every trainable parameter once
    assert any(g["weight_decay"] == 0.0 for g in groups) and any(g["weight_decay"] == 0.05 for g in groups)


def test_param_groups_skip_frozen_and_head_only(model):
    apply_strategy(model, "partial", unfreeze_last=1, bn="frozen")
    groups = param_groups(model, lr=1e-2, backbone_lr_mult=0.5, weight_decay=0.01)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted({g["lr"] for g in groups}) == pytest.approx([5e-3, 1e-2])
    head_only = param_groups(model, lr=1e-2, backbone_lr_mult=0.5, weight_decay=0.01, head_only=True)
    assert {id(p) for g in head_only for p in g["params"]} == {id(p) for p in model.head.parameters()}
    assert {g["lr"] for g in head_only} == {1e-2}
