"""``--strategy auto``: find the best classifier a pretrained CNN gives on this data, within a time limit.

    rank frozen candidates (backbone x resolution x head) by k-fold cross-validation on cached features of
    the training split -> train the best one frozen (validation split held out) -> fine-tune the best one
    or two, if the time left allows -> keep the fine-tuned model only if it beats the frozen head on the
    validation split -> move the chosen run into OUT, record everything in OUT/auto.json

The test split never ranks anything: it is scored once per finalist (reported in their run directories)
and never read by a decision. The held-out policy is :mod:`transferlab.data.heldout`'s.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import TrainConfig
from ..data.discovery import Sample, Splits, discover
from ..data.heldout import DEFAULT_FOLDS, Folds, stratified_folds
from ..data.images import decode_samples
from ..data.splits import SplitPlan, plan_splits
from ..errors import TransferlabError
from ..features import FeatureCache, FeatureExtractor, cache_root
from ..io.files import check_writable_dir, write_json, write_text
from ..io.rundir import RunDir
from ..models.build import ModelSpec, build_model
from ..options import DEFAULT_EPOCHS
from ..provenance import seed_everything
from ..report.auto import auto_markdown
from ..run import Run
from ..runtime.precision import resolve_policy
from ..training.trainer import Trainer
from .ranking import CrossValidation, cross_validate
from .space import FeatureSet, SearchSpace, forward_gflops, training_speed

log = logging.getLogger("transferlab")

PROBE_IMAGES = 32  # images whose extraction time estimates a feature set's cost
WRITE_SECONDS = 5.0  # writing a run directory (figures, weights) and moving it
MIN_FINETUNE_EPOCHS = 2
AUGMENT_MARGIN = 1.25  # a training step on augmented images vs the probe's random batch
# Under a time limit the ranking may use at most this share of it; the rest stays for the finalists. Where the
# data is far from ImageNet, fine-tuning gains points while frozen candidates differ by about one; an unbounded
# ranking (a cold feature cache, a large dataset) left no time to fine-tune at all (docs/accuracy.md, aid_dev).
RANK_SHARE = 0.5


class Budget:
    """The time limit, counted from the start of the search (None: no limit)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.started = seconds, time.perf_counter()

    @property
    def deadline(self) -> float | None:
        return None if self.seconds is None else self.started + self.seconds

    def left(self) -> float:
        return math.inf if self.seconds is None else self.deadline - time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.started

    def status(self) -> str:
        limit = "" if self.seconds is None else f" of {self.seconds:.0f}"
        return f"{self.used():.0f}{limit} s used"


@dataclass
class Candidate:
    """A frozen candidate and its cross-validation (None with ``skipped``: not evaluated, and why)."""

    backbone: str
    image_size: int
    head: str
    cv: CrossValidation | None = None
    gflops: float | None = None  # one forward pass on one image
    feature_seconds: float = 0.0
    features: dict = field(default_factory=dict)  # from_cache / computed
    skipped: str | None = None

    @property
    def name(self) -> str:
        return f"{self.backbone}@{self.image_size} head {self.head}"

    def key(self) -> tuple[float, float]:
        return (self.cv.accuracy, -self.cv.log_loss) if self.cv else (-1.0, -math.inf)

    def record(self) -> dict:
        cv = self.cv
        return {"backbone": self.backbone, "image_size": self.image_size, "head": self.head,
                "cv_accuracy": cv and round(cv.accuracy, 6), "cv_accuracy_se": cv and round(cv.standard_error, 6),
                "cv_log_loss": cv and round(cv.log_loss, 6), "cv_fold_accuracies": cv and cv.fold_accuracies,
                "cv_seconds": cv and round(cv.seconds, 3),
                "gflops": self.gflops and round(self.gflops, 3), "feature_seconds": round(self.feature_seconds, 3),
                "features": self.features, "skipped": self.skipped}


