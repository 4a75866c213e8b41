"""The trainer: one training run in stages, each a method with one job.

    prepare (checkpoint, seed, precision policy) -> discover the data -> build the model -> load the inputs
    (cached features or decoded pixels, as the strategy needs) and make the splits -> fit each stage of the
    strategy -> test -> write the run directory

The :class:`Trainer` holds what the stages share (configuration, policy, model, splits, history), so no
function passes nine arguments; the strategy object decides what trains and on what, so nothing here
branches on a strategy's name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from ..config import RESULT_NEUTRAL, TrainConfig
from ..data.discovery import Sample, Splits, class_counts, discover
from ..data.splits import plan_splits
from ..data.store import ImageStore
from ..deployment import write_fp32
from ..errors import TransferlabError
from ..features import FeatureCache, FeatureExtractor, FeatureResult, cache_root
from ..io.checkpoint import Checkpoint, load_checkpoint, remove_checkpoint
from ..io.files import check_writable_dir
from ..io.rundir import FORMAT_VERSION, MODEL_FILE, RunDir, RunOutputs, TestPredictions
from ..metrics import compute_metrics
from ..models.build import ModelSpec, build_model
from ..models.preprocessing import TTA_VIEWS
from ..provenance import seed_everything, versions
from ..run import Run
from ..runtime.inference import InferenceOptions, average_views, predict_in_batches, predict_logits_and_features
from ..runtime.precision import Policy, resolve_device, resolve_policy, torch_threads
from ..selection import best_epoch
from .batches import Augmentation, BatchOrder, LoaderOptions, balanced_weights, feature_batches, image_batches
from .batchnorm import update_batchnorm
from .callbacks import EarlyStopping, EmaWeights, EpochLogger, KeepBestOnValidation, MixBatches, SaveCheckpoint
from .deadline import Deadline
from .distributed import SINGLE, IndexedView, Session, check_supported, quiet_unless_main
from .loop import Callback, LoopSpec, TrainLoop, make_optimizer
from .strategies import Stage, make_strategy, param_groups

log = logging.getLogger("transferlab")


@dataclass
class SplitData:
    """One split: samples, label indices, and decoded images (read on access, see
    :class:`~transferlab.data.store.StoredImages`) and/or pooled features."""

    samples: list[Sample]
    labels: torch.Tensor
    images: Sequence[torch.Tensor] | None = None
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)


@dataclass
class Inputs:
    """What the data stage produced: the splits, and what was read to make them."""

    train: SplitData
    val: SplitData | None
    test: SplitData
    skipped: list[dict]
    images: Mapping[Sample, torch.Tensor] | None = None
    features: dict[Sample, torch.Tensor] | None = None


@dataclass
class Timings:
    started: float = field(default_factory=time.perf_counter)
    inputs_started: float = 0.0  # training time counts from reading the images
    decode_seconds: float = 0.0
    train_seconds: float = 0.0


class Trainer:
    """Train a classifier on an image folder and write a run directory (see :mod:`transferlab.io.rundir`).

    ``shared_dir`` (experiments): a frozen backbone's unchanged weights go to a content-addressed file there.
    ``resume``: a missing checkpoint is an error (without it an existing checkpoint is resumed anyway).
    ``callbacks``: extra :class:`~transferlab.training.loop.Callback` objects attached to every stage.
    ``export``: write the ONNX model at the end (RUN_DIR/model.onnx), so ``predict`` runs without torch.
    ``deadline``: a ``time.perf_counter()`` value training must end by (``--strategy auto`` gives each run
    its share of the budget); without it ``time_limit`` counts from the start of :meth:`run`.
    """

    def __init__(self, config: TrainConfig, out, *, shared_dir=None, resume: bool = False,
                 callbacks: tuple[Callback, ...] | list[Callback] = (), export: bool = False,
                 deadline: float | None = None):
        self.cfg = config.resolved()
        self.run_dir = RunDir(check_writable_dir(out))
        self.strategy = make_strategy(self.cfg)
        # only a backbone that never trains has weights worth sharing between runs
        self.shared_dir = shared_dir if not self.strategy.uses_pixels else None
        self.resume, self.extra_callbacks, self.export = resume, list(callbacks), export
        self.given_deadline = deadline
        self.deadline: Deadline | None = None
        self.record = self.cfg.with_absolute_paths().to_dict()  # config.json's "train"
        self.checkpoint_key = {k: v for k, v in self.record.items() if k not in RESULT_NEUTRAL}
        self.timings = Timings()
        self.history: list[dict] = []
        self.checkpoint: Checkpoint | None = None
        self.policy: Policy | None = None
        self.splits: Splits | None = None
        self.model = None
        self.extractor: FeatureExtractor | None = None
        self.loss_fn: nn.Module | None = None
        self.inputs: Inputs | None = None
        self.engines: set[str] = set()  # the inference engines that ran the backbone (metrics.json "inference")
        self.feature_counts = {"from_cache": 0, "computed": 0}
        self.test_features: torch.Tensor | None = None
        self.trust = None  # transferlab.trust.model.Trust, fitted on the validation split
        self.session = Session(SINGLE, "cpu", owns_group=False)  # the processes of a torchrun training

    def run(self) -> Run | None:
        """Train, test and write the run directory. Under torchrun every process runs this; rank 0 writes and
        returns the :class:`~transferlab.run.Run`, the other processes return None."""
        check_supported(self.cfg)
        self.session = Session.start(resolve_device(self.cfg.device))
        try:
            with quiet_unless_main(self.session.procs):
                self.prepare()
                self.splits = discover(self.cfg.data_dir, self.cfg.test_dir, self.cfg.labels)
                self.build()
                self.inputs = self.load_inputs()
                self.fit()
                predictions = self.test()
                self.fit_trust()
                return self.write(predictions)
        finally:
            self.session.close()

    @property
    def is_main(self) -> bool:
        return self.session.procs.is_main

    # ------------------------------------------------------------------------------------------- stages

    def prepare(self) -> None:
        """Find a checkpoint to continue (a killed or interrupted run), seed, choose the precision policy."""
        # rank 0's checkpoint in every process (their --out need not be on a shared filesystem)
        self.checkpoint = self.session.broadcast_object(load_checkpoint(self.run_dir, self.checkpoint_key)
                                                        if self.is_main else None)
        if self.resume and self.checkpoint is None:
            raise TransferlabError(f"--resume: {self.run_dir.path} holds no checkpoint to resume (the run finished "
                                   "or never started)")
        self.timings = Timings()
        end = self.given_deadline
        if end is None and self.cfg.time_limit:
            end = self.timings.started + self.cfg.time_limit
        self.deadline = Deadline(end, self._testing_reserve) if end is not None else None
        self.limit_seconds = None if end is None else round(end - self.timings.started, 3)
        seed_everything(self.cfg.seed)
        self.policy = resolve_policy(self.cfg.precision, self.cfg.device)
        if self.session.procs.enabled:
            self.policy = dataclasses.replace(self.policy, device=self.session.device_name)
            procs = self.session.procs
            log.info("torchrun: %d processes (%d on this node), %s, global batch %d (%d per process)", procs.world,
                     procs.local_world, "nccl" if self.policy.device_type == "cuda" else "gloo",
                     self.cfg.batch_size, self.cfg.batch_size // procs.world)
        log.info("device %s, precision %s%s", self.policy.device, self.policy.precision,
                 ", channels_last" if self.policy.channels_last else "")

    def build(self) -> None:
        if self.cfg.weights == "none" and not self.strategy.uses_pixels:
            log.warning("--weights none with --strategy %s: the head trains on random features", self.cfg.strategy)
        self.model = build_model(ModelSpec.of(self.cfg), len(self.splits.classes), self.policy, seed=self.cfg.seed)
        self.extractor = FeatureExtractor(self.model, self.policy, FeatureCache(cache_root(self.cfg.cache_dir)),
                                          self.cfg.engine)

    def load_inputs(self) -> Inputs:
        """Images are read once: a frozen backbone needs only cached features (decoding just the cache
        misses); fine-tuning needs the decoded pixels. Splits are made from what could be read."""
        splits, cfg = self.splits, self.cfg
        listed = splits.train + (splits.val or []) + (splits.test or [])
        started = self.timings.inputs_started = time.perf_counter()
        images = features = None
        if self.strategy.uses_pixels:
            decoded = self._decode(listed)
            images, skipped = decoded.by_sample(), decoded.skipped
            all_images, position = decoded.images, images.position
        else:
            result = self._extract_for_test(listed, strict=cfg.strict)
            features, skipped = result.features, result.skipped
        self.timings.decode_seconds = time.perf_counter() - started
        plan = plan_splits(splits, set(images if images is not None else features), cfg.test_size, cfg.val_size,
                           cfg.seed)
        index = {c: i for i, c in enumerate(splits.classes)}

        def split(samples: list[Sample]) -> SplitData:
            labels = torch.tensor([index[s.label] for s in samples], dtype=torch.long)
            return SplitData(samples, labels, IndexedView(all_images, [position[s] for s in samples])
                             if images is not None else None)

        inputs = Inputs(split(plan.train), split(plan.val) if plan.val else None, split(plan.test), skipped,
                        images, features)
        log.info("%d classes; train %d, validation %d, test %d images (%s)", len(splits.classes), len(inputs.train),
                 len(inputs.val) if inputs.val else 0, len(inputs.test), splits.layout)
        if cfg.patience and inputs.val is None:
            log.warning("--patience %d has no effect without a validation split (--val-size or a val folder)",
                        cfg.patience)
        return inputs

    def _decode(self, samples: list[Sample]):
        """Decoded images of ``samples`` from the image store beside the feature cache (decoding what it lacks;
        under torchrun the processes decode disjoint shares first), or in memory with ``--cache-dir none``."""
        store = ImageStore(cache_root(self.cfg.cache_dir), self.model.backbone.preprocess)
        procs = self.session.procs
        if procs.enabled:
            store.build(samples, shard=(procs.rank, procs.world), lock=False, progress=self.is_main)
            self.session.barrier()
        return store.load(samples, strict=self.cfg.strict, progress=self.is_main)

    def fit(self) -> None:
        """Run the strategy's stages in turn; a checkpoint's stage continues where it stopped."""
        self.strategy.apply(self.model)
        self.loss_fn = nn.CrossEntropyLoss(weight=self._class_weights(),
                                           label_smoothing=self.cfg.label_smoothing).to(self.policy.device)
        stages = self.strategy.stages()
        names = [s.name for s in stages]
        resume_at = names.index(self.checkpoint.stage) if self.checkpoint is not None else 0
        resuming_on_pixels = self.checkpoint is not None and not stages[resume_at].on_features
        if self.cfg.bn_update and not resuming_on_pixels:  # (that checkpoint holds the updated statistics)
            self._update_batchnorm()
        if self.checkpoint is not None:  # the stages before the checkpoint's had finished
            self.history = [row for row in self.checkpoint.meta["history"] if row["stage"] in names[:resume_at]]
        for stage in stages[resume_at:]:
            resume = self.checkpoint if self.checkpoint is not None and self.checkpoint.stage == stage.name else None
            self.history += self._fit_stage(stage, resume)
        self.timings.train_seconds = time.perf_counter() - self.timings.inputs_started

    def _update_batchnorm(self) -> None:
        if not self.strategy.uses_pixels:
            log.warning("--bn-update: no effect with --strategy %s (the frozen backbone keeps ImageNet's statistics)",
                        self.cfg.strategy)
            return
        update_batchnorm(self.model.backbone, self.inputs.train.images, self.model.backbone.preprocess, self.policy)
        self.session.broadcast_module(self.model.backbone)  # identical in every process, whatever its CPU
        self.strategy.apply(self.model)  # update_bn left every module in train mode

    def test(self) -> TestPredictions:
        logits, self.test_features = self._logits_and_features(self.inputs.test, desc="testing", record=True)
        probs = torch.softmax(logits, 1).numpy()
        return TestPredictions([str(s.path) for s in self.inputs.test.samples], self.inputs.test.labels.numpy(), probs)

    def fit_trust(self) -> None:
        """Calibration, the unknown threshold and prediction sets, fitted on the validation split with the
        final model (off without one: the test split never fits anything)."""
        from ..trust.model import Trust

        val = self.inputs.val
        if val is None or len(val) == 0:
            log.info("no validation split: calibration, unknown detection and prediction sets are off "
                     "(--val-size 0.15 turns them on)")
            return
        logits, features = self._logits_and_features(val, desc="calibrating")
        _, train_features = self._logits_and_features(self.inputs.train, desc="known features", tta=False)
        if not self.is_main:  # the fit is rank 0's (it alone writes the run); the passes above were shared
            return
        self.trust = Trust.fit(torch.softmax(logits, 1).numpy(), val.labels.numpy(), features.numpy(),
                               train_features.numpy(), self.cfg.keep_known, self.cfg.coverage, self.cfg.seed)

    def write(self, predictions: TestPredictions) -> Run | None:
        if not self.is_main:
            self.session.barrier()  # rank 0 writes the run directory
            return None
        run = self._write(predictions)
        self.session.barrier()
        return run

    def _write(self, predictions: TestPredictions) -> Run:
        classes = self.splits.classes
        metrics = compute_metrics(predictions.y_true, predictions.probs, classes)
        metrics["train_seconds"] = round(self.timings.train_seconds, 3)
        metrics["decode_seconds"] = round(self.timings.decode_seconds, 3)
        metrics["inference"] = self._inference_record()
        kept = self.kept_epoch()
        metrics["selected_epoch"] = {"stage": kept["stage"], "epoch": kept["epoch"]} if kept else None
        if self.deadline is not None:
            stopped = self.deadline.stopped_after
            metrics["time_limit"] = {"seconds": self.cfg.time_limit or self.limit_seconds,
                                     "stopped_after": None if stopped is None
                                     else {"stage": stopped[0], "epoch": stopped[1]}}
        trust_record = bank = None
        if self.trust is not None:
            trusted = self.trust.apply(predictions.probs, self.test_features.numpy())
            metrics |= self.trust.test_report(predictions.probs, predictions.y_true, trusted, self.cfg.seed)
            trust_record, bank = self.trust.record(), self.trust.knn.bank.astype("float16")
            self._log_trust(metrics)
        metrics["total_seconds"] = round(time.perf_counter() - self.timings.started, 3)
        outputs = RunOutputs(self.model.state_dict(), self._config_record(), metrics, self.history,
                             self._data_report(), predictions, trust_record, bank)
        self.run_dir.write(outputs, shared_dir=self.shared_dir)
        remove_checkpoint(self.run_dir)
        config = self.run_dir.read_config()
        if self.export:
            self._export(config)
        log.info("test accuracy %.4f (95%% CI %.3f-%.3f), macro F1 %.4f; run written to %s", metrics["accuracy"],
                 *metrics["accuracy_ci95"], metrics["f1"], self.run_dir.path)
        return Run(self.run_dir.path, config, self.model, self.policy)

    @staticmethod
    def _log_trust(metrics: dict) -> None:
        c, u, s = metrics["calibration"], metrics["unknown"], metrics["prediction_sets"]
        log.info("calibration (test): temperature %.3f, ECE %.4f -> %.4f; unknown: %.1f%% of test images kept "
                 "(target %.0f%%); prediction sets at %.0f%%: coverage %.3f, mean size %.2f", c["temperature"],
                 c["ece_before"], c["ece_after"], 100 * u["known_kept"], 100 * u["keep_known"],
                 100 * s["coverage"], s["empirical_coverage"], s["mean_set_size"])

    def _testing_reserve(self, epoch_seconds: float) -> float:
        """Time to keep for testing after an epoch of ``epoch_seconds``: a forward pass costs about a third
        of a training step, so half an epoch's time per training image is a safe estimate."""
        inputs = self.inputs
        return 0.5 * epoch_seconds * len(inputs.test) / max(1, len(inputs.train)) if inputs else 0.0

    def _export(self, config: dict) -> None:
        """The ONNX model for the torch-free ``predict``; a model the exporter cannot handle (data-dependent
        control flow) or a full disk leaves the run usable through torch."""
        try:
            write_fp32(self.run_dir, self.model, config)
        except TransferlabError as exc:  # the run itself is complete: a failed export must not fail it
            log.warning("%s; predict will run on torch", exc)

    def _inference_record(self) -> dict:
        """What computed the test predictions: the engine(s) that ran the backbone (for a frozen one also how
        many features came from the cache; the head runs on torch), the precision and the device."""
        record = {"engine": "+".join(sorted(self.engines)) or "cache", "precision": self.policy.precision,
                  "device": self.policy.device}
        if not self.strategy.uses_pixels:
            record["features"] = dict(self.feature_counts)
        return record

    def kept_epoch(self) -> dict | None:
        """The history row whose weights were kept: the best epoch of the last stage by
        :func:`transferlab.selection.best_epoch`, or its last epoch without validation data."""
        if not self.history:
            return None
        last = [row for row in self.history if row["stage"] == self.history[-1]["stage"]]
        return best_epoch(last) or last[-1]

    # ------------------------------------------------------------------------------------------ helpers

    def _fit_stage(self, stage: Stage, resume: Checkpoint | None) -> list[dict]:
        ema = mix = None  # the fine-tuning recipe's optional callbacks (--ema, --mixup/--cutmix)
        if stage.on_features:
            self._attach_features()
            spec = self._head_loop(stage)
            threads = torch_threads(1) if self.policy.device == "cpu" else contextlib.nullcontext()
        else:
            ema = EmaWeights(self.model, self.cfg.ema) if self.cfg.ema else None
            mix = self._mixing()
            spec, threads = self._finetune_loop(stage, ema, mix), contextlib.nullcontext()
        recipe = [cb for cb in (ema, mix) if cb is not None]
        loop = TrainLoop(spec, self._callbacks(ema.module if ema is not None else None) + recipe)
        with threads:
            history = loop.fit(resume)
        # every process trained the same weights (DDP, or the same head on the same features): make sure
        # they are rank 0's, kept epoch included
        self.session.broadcast_module(self.model)
        if ema is not None:
            self.session.broadcast_module(ema.module)
        return history

    def _callbacks(self, kept: nn.Module | None = None) -> list[Callback]:
        """``kept``: the module whose weights keep-best scores and keeps, when not the loop's (EMA's average)."""
        callbacks: list[Callback] = [KeepBestOnValidation(kept), EpochLogger()]
        if self.cfg.patience:
            callbacks.append(EarlyStopping(self.cfg.patience))
        if self.deadline is not None:
            callbacks.append(self.deadline)
        if self.is_main:
            callbacks.append(SaveCheckpoint(self.run_dir, self.checkpoint_key, self.history))
        return callbacks + self.extra_callbacks

    def _attach_features(self) -> None:
        """Pooled features of the pretrained backbone for every split that has them all (the head-first
        stage of fine-tuning computes them from the decoded images)."""
        inputs = self.inputs
        if inputs.features is None:
            wanted = inputs.train.samples + (inputs.val.samples if inputs.val else [])
            inputs.features = self._extract(wanted, images=inputs.images).features
        for split in (inputs.train, inputs.val, inputs.test):
            if split is not None and all(s in inputs.features for s in split.samples):
                split.features = torch.stack([inputs.features[s] for s in split.samples])

    def _order(self, stage: Stage) -> BatchOrder:
        """The head on features trains whole in every process; fine-tuning gives each process its slice of
        every global batch."""
        weights = balanced_weights(self.inputs.train.labels) if self.cfg.sampler == "balanced" else None
        procs = self.session.procs if not stage.on_features else SINGLE
        return BatchOrder(self.cfg.batch_size, self.cfg.seed, stage.name, weights, procs.rank, procs.world)

    def _head_loop(self, stage: Stage) -> LoopSpec:
        cfg, head, train, val = self.cfg, self.model.head, self.inputs.train, self.inputs.val
        groups = param_groups(self.model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay, head_only=True)
        validate = None
        if val is not None:
            val_x, val_y = val.features.to(self.policy.device), val.labels.to(self.policy.device)

            def validate():
                head.eval()
                with torch.no_grad():
                    logits = head(val_x)
                    return float(self.loss_fn(logits, val_y)), float((logits.argmax(1) == val_y).float().mean())
        fp32 = Policy(self.policy.device, "fp32", channels_last=False)  # a head on features: tiny, keep fp32
        return LoopSpec(head, feature_batches(train.features, train.labels, self._order(stage)), self.loss_fn,
                        make_optimizer(cfg.optimizer, groups, cfg.lr), stage.epochs, fp32, stage.name,
                        cfg.warmup_epochs, validate, head.train, cfg.seed, agree=self.session.agree)

    def _mixing(self) -> MixBatches | None:
        """Mixup/CutMix for fine-tuning; its soft targets carry the label smoothing, and its loss
        (SoftTargetCrossEntropy) has no class weights."""
        cfg = self.cfg
        if not (cfg.mixup or cfg.cutmix):
            return None
        if cfg.class_weights != "none":
            log.warning("--class-weights %s: not applied to the fine-tuning loss with --mixup/--cutmix",
                        cfg.class_weights)
        return MixBatches(cfg.mixup, cfg.cutmix, cfg.label_smoothing, len(self.splits.classes))

    def _finetune_loop(self, stage: Stage, ema: EmaWeights | None = None, mix: MixBatches | None = None) -> LoopSpec:
        """With ``ema`` validation scores the averaged weights; with ``mix`` the training loss takes soft
        targets (validation keeps the plain loss on hard labels)."""
        from timm.loss import SoftTargetCrossEntropy

        cfg, model, train, val = self.cfg, self.model, self.inputs.train, self.inputs.val
        preprocess = model.backbone.preprocess
        if self.session.procs.enabled and cfg.bn == "train" and self.policy.device_type == "cuda":
            model.backbone = nn.SyncBatchNorm.convert_sync_batchnorm(model.backbone)  # statistics over all GPUs
        groups = param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay, layer_decay=cfg.layer_decay)
        evaluated = ema.module if ema is not None else model
        validate = None
        if val is not None:
            def validate():
                evaluated.eval()
                logits, = self.session.sharded_map(len(val), lambda idx: [predict_in_batches(
                    evaluated, IndexedView(val.images, idx), preprocess, self.policy)])
                return float(self.loss_fn(logits.to(self.policy.device), val.labels.to(self.policy.device))), \
                    float((logits.argmax(1) == val.labels).float().mean())
        loader = LoaderOptions(cfg.loader_workers, pin_memory=self.policy.device_type == "cuda")
        augment = Augmentation(cfg.augment_policy, cfg.crop_scale) if cfg.augment else None
        batches = image_batches(train.images, train.labels, self._order(stage), preprocess, augment, loader)
        loss_fn = SoftTargetCrossEntropy() if mix is not None else self.loss_fn
        return LoopSpec(model, batches, loss_fn, make_optimizer(cfg.optimizer, groups, cfg.lr), stage.epochs,
                        self.policy, stage.name, cfg.warmup_epochs, validate,
                        lambda: self.strategy.set_train_mode(model), cfg.seed, forward=self.session.wrap(model),
                        agree=self.session.agree, rank=self.session.procs.rank)

    @torch.no_grad()
    def _logits_and_features(self, split: SplitData, desc: str = "", tta: bool | None = None,
                             record: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The final model's logits and centre-view pooled features for a split. A strategy that trains on
        pixels runs the whole model on the decoded images; a frozen one applies its head to cached features
        (one feature set per view with ``--tta``). ``record``: count the engines and cache use in
        metrics.json's ``inference`` (the test split's)."""
        model, cfg = self.model, self.cfg
        tta = cfg.tta if tta is None else tta
        model.eval()
        if self.strategy.uses_pixels:
            def compute(indices):
                return predict_logits_and_features(model, IndexedView(split.images, indices), self.policy,
                                                   InferenceOptions(cfg.engine, tta), desc=desc,
                                                   engines=self.engines if record else None)
            logits, features = self.session.sharded_map(len(split), compute)
            return logits, features
        per_view = [split.features]
        for view in TTA_VIEWS[1:] if tta else ():
            found = (self._extract_for_test(split.samples, view=view) if record
                     else self._extract(split.samples, view=view)).features
            per_view.append(torch.stack([found[s] for s in split.samples]))
        logits = [model.head(f.to(self.policy.device)).float().cpu() for f in per_view]
        return (average_views(logits) if tta else logits[0]), split.features.float().cpu()

    def _extract_for_test(self, samples: list[Sample], **options):
        """Frozen features that the test predictions come from, with a record of what computed them."""
        result = self._extract(samples, **options)
        if result.engine is not None:
            self.engines.add(result.engine)
        self.feature_counts["from_cache"] += result.hits
        self.feature_counts["computed"] += result.misses
        return result

    def _extract(self, samples: list[Sample], **options) -> FeatureResult:
        """Frozen features of ``samples``; under torchrun each process computes a disjoint share (the cache
        misses among every ``world``-th sample) and all of them receive every feature."""
        procs = self.session.procs
        if not procs.enabled:
            return self.extractor.extract(samples, **options)
        positions = list(procs.positions(len(samples)))
        local = self.extractor.extract([samples[i] for i in positions], lock=False, **options)
        found = {i: local.features[samples[i]] for i in positions if samples[i] in local.features}
        parts = self.session.all_gather_object((found, local.skipped, local.engine, local.hits, local.misses))
        merged: dict[int, torch.Tensor] = {}
        result = FeatureResult({})
        for found, skipped, engine, hits, misses in parts:
            merged |= found
            result.skipped += skipped
            result.engine = result.engine or engine
            result.hits += hits
            result.misses += misses
        result.features = {samples[i]: merged[i] for i in sorted(merged)}
        order = {str(s.path): i for i, s in enumerate(samples)}
        result.skipped.sort(key=lambda entry: order.get(entry["path"], len(order)))
        return result

    def _class_weights(self) -> torch.Tensor | None:
        if self.cfg.class_weights != "balanced":
            return None
        k = len(self.splits.classes)
        counts = torch.bincount(self.inputs.train.labels, minlength=k).float()
        return len(self.inputs.train) / (k * counts.clamp(min=1))

    def _data_report(self) -> dict:
        classes, inputs = self.splits.classes, self.inputs
        counts = {"train": class_counts(inputs.train.samples, classes),
                  "validation": class_counts(inputs.val.samples, classes) if inputs.val else {},
                  "test": class_counts(inputs.test.samples, classes)}
        return {"data_dir": str(Path(self.cfg.data_dir).resolve()), "layout": self.splits.layout, "classes": classes,
                "counts": counts, "skipped": inputs.skipped, "ignored_non_images": self.splits.ignored}

    def _config_record(self) -> dict:
        backbone, policy = self.model.backbone, self.policy
        return {
            "format_version": FORMAT_VERSION,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "versions": versions(),
            "backbone": {"name": backbone.name, "weights": self.cfg.weights,
                         "weights_source": backbone.weights["source"], "license": backbone.weights["license"]},
            "classes": self.splits.classes,
            "preprocess": backbone.preprocess.to_dict(),
            "train": self.record,
            "policy": {"device": policy.device, "precision": policy.precision, "channels_last": policy.channels_last},
            "model_file": MODEL_FILE,
        }
