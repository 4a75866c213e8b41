"""The fine-tuning recipe, each piece off by default: layer-wise learning-rate decay, an EMA of the weights,
Mixup/CutMix, augmentation policies and the crop scale. Each test checks the piece's mechanism on tiny
generated images and the small random-init backbone."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, TINY_BACKBONE, make_class_folders
from safetensors.torch import load_file

import transferlab
from transferlab import TrainConfig, TransferlabError
from transferlab.models.backbones import create_backbone
from transferlab.models.preprocessing import PreprocessConfig, TrainAugment
from transferlab.models.transfer import TransferModel
from transferlab.training.callbacks import EmaWeights, EpochLogger, MixBatches
from transferlab.training.loop import Callback, _Totals
from transferlab.training.strategies import apply_strategy, param_groups

FINETUNE = dict(TINY, strategy="unfreeze", head_epochs=1, epochs=3, cache_dir="none", export=False)


@pytest.fixture
def model() -> TransferModel:
    torch.manual_seed(0)
    backbone = create_backbone(TINY_BACKBONE, "none")
    backbone.preprocess = backbone.preprocess.with_input_size(64)
    return TransferModel(backbone, num_classes=3, head="16", dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """7 images per class: 14 training images without validation (batches of 8 and 6), 10 or 11 with
    val_size 0.25 (an odd last batch)."""
    return make_class_folders(tmp_path_factory.mktemp("recipe") / "data", per_class=7)


def _lr_by_param(groups: list[dict]) -> dict[int, float]:
    return {id(p): group["lr"] for group in groups for p in group["params"]}


def _saved(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# ------------------------------------------------------------------------------------------ layer decay

def test_layer_decay_lowers_the_lr_block_by_block_towards_the_stem(model):
    apply_strategy(model, "unfreeze", bn="train")
    lr, mult = 1e-3, 0.1
    lrs = _lr_by_param(param_groups(model, lr, mult, 0.05, layer_decay=0.5))
    params = dict(model.backbone.named_parameters())
    assert {lrs[id(p)] for p in model.head.parameters()} == {lr}
    per_block = []
    for block in model.backbone.blocks:
        block_lrs = {lrs[id(params[name])] for name in block}
        assert len(block_lrs) == 1
        per_block.append(block_lrs.pop())
    assert all(a < b for a, b in zip(per_block, per_block[1:], strict=False))  # strictly rising to the output
    assert per_block[-1] == pytest.approx(lr * mult)
    assert per_block[-2] == pytest.approx(lr * mult * 0.5)
    stem = [name for name in params if "conv_stem" in name or name.startswith("model.bn1.")]
    assert stem and all(lrs[id(params[n])] == min(lrs.values()) for n in stem)  # the stem: the smallest lr


def test_layer_decay_parameters_outside_blocks_follow_the_stem_and_last_block_rule(model):
    backbone = model.backbone
    after_last = ["model.conv_head.weight", "model.bn2.weight", "model.bn2.bias"]
    backbone.blocks = backbone.blocks[1:-1] + [[n for n in backbone.blocks[-1] if n not in after_last]]
    stem = ["model.conv_stem.weight", "model.bn1.weight", "model.bn1.bias"]
    apply_strategy(model, "unfreeze", bn="train")
    lrs = _lr_by_param(param_groups(model, 1e-3, 0.1, 0.0, layer_decay=0.5))
    params = dict(backbone.named_parameters())
    first, last = lrs[id(params[backbone.blocks[0][0]])], lrs[id(params[backbone.blocks[-1][0]])]
    assert [lrs[id(params[n])] for n in stem] == pytest.approx([first * 0.5] * 3)  # one step below the first block
    assert {lrs[id(params[n])] for n in after_last} == {last}  # after the last block: as the last block
    assert min(lrs.values()) == pytest.approx(first * 0.5)


def _todays_groups(model, lr, backbone_lr_mult, weight_decay):
    """param_groups before layer decay existed: head at lr, the whole backbone at lr * backbone_lr_mult."""
    groups = []
    for module, group_lr in ((model.head, lr), (model.backbone, lr * backbone_lr_mult)):
        params = [p for p in module.parameters() if p.requires_grad]
        for ps, wd in (([p for p in params if p.ndim > 1], weight_decay), ([p for p in params if p.ndim <= 1], 0.0)):
            if ps:
                groups.append({"params": ps, "lr": group_lr, "weight_decay": wd})
    return groups


@pytest.mark.parametrize("strategy, bn", [("unfreeze", "train"), ("unfreeze", "frozen"), ("partial", "frozen")])
def test_layer_decay_one_gives_exactly_todays_groups(model, strategy, bn):
    apply_strategy(model, strategy, bn=bn, unfreeze_last=2)
    groups = param_groups(model, 1e-3, 0.1, 0.05, layer_decay=1.0)
    expected = _todays_groups(model, 1e-3, 0.1, 0.05)
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in groups] == \
        [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in expected]
    assert {g["lr"] for g in groups} == {1e-3, 1e-3 * 0.1}
    assert param_groups(model, 1e-3, 0.1, 0.05) == groups  # the default is off


def test_layer_decay_keeps_no_weight_decay_on_1d_parameters(model):
    apply_strategy(model, "unfreeze", bn="train")
    groups = param_groups(model, 1e-3, 0.1, 0.05, layer_decay=0.75)
    assert len({g["lr"] for g in groups}) == len(model.backbone.blocks) + 1
    for group in groups:
        assert group["weight_decay"] == (0.0 if group["params"][0].ndim <= 1 else 0.05)
        assert len({p.ndim <= 1 for p in group["params"]}) == 1
    n = sum(len(g["params"]) for g in groups)
    assert n == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------------ EMA

class Weights(Callback):
    """Records the fine-tuning stage's raw weights and the EMA's at the end of each epoch and of the stage
    (order 1: after_fit before EmaWeights copies the average into the module)."""

    order = 1

    def __init__(self):
        self.raw = self.ema = None
        self.ema_per_epoch: dict[int, dict] = {}

    def _ema(self, loop):
        return next((cb for cb in loop.callbacks if isinstance(cb, EmaWeights)), None)

    def after_epoch(self, loop, row):
        if loop.stage == "finetune" and self._ema(loop) is not None:
            self.ema_per_epoch[row["epoch"]] = copy.deepcopy(self._ema(loop).module.state_dict())

    def after_fit(self, loop):
        if loop.stage == "finetune":
            self.raw = copy.deepcopy(loop.module.state_dict())
            if self._ema(loop) is not None:
                self.ema = copy.deepcopy(self._ema(loop).module.state_dict())


def test_ema_weights_are_what_the_run_saves(data, tmp_path):
    weights = Weights()
    transferlab.train(data, out=tmp_path / "ema", callbacks=[weights], **dict(FINETUNE, ema=0.9))
    saved = _saved(tmp_path / "ema")
    assert _equal(saved, weights.ema)
    assert not _equal(saved, weights.raw)
    trained = [k for k in saved if k.endswith(".weight") and saved[k].ndim > 1]
    assert any(not torch.equal(saved[k], weights.raw[k]) for k in trained)
    config = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert config["train"]["ema"] == 0.9


def test_without_ema_the_raw_weights_are_saved(data, tmp_path):
    weights = Weights()
    transferlab.train(data, out=tmp_path / "plain", callbacks=[weights], **FINETUNE)
    assert weights.ema is None
    assert _equal(_saved(tmp_path / "plain"), weights.raw)


class ValidationOf(Callback):
    """Per fine-tuning epoch: the validation of the EMA's weights, and of the raw weights put into it."""

    order = 2

    def __init__(self):
        self.rows: list[tuple] = []

    def after_epoch(self, loop, row):
        if loop.stage != "finetune":
            return
        ema = next(cb for cb in loop.callbacks if isinstance(cb, EmaWeights))
        average = copy.deepcopy(ema.module.state_dict())
        ema.module.load_state_dict(loop.module.state_dict())
        raw = loop.spec.validate()
        ema.module.load_state_dict(average)
        self.rows.append(((row["val_loss"], row["val_acc"]), loop.spec.validate(), raw))


