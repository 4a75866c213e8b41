"""TrainConfig: every choice a training run depends on, serialised to the run's config.json.

Fields left as ``None`` are filled by :meth:`TrainConfig.resolved` from documented defaults (per
optimizer learning rate and weight decay, per strategy epochs) so config.json always records the
values that were actually used, and ``transferlab train --config`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path

from .data.heldout import default_val_size
from .errors import TransferlabError
from .options import (
    AUGMENT_POLICIES,
    BN_MODES,
    CLASS_WEIGHTS,
    DEFAULT_BACKBONE,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    DEVICES,
    ENGINES,
    MIN_EPOCHS,
    OPTIMIZERS,
    POOL_MODES,
    PRECISIONS,
    SAMPLERS,
    TRAIN_STRATEGIES,
    AugmentPolicy,
    BatchNormMode,
    ClassWeights,
    Device,
    Engine,
    Optimizer,
    Pool,
    Precision,
    Sampler,
    TrainStrategy,
    check_choice,
    parse_head_spec,
)


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; ``None`` as ``high`` means unbounded."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, option: str, value) -> None:
        bad = value < self.low or (self.low_open and value == self.low)
        if self.high is not None:
            bad = bad or value > self.high or (self.high_open and value == self.high)
        if bad:
            left = "(" if self.low_open else "["
            right = ")" if self.high_open or self.high is None else "]"
            high = self.high if self.high is not None else "inf"
            raise TransferlabError(f"--{option} {value}: must be in {left}{self.low}, {high}{right}")


@dataclass
class TrainConfig:
    data_dir: str = ""
    test_dir: str | None = None
    labels: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    strategy: TrainStrategy = "unfreeze"  # or "auto": transferlab.auto searches strategies, backbones, sizes
    unfreeze_last: int = 2
    bn: BatchNormMode = "frozen"
    head: str = "256"
    dropout: float = 0.2
    pool: Pool = "avg"
    image_size: int | None = None
    optimizer: Optimizer = "adamw"
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    layer_decay: float = 1.0  # fine-tuning: each earlier backbone block at this x the next one's lr (1: off)
    weight_decay: float | None = None
    epochs: int | None = None
    head_epochs: int = 5
    warmup_epochs: float = 1.0
    batch_size: int = 32
    label_smoothing: float = 0.1
    mixup: float = 0.0  # fine-tuning: Mixup alpha (timm.data.Mixup; 0: off)
    cutmix: float = 0.0  # fine-tuning: CutMix alpha (0: off)
    bn_update: bool = False  # fine-tuning: re-estimate the backbone's BatchNorm statistics on the training images
    ema: float = 0.0  # fine-tuning: decay of the moving average of the weights that is kept (0: off)
    class_weights: ClassWeights = "none"
    sampler: Sampler = "shuffle"  # balanced: each epoch draws classes equally often (with replacement)
    tta: bool = False  # test-time augmentation for the test split; evaluate/predict inherit it
    augment: bool = True
    augment_policy: AugmentPolicy = "basic"  # after crop + flip: trivial (TrivialAugmentWide), randaugment
    crop_scale: float = 0.35  # smallest area fraction of the random resized crop
    test_size: float = 0.2
    val_size: float | None = None  # None: data.heldout.default_val_size (0.15 for auto, else 0)
    patience: int | None = None
    keep_known: float = 0.95  # with a validation split: share of known images the unknown threshold keeps
    coverage: float = 0.9  # with a validation split: probability that a prediction set holds the true class
    time_limit: float | None = None  # seconds for the whole run (auto: the search and the final training)
    seed: int = 0
    strict: bool = False
    precision: Precision = "auto"
    device: Device = "auto"
    engine: Engine = "auto"  # inference engine for feature extraction and testing (transferlab.runtime.inference)
    cache_dir: str | None = None  # feature cache + image store; None: the default folder, "none": neither
    loader_workers: int = 0  # DataLoader processes that read training images (results do not depend on it)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise TransferlabError(f"config: unknown option '{unknown[0]}'")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def with_absolute_paths(self) -> TrainConfig:
        """Paths in config.json are absolute, so ``train --config`` works from any working directory."""
        absolute = {k: str(Path(v).resolve()) for k in ("data_dir", "test_dir", "labels", "cache_dir")
                    if (v := getattr(self, k)) not in (None, "none")}
        return self.replace(**absolute)

    def validate(self) -> TrainConfig:
        """Check every option against :data:`CHOICES` and :data:`RANGES`; the error names the option."""
        if not self.data_dir:
            raise TransferlabError("DATA_DIR is required")
        for name, allowed in CHOICES.items():
            check_choice(name.replace("_", "-"), getattr(self, name), allowed)
        parse_head_spec(self.head)
        ranges = RANGES | {"epochs": Range(MIN_EPOCHS[self.strategy])}
        for name, allowed in ranges.items():
            value = getattr(self, name)
            if value is not None:
                allowed.check(name.replace("_", "-"), value)
        return self

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default replaced by the value that will be used."""
        self.validate()
        return self.replace(
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
            weight_decay=self.weight_decay if self.weight_decay is not None
            else DEFAULT_WEIGHT_DECAY[self.optimizer],
            epochs=self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.strategy],
            val_size=self.val_size if self.val_size is not None else default_val_size(self.strategy),
        )


# Declarative constraints, checked by TrainConfig.validate (option name = field name with "-" for "_").
CHOICES: dict[str, tuple[str, ...]] = {
    "strategy": TRAIN_STRATEGIES, "bn": BN_MODES, "pool": POOL_MODES, "optimizer": OPTIMIZERS,
    "class_weights": CLASS_WEIGHTS, "sampler": SAMPLERS, "precision": PRECISIONS, "device": DEVICES,
    "engine": ENGINES, "augment_policy": AUGMENT_POLICIES,
}
RANGES: dict[str, Range] = {
    "dropout": Range(0.0, 1.0, high_open=True), "label_smoothing": Range(0.0, 1.0, high_open=True),
    "test_size": Range(0.0, 1.0, low_open=True, high_open=True), "val_size": Range(0.0, 1.0, high_open=True),
    "backbone_lr_mult": Range(0.0), "warmup_epochs": Range(0.0), "batch_size": Range(1), "head_epochs": Range(0),
    "unfreeze_last": Range(1), "lr": Range(0.0, low_open=True), "weight_decay": Range(0.0),
    "layer_decay": Range(0.0, 1.0, low_open=True), "ema": Range(0.0, 1.0, high_open=True), "mixup": Range(0.0),
    "cutmix": Range(0.0), "crop_scale": Range(0.0, 1.0, low_open=True),
    "epochs": Range(0),  # the lower bound depends on the strategy (MIN_EPOCHS); validate() fills it in
    "image_size": Range(32, 1024), "patience": Range(1), "keep_known": Range(0.0, 1.0, low_open=True, high_open=True),
    "coverage": Range(0.0, 1.0, low_open=True, high_open=True), "time_limit": Range(0.0, low_open=True),
    "loader_workers": Range(0, 64),
}
# Options that change how fast a run goes, never its result: a checkpoint or an experiment's run ignores them.
RESULT_NEUTRAL = ("loader_workers",)