@dataclass
class Finalist:
    """A run trained on the training split and judged on the validation split."""

    name: str
    config: TrainConfig
    directory: Path
    val_accuracy: float | None = None
    val_loss: float | None = None
    seconds: float = 0.0
    skipped: str | None = None

    def record(self, out: Path) -> dict:
        return {"name": self.name, "strategy": self.config.strategy, "backbone": self.config.backbone,
                "image_size": self.config.image_size, "head": self.config.head, "epochs": self.config.epochs,
                "val_accuracy": self.val_accuracy, "val_loss": self.val_loss, "seconds": round(self.seconds, 3),
                "run_dir": os.path.relpath(self.directory, out), "skipped": self.skipped}


def _features_of(extractor: FeatureExtractor, samples: list[Sample], strict: bool) -> tuple[dict, dict]:
    """All features of ``samples`` (cache first) and the from-cache / computed counts."""
    result = extractor.extract(samples, strict=strict)
    return result.features, {"from_cache": result.hits, "computed": result.misses}


class AutoSearch:
    """The search of :mod:`transferlab.auto.search` for one resolved ``--strategy auto`` configuration.

    ``given``: the option names the user set (they fix their axis of the search space)."""

    def __init__(self, config: TrainConfig, out, *, given: set[str] = frozenset(), callbacks=(), export: bool = True,
                 space: SearchSpace | None = None):
        self.cfg = config.resolved()
        if self.cfg.strategy != "auto":
            raise TransferlabError("AutoSearch needs --strategy auto")
        if self.cfg.val_size == 0:
            raise TransferlabError("--strategy auto needs a validation split: --val-size must be > 0 "
                                   "(default 0.15) or the data must ship a val/ folder")
        self.out = check_writable_dir(out)
        self.run_dir = RunDir(self.out)
        self.space = space or SearchSpace.of(self.cfg, set(given))
        self.callbacks, self.export = list(callbacks), export
        self.budget = Budget(self.cfg.time_limit)
        self.policy = resolve_policy(self.cfg.precision, self.cfg.device)
        self.cache = FeatureCache(cache_root(self.cfg.cache_dir))
        self.candidates: list[Candidate] = []
        self.finalists: list[Finalist] = []
        self.splits: Splits | None = None
        self.plan: SplitPlan | None = None
        self.folds: Folds | None = None
        self.seconds_per_image: dict[FeatureSet, float] = {}
        self._sizes: dict[FeatureSet, int] = {}

    def run(self) -> Run:
        self.splits = discover(self.cfg.data_dir, self.cfg.test_dir, self.cfg.labels)
        self.rank()
        scored = sorted((c for c in self.candidates if c.cv), key=Candidate.key, reverse=True)
        if not scored:
            raise TransferlabError(f"--time-limit {self.cfg.time_limit:g}: too short to extract the features of "
                                   f"a single candidate ({self.candidates[0].skipped})")
        best = scored[0]
        log.info("auto: best frozen candidate %s (cross-validated accuracy %.4f); %s", best.name, best.cv.accuracy,
                 self.budget.status())
        frozen = self.train_finalist("freeze", self.final_config(best, "freeze"))
        for candidate in self.finetune_choices(scored):
            self.finetune(candidate)
        winner, reason = self.choose(frozen)
        run = self.install(winner)
        self.write_record(winner, reason)
        log.info("auto: chose %s: %s (%.0f s in all)", winner.name, reason, self.budget.used())
        return run

    # ---------------------------------------------------------------------------------------- ranking

    def rank(self) -> None:
        """Cross-validate every head on every feature set, cheapest feature sets first, while the time left
        covers the next set's estimated extraction plus the final frozen run."""
        for feature_set in self.space.feature_sets:
            seed_everything(self.cfg.seed)  # a random-init backbone (--weights none) is the one training builds
            model = build_model(ModelSpec(feature_set.backbone, self.cfg.weights, None, "0", self.cfg.dropout,
                                          self.cfg.pool), len(self.splits.classes), self.policy)
            native = model.backbone.preprocess.input_size
            size = self._sizes[feature_set] = feature_set.size_for(native)
            model.backbone.preprocess = model.backbone.preprocess.with_input_size(size)
            gflops = forward_gflops(model, size)
            rows = [Candidate(feature_set.backbone, size, head, gflops=gflops) for head in self.space.heads]
            self.candidates += rows
            features = self._extract(feature_set, model, rows)
            if features is None:
                continue
            train = self.plan.train
            x = torch.stack([features[s] for s in train])
            y = torch.tensor([self.splits.classes.index(s.label) for s in train])
            for row in rows:
                row.cv = cross_validate(x, y, len(self.splits.classes), row.head, self.head_config(), self.folds)
                log.info("auto: %s cross-validated accuracy %.4f (log-loss %.4f, %.1f s)", row.name,
                         row.cv.accuracy, row.cv.log_loss, row.cv.seconds)

    def _extract(self, feature_set: FeatureSet, model, rows: list[Candidate]) -> dict | None:
        """Features of the training split (of every listed image for the first set, which makes the split
        plan); None, with the rows marked skipped, when the estimated time does not fit."""
        samples = self._listed() if self.plan is None else self.plan.train
        extractor = FeatureExtractor(model, self.policy, self.cache, self.cfg.engine)
        started = time.perf_counter()
        features, counts = _features_of(extractor, samples[:PROBE_IMAGES], self.cfg.strict)
        per_image = (time.perf_counter() - started) / max(1, min(len(samples), PROBE_IMAGES))
        rest = samples[PROBE_IMAGES:]
        needed = per_image * len(rest) + self._final_reserve(per_image, len(samples))
        skipped = None
        if needed > self.budget.left():
            skipped = f"time limit: about {needed:.0f} s needed, {max(0.0, self.budget.left()):.0f} s left"
        elif self.plan is not None and self.budget.seconds is not None:  # the first set is always ranked
            ranking = per_image * len(rest) + self._mean_cv_seconds() * len(rows)
            share_left = RANK_SHARE * self.budget.seconds - self.budget.used()
            if ranking > share_left:
                skipped = (f"time limit: ranking it needs about {ranking:.0f} s, {max(0.0, share_left):.0f} s left "
                           f"of the ranking's share ({RANK_SHARE:.0%}; the rest is kept for fine-tuning)")
        if skipped:
            for row in rows:
                row.skipped = skipped
            log.info("auto: skipping %s@%d (%s)", feature_set.backbone, rows[0].image_size, rows[0].skipped)
            return None
        more, more_counts = _features_of(extractor, rest, self.cfg.strict)
        features |= more
        counts = {k: counts[k] + more_counts[k] for k in counts}
        seconds = time.perf_counter() - started
        for row in rows:
            row.feature_seconds, row.features = seconds, counts
        self.seconds_per_image[feature_set] = seconds / max(1, len(samples))
        if self.plan is None:
            self._plan(set(features))
        return features

    def _mean_cv_seconds(self) -> float:
        seconds = [c.cv.seconds for c in self.candidates if c.cv]
        return sum(seconds) / len(seconds) if seconds else 0.0

    def _final_reserve(self, per_image: float, n_extracted: int) -> float:
        """Time to keep for the final frozen run of this feature set: the features it has not extracted yet
        (validation and test images, once the plan exists) and its head."""
        if self.plan is None:
            return WRITE_SECONDS
        rest = len(self.plan.test) + len(self.plan.val or [])
        heads = sum(c.cv.seconds for c in self.candidates if c.cv) / max(1, len(self.candidates))
        return per_image * rest + heads + WRITE_SECONDS

    def _listed(self) -> list[Sample]:
        s = self.splits
        return s.train + (s.val or []) + (s.test or [])

    def _plan(self, usable: set[Sample]) -> None:
        cfg = self.cfg
        self.plan = plan_splits(self.splits, usable, cfg.test_size, cfg.val_size, cfg.seed)
        labels = [self.splits.classes.index(s.label) for s in self.plan.train]
        self.folds = stratified_folds(labels, DEFAULT_FOLDS, cfg.seed)
        for note in self.folds.notes:
            log.info("auto: %s", note)

    def head_config(self) -> TrainConfig:
        """The freeze recipe the heads are cross-validated (and the frozen finalist trained) with."""
        return self.cfg.replace(strategy="freeze", epochs=DEFAULT_EPOCHS["freeze"]).resolved()

    # -------------------------------------------------------------------------------------- finalists

    def final_config(self, candidate: Candidate, strategy: str, epochs: int | None = None) -> TrainConfig:
        base = self.head_config() if strategy == "freeze" else self.cfg.replace(strategy=strategy, epochs=epochs)
        return base.replace(backbone=candidate.backbone, image_size=candidate.image_size, head=candidate.head,
                            time_limit=None).resolved()

    def train_finalist(self, name: str, config: TrainConfig) -> Finalist:
        finalist = Finalist(name, config, self.run_dir.auto_dir / name.replace(" ", "-"))
        started = time.perf_counter()
        deadline = None if self.budget.deadline is None else self.budget.deadline - WRITE_SECONDS
        trainer = Trainer(config, finalist.directory, callbacks=self.callbacks, deadline=deadline)
        trainer.run()
        kept = trainer.kept_epoch()
        finalist.val_accuracy, finalist.val_loss = kept.get("val_acc"), kept.get("val_loss")
        finalist.seconds = time.perf_counter() - started
        self.finalists.append(finalist)
        log.info("auto: %s validation accuracy %.4f (%.0f s; %s)", name, finalist.val_accuracy, finalist.seconds,
                 self.budget.status())
        return finalist

    def finetune_choices(self, scored: list[Candidate]) -> list[Candidate]:
        """At most two feature sets to fine-tune, from those whose best head is within one standard error of
        the best candidate (the one-standard-error rule: statistically tied with it): the cheapest per image
        first, because under a time limit the first one gets the most epochs and a cheaper model also serves
        faster; then the best-scoring other one. Fine-tuning changes the ranking of close candidates, not of
        distant ones."""
        best = scored[0]
        per_set: dict[tuple[str, int], Candidate] = {}
        for candidate in scored:  # best first, so each feature set keeps its best head
            per_set.setdefault((candidate.backbone, candidate.image_size), candidate)
        close = [c for c in per_set.values() if c.cv.accuracy >= best.cv.accuracy - best.cv.standard_error]
        cheapest = min(close, key=lambda c: c.gflops if c.gflops is not None else math.inf)
        return [cheapest] + [c for c in close if c is not cheapest][:1]

    def finetune(self, candidate: Candidate) -> None:
        """Fine-tune ``candidate`` for as many epochs (up to ``--epochs``) as the time left allows, estimated
        from a measured training step; skipped (recorded) when fewer than MIN_FINETUNE_EPOCHS fit."""
        name = f"unfreeze {candidate.backbone}@{candidate.image_size} head {candidate.head}"
        epochs = self.cfg.epochs
        if self.budget.seconds is not None:
            # a training step costs at least ~3 forward passes: skip without probing when even that cannot fit
            per_image = self.seconds_per_image.get(self._feature_set_of(candidate), 0.0)
            per_epoch, fixed = 3 * per_image * len(self.plan.train), 0.0
            if self.budget.left() >= MIN_FINETUNE_EPOCHS * per_epoch:
                per_epoch, fixed = self._finetune_cost(candidate)
            fit = int((self.budget.left() - fixed) // max(per_epoch, 1e-6))
            if fit < MIN_FINETUNE_EPOCHS:
                self.finalists.append(Finalist(name, self.final_config(candidate, "unfreeze", epochs),
                                               self.run_dir.auto_dir / name.replace(" ", "-"), skipped=(
                    f"time limit: {MIN_FINETUNE_EPOCHS} epochs need about {fixed + 2 * per_epoch:.0f} s, "
                    f"{max(0.0, self.budget.left()):.0f} s left")))
                log.info("auto: not fine-tuning %s (%s)", candidate.name, self.finalists[-1].skipped)
                return
            epochs = min(epochs, fit)
        self.train_finalist(name, self.final_config(candidate, "unfreeze", epochs))

    def _feature_set_of(self, candidate: Candidate) -> FeatureSet | None:
        return next((f for f in self.space.feature_sets if f.backbone == candidate.backbone
                     and self._sizes.get(f) == candidate.image_size), None)

    def _finetune_cost(self, candidate: Candidate) -> tuple[float, float]:
        """(seconds per epoch, seconds outside the epochs) of fine-tuning ``candidate``."""
        seed_everything(self.cfg.seed)
        model = build_model(ModelSpec(candidate.backbone, self.cfg.weights, candidate.image_size, candidate.head,
                                      self.cfg.dropout, self.cfg.pool), len(self.splits.classes), self.policy)
        train_ips, eval_ips = training_speed(model, self.policy, self.cfg.batch_size, candidate.image_size,
                                             self.cfg.bn)
        plan = self.plan
        n_val, n_test = len(plan.val or []), len(plan.test)
        per_epoch = AUGMENT_MARGIN * len(plan.train) / train_ips + n_val / eval_ips
        listed = self._listed()
        started = time.perf_counter()
        decode_samples(listed[:PROBE_IMAGES], model.backbone.preprocess, progress=False)
        decode = (time.perf_counter() - started) / max(1, min(len(listed), PROBE_IMAGES)) * len(listed)
        return per_epoch, decode + n_test / eval_ips + WRITE_SECONDS

    def choose(self, frozen: Finalist) -> tuple[Finalist, str]:
        """The fine-tuned run only if its validation accuracy beats the frozen head's (ties: frozen)."""
        trained = [f for f in self.finalists if f.skipped is None and f is not frozen]
        best = max(trained, key=lambda f: f.val_accuracy, default=None)
        if best is None:
            return frozen, "no fine-tuning run fitted the time limit" if self.finalists[1:] else "frozen head"
        if best.val_accuracy > frozen.val_accuracy:
            return best, (f"fine-tuning beat the frozen head on the validation split ({best.val_accuracy:.4f} vs "
                          f"{frozen.val_accuracy:.4f})")
        return frozen, (f"fine-tuning did not beat the frozen head on the validation split "
                        f"({best.val_accuracy:.4f} vs {frozen.val_accuracy:.4f})")

    # ---------------------------------------------------------------------------------------- outputs

    def install(self, winner: Finalist) -> Run:
        """Move the chosen run's files into OUT (config.json last: a complete run), export it, load it."""
        source = RunDir(winner.directory)
        for stale in self.run_dir.run_files():
            stale.unlink(missing_ok=True)
        for path, target in zip(source.run_files(), self.run_dir.run_files(), strict=True):
            if path.exists():
                os.replace(path, target)
        shutil.rmtree(source.path, ignore_errors=True)
        winner.directory = self.out
        run = Run.load(self.out, precision=self.cfg.precision, device=self.cfg.device)
        if self.export:
            from ..deployment import write_fp32

            try:
                write_fp32(self.run_dir, run.model, run.config)
            except TransferlabError as exc:
                log.warning("%s; predict will run on torch", exc)
        return run

    def write_record(self, winner: Finalist, reason: str) -> None:
        cfg = self.cfg
        record = {
            "time_limit": cfg.time_limit, "seconds": round(self.budget.used(), 3), "val_size": cfg.val_size,
            "folds": self.folds.k if self.folds else None, "notes": self.folds.notes if self.folds else [],
            "search_space": {"feature_sets": [vars(f) for f in self.space.feature_sets], "heads": self.space.heads},
            "candidates": [c.record() for c in self.candidates],
            "finalists": [f.record(self.out) for f in self.finalists],
            "chosen": winner.name, "reason": reason, "test_split_used_for_choice": False,
        }
        write_json(self.run_dir.auto, record)
        write_text(self.run_dir.auto_markdown, auto_markdown(record))