def test_validation_and_keep_best_see_the_ema_weights(data, tmp_path):
    weights, validation = Weights(), ValidationOf()
    out = tmp_path / "run"
    transferlab.train(data, out=out, callbacks=[weights, validation], **dict(FINETUNE, ema=0.9, val_size=0.25))
    assert all(row == ema for row, ema, _ in validation.rows)  # the history's validation is the EMA's
    assert any(row[0] != raw[0] for row, _, raw in validation.rows)  # ... not the raw weights'
    kept = json.loads((out / "metrics.json").read_text())["selected_epoch"]
    assert kept["stage"] == "finetune"
    assert _equal(_saved(out), weights.ema_per_epoch[kept["epoch"]])  # the best epoch's average


@pytest.mark.parametrize("recipe", [{"ema": 0.9}, {"mixup": 0.2, "cutmix": 1.0, "augment_policy": "trivial"}],
                         ids=["ema", "mixing"])
def test_a_resumed_run_ends_like_the_uninterrupted_one(data, tmp_path, monkeypatch, recipe):
    options = dict(FINETUNE, epochs=4, val_size=0.25, **recipe)
    transferlab.train(data, out=tmp_path / "reference", **options)
    original = EpochLogger.after_epoch

    def interrupt(self, loop, row):
        original(self, loop, row)
        if loop.stage == "finetune" and row["epoch"] == 3:
            raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(EpochLogger, "after_epoch", interrupt)
    with pytest.raises(transferlab.errors.TrainingInterrupted):
        transferlab.train(data, out=out, **options)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["stage"] == "finetune" and state["epoch"] in (1, 2)  # epoch 3 was interrupted
    if "ema" in recipe:  # the average and its update count are in the checkpoint
        assert state["callbacks"]["EmaWeights"]["updates"] > 0
        tensors = load_file(str(out / "checkpoint" / state["tensor_file"]))
        assert any(k.startswith("cb.EmaWeights.ema.") for k in tensors)
    monkeypatch.setattr(EpochLogger, "after_epoch", original)
    transferlab.train(data, out=out, **options)
    assert _equal(_saved(out), _saved(tmp_path / "reference"))


