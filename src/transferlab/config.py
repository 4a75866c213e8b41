"""TrainConfig: every choice a training run depends on, serialised to the run's config.json.

Fields left as ``None`` are filled by :meth:`TrainConfig.resolved` from documented defaults (per
optimizer learning rate and weight decay, per strategy epochs) so config.json always records the
values that were actually used, and ``transferlab train --config`` reproduces the run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

from .backbones import DEFAULT_BACKBONE, POOL_MODES
from .errors import TransferlabError
from .heads import parse_head_spec
from .inference import ENGINES
from .precision import DEVICES, PRECISIONS
from .strategies import BN_MODES, STRATEGIES

OPTIMIZERS = ("adamw", "adam", "sgd")
# SGD (momentum 0.9) needs a larger step than the Adam family; one shared default would make an
# SGD-vs-Adam comparison unfair.
DEFAULT_LR = {"adamw": 1e-3, "adam": 1e-3, "sgd": 1e-2}
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-2, "adam": 0.0, "sgd": 1e-4}
DEFAULT_EPOCHS = {"freeze": 30, "unfreeze": 8, "partial": 8}
CLASS_WEIGHTS = ("none", "balanced")
SAMPLERS = ("shuffle", "balanced")


@dataclass
class TrainConfig:
    data_dir: str = ""
    test_dir: str | None = None
    labels: str | None = None
    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    strategy: str = "unfreeze"
    unfreeze_last: int = 2
    bn: str = "frozen"
    head: str = "256"
    dropout: float = 0.2
    pool: str = "avg"
    image_size: int | None = None
    optimizer: str = "adamw"
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float | None = None
    epochs: int | None = None
    head_epochs: int = 5
    warmup_epochs: float = 1.0
    batch_size: int = 32
    label_smoothing: float = 0.1
    class_weights: str = "none"
    sampler: str = "shuffle"  # balanced: each epoch draws classes equally often (with replacement)
    tta: bool = False  # test-time augmentation for the test split; evaluate/predict inherit it
    augment: bool = True
    test_size: float = 0.2
    val_size: float = 0.0
    patience: int | None = None
    seed: int = 0
    strict: bool = False
    precision: str = "auto"
    device: str = "auto"
    engine: str = "auto"  # inference engine for feature extraction and testing (transferlab.inference)
    cache_dir: str | None = None  # frozen-feature cache; None: the default folder, "none": no cache

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

    def validate(self) -> TrainConfig:
        """Check every option; the error names the command-line option."""
        def choice(option: str, value, allowed) -> None:
            if value not in allowed:
                raise TransferlabError(f"--{option} {value}: choose one of {', '.join(map(str, allowed))}")

        def number(option: str, value, low, high=None, low_open=False, high_open=False) -> None:
            bad = value < low or (low_open and value == low)
            if high is not None:
                bad = bad or value > high or (high_open and value == high)
            if bad:
                interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}" \
                           f"{')' if high_open or high is None else ']'}"
                raise TransferlabError(f"--{option} {value}: must be in {interval}")

        if not self.data_dir:
            raise TransferlabError("DATA_DIR is required")
        choice("strategy", self.strategy, STRATEGIES)
        choice("bn", self.bn, BN_MODES)
        choice("pool", self.pool, POOL_MODES)
        choice("optimizer", self.optimizer, OPTIMIZERS)
        choice("class-weights", self.class_weights, CLASS_WEIGHTS)
        choice("sampler", self.sampler, SAMPLERS)
        choice("precision", self.precision, PRECISIONS)
        choice("device", self.device, DEVICES)
        choice("engine", self.engine, ENGINES)
        parse_head_spec(self.head)
        number("dropout", self.dropout, 0.0, 1.0, high_open=True)
        number("label-smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)
        number("test-size", self.test_size, 0.0, 1.0, low_open=True, high_open=True)
        number("val-size", self.val_size, 0.0, 1.0, high_open=True)
        number("backbone-lr-mult", self.backbone_lr_mult, 0.0)
        number("warmup-epochs", self.warmup_epochs, 0.0)
        number("batch-size", self.batch_size, 1)
        number("head-epochs", self.head_epochs, 0)
        number("unfreeze-last", self.unfreeze_last, 1)
        for option, value in (("lr", self.lr), ("weight-decay", self.weight_decay)):
            if value is not None:
                number(option, value, 0.0, low_open=option == "lr")
        if self.epochs is not None:
            number("epochs", self.epochs, 1 if self.strategy == "freeze" else 0)
        if self.image_size is not None:
            number("image-size", self.image_size, 32, 1024)
        if self.patience is not None:
            number("patience", self.patience, 1)
        return self

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default replaced by the value that will be used."""
        self.validate()
        return self.replace(
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
            weight_decay=self.weight_decay if self.weight_decay is not None
            else DEFAULT_WEIGHT_DECAY[self.optimizer],
            epochs=self.epochs if self.epochs is not None else DEFAULT_EPOCHS[self.strategy],
        )