# ----------------------------------------------------------------------------------------- Mixup/CutMix

Y = torch.tensor([0, 1, 2, 0, 2, 1])  # every label differs from its partner in the reversed batch


def test_mixup_targets_are_soft_and_inputs_a_convex_mix():
    mix = MixBatches(mixup=0.4, cutmix=0.0, label_smoothing=0.0, num_classes=3)
    np.random.seed(0)
    x = torch.randn(6, 3, 8, 8)
    mixed, targets = mix(x.clone(), Y)
    assert targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert (targets.max(1).values < 1).all()  # not one-hot
    lam = float(targets[0, Y[0]])
    assert 0 < lam < 1
    onehot = torch.nn.functional.one_hot
    torch.testing.assert_close(targets, lam * onehot(Y, 3).float() + (1 - lam) * onehot(Y.flip(0), 3).float())
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.flip(0))


def test_cutmix_pastes_a_patch_of_the_partner_image():
    mix = MixBatches(mixup=0.0, cutmix=1.0, label_smoothing=0.0, num_classes=3)
    np.random.seed(0)
    x = torch.randn(6, 3, 16, 16)
    mixed, targets = mix(x.clone(), Y)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    lam = float(targets[0, Y[0]])
    assert 0 < lam < 1
    from_partner = (mixed == x.flip(0)).all(1)  # (N, H, W): pixels taken from the reversed batch
    assert ((mixed == x).all(1) | from_partner).all()  # every pixel is one image's or its partner's
    rows, cols = from_partner[0].any(1).nonzero(), from_partner[0].any(0).nonzero()
    patch = from_partner[0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert patch.all()  # one rectangle, the same in every image
    assert (from_partner == from_partner[0]).all()
    assert float(from_partner[0].float().mean()) == pytest.approx(1 - lam)  # the targets weigh the areas


def test_mixing_odd_batches_and_label_smoothing():
    mix = MixBatches(mixup=0.2, cutmix=1.0, label_smoothing=0.1, num_classes=3)
    np.random.seed(1)
    mixed, targets = mix(torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert len(mixed) == len(targets) == 4  # an odd batch leaves out its last sample
    torch.testing.assert_close(targets.sum(1), torch.ones(4))
    assert (targets > 0).all()  # label smoothing gives every class a share
    one, target = mix(torch.randn(1, 3, 8, 8), torch.tensor([2]))
    assert len(one) == 1
    torch.testing.assert_close(target, torch.tensor([[0.1 / 3, 0.1 / 3, 1 - 0.2 / 3]]))


def test_train_accuracy_counts_soft_targets_by_their_largest_class():
    totals = _Totals()
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    totals.add(torch.tensor(0.5), logits, torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]]))
    assert (totals.correct, totals.seen) == (1, 3)


class Targets(Callback):
    def __init__(self):
        self.batches: list[tuple[int, int, int]] = []  # (targets' ndim, batch size, images in the batch)

    def before_step(self, loop):
        if loop.stage == "finetune":
            self.batches.append((loop.y.ndim, len(loop.y), len(loop.x)))


def test_training_with_mixup_and_cutmix_runs_end_to_end(data, tmp_path):
    targets = Targets()
    out = tmp_path / "run"
    run = transferlab.train(data, out=out, callbacks=[targets], **dict(FINETUNE, mixup=0.2, cutmix=1.0, val_size=0.25))
    assert targets.batches and all(ndim == 2 and n % 2 == 0 and n == m for ndim, n, m in targets.batches)
    assert 0 <= run.metrics["accuracy"] <= 1
    history = [line.split(",") for line in (out / "history.csv").read_text().splitlines()[1:]]
    finetune = [row for row in history if row[0] == "finetune"]
    assert len(finetune) == 3 and all(0 <= float(row[3]) <= 1 for row in finetune)  # train_acc
    assert all(np.isfinite(float(row[4])) for row in finetune)  # the validation loss: plain CE on hard labels


# ---------------------------------------------------------------------------------------- augmentation

PRE = PreprocessConfig(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _images(n: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.linspace(0, 255, 36 * 44).reshape(1, 36, 44).expand(3, -1, -1)
    return [(base * (0.5 + 0.1 * i) + torch.randint(0, 40, (3, 36, 44), generator=generator)).clamp(0, 255).to(
        torch.uint8) for i in range(n)]


def _augmented(augment, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return augment(_images())


def test_basic_policy_is_todays_crop_and_flip():
    from torchvision.transforms import InterpolationMode, v2

    today = v2.Compose([v2.RandomResizedCrop(32, scale=(0.35, 1.0), interpolation=InterpolationMode("bilinear"),
                                             antialias=True), v2.RandomHorizontalFlip()])
    torch.manual_seed(3)
    mean, std = torch.tensor(PRE.mean).view(1, 3, 1, 1) * 255, torch.tensor(PRE.std).view(1, 3, 1, 1) * 255
    expected = (torch.stack([today(im) for im in _images()]).float() - mean) / std
    for augment in (TrainAugment(PRE), TrainAugment(PRE, (0.35, 1.0), "basic")):
        assert torch.equal(_augmented(augment), expected)


def test_each_policy_changes_the_images_its_own_way():
    basic = _augmented(TrainAugment(PRE))
    trivial = _augmented(TrainAugment(PRE, policy="trivial"))
    rand = _augmented(TrainAugment(PRE, policy="randaugment"))
    assert trivial.shape == rand.shape == basic.shape
    assert not torch.equal(trivial, basic) and not torch.equal(rand, basic) and not torch.equal(trivial, rand)
    assert torch.equal(trivial, _augmented(TrainAugment(PRE, policy="trivial")))  # seeded: reproducible
    with pytest.raises(ValueError, match="policy"):
        TrainAugment(PRE, policy="autoaugment")


def test_crop_scale_sets_the_smallest_crop():
    crop = TrainAugment(PRE, (0.8, 1.0)).transform.transforms[0]
    assert crop.scale == (0.8, 1.0)
    assert not torch.equal(_augmented(TrainAugment(PRE, (0.8, 1.0))), _augmented(TrainAugment(PRE)))


def test_training_passes_policy_and_crop_scale_to_the_augmentation(data, tmp_path, monkeypatch):
    from transferlab.training import batches

    made = []

    class Recording(TrainAugment):
        def __init__(self, cfg, scale=(0.35, 1.0), policy="basic"):
            made.append((scale, policy))
            super().__init__(cfg, scale, policy)

    monkeypatch.setattr(batches, "TrainAugment", Recording)
    options = dict(FINETUNE, epochs=1, head_epochs=0)
    transferlab.train(data, out=tmp_path / "a", **dict(options, augment_policy="trivial", crop_scale=0.6))
    assert made == [((0.6, 1.0), "trivial")]
    transferlab.train(data, out=tmp_path / "b", **dict(options, augment=False, augment_policy="randaugment"))
    assert made == [((0.6, 1.0), "trivial")]  # --no-augment: no augmentation at all


# -------------------------------------------------------------------------------------- configuration

RECIPE_DEFAULTS = {"layer_decay": 1.0, "ema": 0.0, "mixup": 0.0, "cutmix": 0.0, "augment_policy": "basic",
                   "crop_scale": 0.35, "bn_update": False}


def test_the_recipe_is_off_by_default_and_old_configs_load():
    cfg = TrainConfig(data_dir="x")
    assert {k: getattr(cfg, k) for k in RECIPE_DEFAULTS} == RECIPE_DEFAULTS
    old = {k: v for k, v in cfg.to_dict().items() if k not in RECIPE_DEFAULTS}  # a config.json from before
    assert TrainConfig.from_dict(old) == cfg


@pytest.mark.parametrize("option, value, message", [
    ("layer_decay", 0.0, "--layer-decay 0.0: must be in (0.0, 1.0]"),
    ("layer_decay", 1.5, "--layer-decay 1.5: must be in"),
    ("ema", 1.0, "--ema 1.0: must be in [0.0, 1.0)"),
    ("mixup", -0.1, "--mixup -0.1: must be in"),
    ("cutmix", -1.0, "--cutmix -1.0: must be in"),
    ("crop_scale", 0.0, "--crop-scale 0.0: must be in"),
    ("crop_scale", 1.2, "--crop-scale 1.2: must be in"),
    ("augment_policy", "auto", "--augment-policy auto: choose one of basic, trivial, randaugment"),
])
def test_bad_recipe_values_are_one_line_errors(option, value, message):
    with pytest.raises(TransferlabError, match=re.escape(message)):
        TrainConfig(data_dir="x", **{option: value}).validate()


def test_cli_flags_reach_the_config():
    from transferlab.cli import build_parser

    args = build_parser().parse_args(["train", "d", "--out", "o", "--layer-decay", "0.75", "--ema", "0.999",
                                      "--mixup", "0.2", "--cutmix", "1", "--augment-policy", "trivial",
                                      "--crop-scale", "0.5", "--bn-update"])
    assert {k: getattr(args, k) for k in RECIPE_DEFAULTS} == {"layer_decay": 0.75, "ema": 0.999, "mixup": 0.2,
                                                               "cutmix": 1.0, "augment_policy": "trivial",
                                                               "crop_scale": 0.5, "bn_update": True}
    assert not any(hasattr(build_parser().parse_args(["train", "d", "--out", "o"]), k) for k in RECIPE_DEFAULTS)


# ------------------------------------------------------------------------------ BatchNorm statistics


def test_bn_update_sets_each_running_mean_to_the_training_images_mean(model):
    from transferlab.models.preprocessing import eval_batch
    from transferlab.runtime.precision import Policy
    from transferlab.training.batchnorm import update_batchnorm

    backbone, pre = model.backbone, model.backbone.preprocess
    generator = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, pre.resize_size, pre.resize_size + 8), dtype=torch.uint8,
                            generator=generator) for _ in range(12)]
    first = next(m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen = []
    hook = first.register_forward_pre_hook(lambda _module, args: seen.append(args[0].detach().clone()))
    backbone.eval()
    with torch.no_grad():
        backbone(eval_batch(images, pre))  # what reaches the first BatchNorm (before it, nothing depends on it)
    hook.remove()
    expected = seen[0].mean(dim=(0, 2, 3))
    before = first.running_mean.clone()
    assert update_batchnorm(backbone, images, pre, Policy("cpu", "fp32", channels_last=False), batch_size=4) > 0
    assert not torch.allclose(before, expected, atol=1e-3)
    assert torch.allclose(first.running_mean, expected, atol=1e-4)  # mean of equal batches' means = the mean
    assert first.momentum == 0.1  # restored


def _first_running_mean(run) -> torch.Tensor:
    weights = load_file(str(Path(run.directory) / "model.safetensors"))
    return next(v for k, v in weights.items() if k.endswith("running_mean"))


def test_training_with_bn_update_keeps_the_re_estimated_statistics(data, tmp_path, caplog):
    caplog.set_level("INFO", logger="transferlab")
    options = dict(FINETUNE, epochs=1, head_epochs=1)
    plain = transferlab.train(data, out=tmp_path / "plain", **options)
    updated = transferlab.train(data, out=tmp_path / "updated", bn_update=True, **options)
    again = transferlab.train(data, out=tmp_path / "again", bn_update=True, **options)
    assert not torch.allclose(_first_running_mean(plain), _first_running_mean(updated))
    assert torch.equal(_first_running_mean(updated), _first_running_mean(again))  # deterministic
    assert "BatchNorm statistics of" in caplog.text
    caplog.clear()
    transferlab.train(data, out=tmp_path / "frozen", strategy="freeze", epochs=1, bn_update=True,
                      **{k: v for k, v in options.items() if k not in ("strategy", "epochs", "head_epochs")})
    assert "--bn-update: no effect with --strategy freeze" in caplog.text
