"""The public Python API: ``train``, ``evaluate``, ``load_run``. The CLI only calls these."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import platform
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .config import TrainConfig
from .data import Sample, class_counts, decode_samples, discover, read_class_folders, split_per_class
from .errors import TransferlabError
from .fileio import atomic_path, check_writable_dir, read_json, sha256_file, write_json, write_text
from .precision import Policy, resolve_policy, torch_threads
from .run import BACKBONE_FILE, CONFIG_FILE, FORMAT_VERSION, MODEL_FILE, TEST_PREDICTIONS_FILE, Run

log = logging.getLogger("transferlab")


def versions() -> dict:
    import timm
    import torchvision

    return {"transferlab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "python": platform.python_version()}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _Split:
    """One split: samples, label indices, and decoded images and/or pooled features."""

    samples: list[Sample]
    labels: torch.Tensor
    images: list[torch.Tensor] | None = None
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.samples)


def _make_split(samples: list[Sample], class_index: dict[str, int],
                images: dict[Sample, torch.Tensor] | None) -> _Split:
    labels = torch.tensor([class_index[s.label] for s in samples], dtype=torch.long)
    return _Split(samples, labels, [images[s] for s in samples] if images is not None else None)


def load_run(directory: str | os.PathLike, precision: str = "auto", device: str = "auto") -> Run:
    return Run.load(directory, precision=precision, device=device)


def train(data_dir: str | os.PathLike | None = None, out: str | os.PathLike = "run",
          config: TrainConfig | None = None, shared_dir: str | os.PathLike | None = None, resume: bool = False,
          **options) -> Run:
    """Train a classifier on an image folder and write a run directory.

    ``options`` are :class:`TrainConfig` fields (``strategy="freeze"``, ``head="512x128"``, ...) and
    override ``config``. ``shared_dir`` (experiments): with ``strategy="freeze"`` the unchanged backbone
    weights go to a content-addressed file there, hard-linked into the run (see :func:`save_run`).
    Returns the trained :class:`Run`.
    """
    cfg = config or TrainConfig()
    unknown = sorted(set(options) - set(TrainConfig.field_names()))
    if unknown:
        raise TransferlabError(f"train: unknown option '{unknown[0]}'")
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    cfg = cfg.replace(**options).resolved()
    out = check_writable_dir(out)
    from .checkpoint import load_checkpoint, remove_checkpoint
    from .training import SaveCheckpoint

    checkpoint_config = _with_absolute_paths(cfg).to_dict()
    checkpoint = load_checkpoint(out, checkpoint_config)  # a killed or interrupted run continues
    if resume and checkpoint is None:
        raise TransferlabError(f"--resume: {out} holds no checkpoint to resume (the run finished or never started)")
    started = time.perf_counter()
    seed_everything(cfg.seed)
    policy = resolve_policy(cfg.precision, cfg.device)
    log.info("device %s, precision %s%s", policy.device, policy.precision,
             ", channels_last" if policy.channels_last else "")

    splits = discover(cfg.data_dir, cfg.test_dir, cfg.labels)
    classes = splits.classes
    class_index = {c: i for i, c in enumerate(classes)}

    from .backbones import create_backbone

    backbone = create_backbone(cfg.backbone, cfg.weights)
    if cfg.image_size is not None:
        backbone.preprocess = backbone.preprocess.with_input_size(cfg.image_size)
    preprocess = backbone.preprocess
    if cfg.weights == "none" and cfg.strategy == "freeze":
        log.warning("--weights none with --strategy freeze: the head trains on random features")

    from .features import FeatureCache, compute_features, default_cache_dir
    from .model import TransferModel
    from .strategies import apply_strategy

    torch.manual_seed(cfg.seed)
    model = policy.prepare_model(TransferModel(backbone, len(classes), cfg.head, cfg.dropout, cfg.pool))
    cache = FeatureCache(None if cfg.cache_dir == "none" else cfg.cache_dir or default_cache_dir())

    # Images are read once: a frozen backbone needs only cached features (decoding just the cache
    # misses); fine-tuning needs the decoded pixels. Splits are made from what decoded, so a skipped
    # file never empties a split.
    listed = splits.train + (splits.val or []) + (splits.test or [])
    images: dict[Sample, torch.Tensor] | None = None
    features: dict[Sample, torch.Tensor] | None = None
    train_started = time.perf_counter()
    if cfg.strategy == "freeze":
        result = compute_features(listed, model, preprocess, policy, cache, strict=cfg.strict, engine=cfg.engine)
        features, skipped = result.features, result.skipped
        usable = set(features)
    else:
        decoded = decode_samples(listed, preprocess, strict=cfg.strict, desc="decoding images")
        images, skipped = dict(zip(decoded.samples, decoded.images, strict=True)), decoded.skipped
        usable = set(images)
    decode_seconds = time.perf_counter() - train_started
    train_samples = [s for s in splits.train if s in usable]
    test_samples = [s for s in splits.test if s in usable] if splits.test is not None else None
    val_samples = [s for s in splits.val if s in usable] if splits.val is not None else None
    carve_val = val_samples is None and cfg.val_size > 0
    if test_samples is None:
        train_samples, test_samples = split_per_class(train_samples, cfg.test_size, cfg.seed, "test",
                                                      min_train=2 if carve_val else 1)
    if carve_val:
        train_samples, val_samples = split_per_class(train_samples, cfg.val_size, cfg.seed, "validation")
    for name, samples in (("train", train_samples), ("test", test_samples)):
        counts = class_counts(samples, classes)
        empty = [c for c, n in counts.items() if n == 0]
        if empty:
            raise TransferlabError(f"class '{empty[0]}' has no usable image in the {name} split")
    train_split = _make_split(train_samples, class_index, images)
    test_split = _make_split(test_samples, class_index, images)
    val_split = _make_split(val_samples, class_index, images) if val_samples else None
    log.info("%d classes; train %d, validation %d, test %d images (%s)", len(classes), len(train_split),
             len(val_split) if val_split else 0, len(test_split), splits.layout)
    if cfg.patience and val_split is None:
        log.warning("--patience %d has no effect without a validation split (--val-size or a val folder)",
                    cfg.patience)

    apply_strategy(model, cfg.strategy, cfg.unfreeze_last, cfg.bn)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(cfg, train_split, len(classes)),
                                  label_smoothing=cfg.label_smoothing).to(policy.device)

    history: list[dict] = []
    head_epochs = cfg.epochs if cfg.strategy == "freeze" else cfg.head_epochs
    if checkpoint is not None and checkpoint.stage == "finetune":  # the head stage had finished
        history = [row for row in checkpoint.meta["history"] if row["stage"] != "finetune"]
        head_epochs = 0
    saver = SaveCheckpoint(out, checkpoint_config, history)
    if head_epochs > 0:
        if features is None:  # head-first stage of fine-tuning: features of the pretrained backbone
            features = compute_features(train_samples + (val_samples or []), model, preprocess, policy, cache,
                                        images=images, engine=cfg.engine).features
        for split in (train_split, val_split, test_split):
            if split is not None and all(s in features for s in split.samples):
                split.features = torch.stack([features[s] for s in split.samples])
        history += _train_head(model, cfg, policy, loss_fn, head_epochs, train_split, val_split, saver,
                               checkpoint if checkpoint is not None and checkpoint.stage == "head" else None)
    if cfg.strategy != "freeze" and cfg.epochs > 0:
        history += _fine_tune(model, cfg, policy, loss_fn, preprocess, train_split, val_split, saver,
                              checkpoint if checkpoint is not None and checkpoint.stage == "finetune" else None)
    train_seconds = time.perf_counter() - train_started

    logits = _test_logits(model, cfg, policy, preprocess, test_split, cache)
    from .metrics import compute_metrics

    test_probs = torch.softmax(logits, 1).numpy()
    metrics = compute_metrics(test_split.labels.numpy(), test_probs, classes)
    metrics["train_seconds"] = round(train_seconds, 3)
    metrics["decode_seconds"] = round(decode_seconds, 3)
    metrics["total_seconds"] = round(time.perf_counter() - started, 3)

    counts = {"train": class_counts(train_split.samples, classes),
              "validation": class_counts(val_split.samples, classes) if val_split else {},
              "test": class_counts(test_split.samples, classes)}
    data_report = {"data_dir": str(Path(cfg.data_dir).resolve()), "layout": splits.layout, "classes": classes,
                   "counts": counts, "skipped": skipped, "ignored_non_images": splits.ignored}
    config = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "backbone": {"name": backbone.name, "weights": cfg.weights, "weights_source": backbone.weights["source"],
                     "license": backbone.weights["license"]},
        "classes": classes,
        "preprocess": preprocess.to_dict(),
        "train": _with_absolute_paths(cfg).to_dict(),
        "policy": {"device": policy.device, "precision": policy.precision, "channels_last": policy.channels_last},
        "model_file": MODEL_FILE,
    }
    save_run(out, model, config, metrics, history, data_report,
             shared_dir=shared_dir if cfg.strategy == "freeze" else None,
             test_predictions=(test_split.samples, test_split.labels.numpy(), test_probs))
    remove_checkpoint(out)
    log.info("test accuracy %.4f (95%% CI %.3f-%.3f), macro F1 %.4f; run written to %s", metrics["accuracy"],
             *metrics["accuracy_ci95"], metrics["f1"], out)
    return Run(out, read_json(out / CONFIG_FILE), model, policy)


@torch.no_grad()
def _test_logits(model, cfg: TrainConfig, policy: Policy, preprocess, test_split: _Split, cache) -> torch.Tensor:
    """Logits for the test split: a frozen run applies its head to cached features (one feature set per
    view with ``--tta``), a fine-tuned run runs the whole model on the decoded images."""
    from .training import average_views, predict_logits

    model.eval()
    if cfg.strategy != "freeze":
        return predict_logits(model, test_split.images, preprocess, policy, tta=cfg.tta, desc="testing",
                              engine=cfg.engine)
    per_view = [test_split.features]
    if cfg.tta:
        from .features import compute_features
        from .preprocessing import TTA_VIEWS

        for view in TTA_VIEWS[1:]:
            found = compute_features(test_split.samples, model, preprocess, policy, cache, view=view,
                                     engine=cfg.engine).features
            per_view.append(torch.stack([found[s] for s in test_split.samples]))
    logits = [model.head(f.to(policy.device)).float().cpu() for f in per_view]
    return average_views(logits) if cfg.tta else logits[0]


def _with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Paths in config.json are absolute, so ``train --config`` works from any working directory."""
    absolute = {k: str(Path(v).resolve()) for k in ("data_dir", "test_dir", "labels", "cache_dir")
                if (v := getattr(cfg, k)) not in (None, "none")}
    return cfg.replace(**absolute)


def _class_weights(cfg: TrainConfig, split: _Split, num_classes: int) -> torch.Tensor | None:
    if cfg.class_weights != "balanced":
        return None
    counts = torch.bincount(split.labels, minlength=num_classes).float()
    return len(split) / (num_classes * counts.clamp(min=1))


def _sample_weights(cfg: TrainConfig, split: _Split) -> torch.Tensor | None:
    from .training import balanced_weights

    return balanced_weights(split.labels) if cfg.sampler == "balanced" else None


def _train_head(model, cfg: TrainConfig, policy: Policy, loss_fn, epochs: int, train_split: _Split,
                val_split: _Split | None, saver=None, resume=None) -> list[dict]:
    from .strategies import param_groups
    from .training import TrainLoop, feature_batches, make_optimizer

    head = model.head
    groups = param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay, head_only=True)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr)
    fp32 = Policy(policy.device, "fp32", channels_last=False)  # a head on features: tiny, keep fp32
    validate = None
    if val_split is not None:
        val_x, val_y = val_split.features.to(policy.device), val_split.labels.to(policy.device)

        def validate():
            head.eval()
            with torch.no_grad():
                logits = head(val_x)
                return float(loss_fn(logits, val_y)), float((logits.argmax(1) == val_y).float().mean())
    loop = TrainLoop(head, feature_batches(train_split.features, train_split.labels, cfg.batch_size, cfg.seed, "head",
                                           _sample_weights(cfg, train_split)),
                     loss_fn, optimizer, epochs, fp32, "head", cfg.warmup_epochs, validate, head.train,
                     _callbacks(cfg, saver), seed=cfg.seed)
    with torch_threads(1) if policy.device == "cpu" else contextlib.nullcontext():
        return loop.fit(resume)


def _callbacks(cfg: TrainConfig, saver) -> list:
    from .training import EarlyStopping, EpochLogger, KeepBestOnValidation

    callbacks = [KeepBestOnValidation(), EpochLogger()]
    if cfg.patience:
        callbacks.append(EarlyStopping(cfg.patience))
    if saver is not None:
        callbacks.append(saver)
    return callbacks


def _fine_tune(model, cfg: TrainConfig, policy: Policy, loss_fn, preprocess, train_split: _Split,
               val_split: _Split | None, saver=None, resume=None) -> list[dict]:
    from .strategies import param_groups, set_train_mode
    from .training import TrainLoop, image_batches, make_optimizer, predict_in_batches

    groups = param_groups(model, cfg.lr, cfg.backbone_lr_mult, cfg.weight_decay)
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.lr)
    validate = None
    if val_split is not None:
        val_y = val_split.labels

        def validate():
            model.eval()
            logits = predict_in_batches(model, val_split.images, preprocess, policy)
            return float(loss_fn(logits.to(policy.device), val_y.to(policy.device))), \
                float((logits.argmax(1) == val_y).float().mean())
    batches = image_batches(train_split.images, train_split.labels, cfg.batch_size, cfg.seed, "finetune",
                            preprocess, cfg.augment, _sample_weights(cfg, train_split))
    loop = TrainLoop(model, batches, loss_fn, optimizer, cfg.epochs, policy, "finetune", cfg.warmup_epochs,
                     validate, lambda: set_train_mode(model, cfg.bn), _callbacks(cfg, saver), seed=cfg.seed)
    return loop.fit(resume)


HISTORY_COLUMNS = ["stage", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def save_run(out: Path, model, config: dict, metrics: dict, history: list[dict], data_report: dict,
             shared_dir: str | os.PathLike | None = None, test_predictions: tuple | None = None) -> None:
    """Write every file of the run directory atomically; config.json last (it marks a complete run).

    ``shared_dir`` (frozen backbones in an experiment): the backbone tensors go to the content-addressed
    file ``shared_dir/<sha256>.safetensors`` (written once), hard-linked (or copied) into
    ``RUN_DIR/backbone.safetensors``; ``model.safetensors`` then holds the head only, and config.json lists
    both files with their SHA-256 in ``weight_files``. ``test_predictions`` = (samples, true label
    indices, probabilities) of the test split, written to ``test_predictions.csv``.
    """
    from safetensors.torch import save_file

    from .plots import class_distribution_png, confusion_matrix_png, training_curves_png

    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "producer": f"transferlab {__version__}"}
    weight_files = None
    if shared_dir is not None:
        backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
        state = {k: v for k, v in state.items() if k not in backbone}
        # one metadata key only: safetensors writes a metadata map in no fixed order, and the blob's name is
        # the SHA-256 of its bytes, so identical tensors must give identical bytes
        weight_files = {BACKBONE_FILE: _link_shared_blob(backbone, {"format": "pt"}, Path(shared_dir),
                                                         out / BACKBONE_FILE)}
    else:
        (out / BACKBONE_FILE).unlink(missing_ok=True)  # a stale file from an earlier run in this folder
    with atomic_path(out / MODEL_FILE) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    if test_predictions is not None:
        write_text(out / TEST_PREDICTIONS_FILE, _predictions_csv(*test_predictions, config["classes"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if v is None else round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    write_text(out / "history.csv", buffer.getvalue())
    write_json(out / "metrics.json", metrics)
    write_json(out / "data_report.json", data_report)
    classes = config["classes"]
    confusion_matrix_png(metrics["confusion_matrix"], classes, out / "confusion_matrix.png")
    class_distribution_png({k: v for k, v in data_report["counts"].items() if v}, out / "class_distribution.png")
    if history:
        training_curves_png(history, out / "training_curves.png")
    config["model_sha256"] = sha256_file(out / MODEL_FILE)
    if weight_files is not None:
        config["weight_files"] = {MODEL_FILE: config["model_sha256"], **weight_files}
    write_json(out / CONFIG_FILE, config)


def _link_shared_blob(state: dict[str, torch.Tensor], metadata: dict, shared_dir: Path, target: Path) -> str:
    """Store ``state`` once as ``shared_dir/<sha256>.safetensors`` and hard-link it to ``target``
    (copy where hard links are impossible, e.g. across file systems). Returns the SHA-256."""
    import hashlib
    import shutil

    from safetensors.torch import save

    data = save(state, metadata=metadata)
    digest = hashlib.sha256(data).hexdigest()
    blob = shared_dir / f"{digest}.safetensors"
    if not blob.is_file() or sha256_file(blob) != digest:  # written once; a damaged blob is replaced
        with atomic_path(blob) as tmp:
            tmp.write_bytes(data)
    del data
    try:
        if target.exists() and os.path.samefile(blob, target):
            return digest
    except OSError:
        pass
    with atomic_path(target) as tmp:
        try:
            tmp.unlink()
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
    return digest


def _predictions_csv(samples: list[Sample], y_true, probs, classes: list[str]) -> str:
    """path, true, pred, score (probability of pred), then one probability column per class."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "true", "pred", "score", *[f"prob_{c}" for c in classes]])
    for sample, t, p in zip(samples, y_true, probs, strict=True):
        k = int(np.argmax(p))
        writer.writerow([str(Path(sample.path).resolve()), classes[int(t)], classes[k], f"{float(p[k]):.6f}",
                         *[f"{float(v):.6f}" for v in p]])
    return buffer.getvalue()


def load_class_map(value: str | None) -> dict[str, str]:
    """``--class-map``: a JSON object {dataset class: model class}, inline or in a file."""
    if not value:
        return {}
    import json

    path = Path(value)
    try:
        mapping = read_json(path) if path.is_file() else json.loads(value)
    except json.JSONDecodeError:
        raise TransferlabError(f"--class-map {value}: neither a JSON file nor inline JSON") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise TransferlabError(f"--class-map {value}: must be a JSON object of class name -> class name")
    return mapping


def evaluate(run: Run | str | os.PathLike, data_dir: str | os.PathLike, out: str | os.PathLike | None = None,
             class_map: dict[str, str] | str | None = None, strict: bool = False, tta: bool | None = None,
             engine: str | None = None) -> dict:
    """Evaluate a trained run on another image folder (classes matched by name, subsets allowed).

    ``data_dir`` is a class-folder tree, or a dataset with a train/test layout (its test split is used).
    Writes metrics.json, confusion_matrix.png and data_report.json to ``out`` (default
    RUN_DIR/evaluations/<folder name>) and returns the metrics.
    """
    run = run if isinstance(run, Run) else Run.load(run)
    if tta is not None:
        run.tta = tta
    if engine is not None:
        run.engine = engine
    mapping = class_map if isinstance(class_map, dict) else load_class_map(class_map)
    data_dir = Path(data_dir)
    names = {p.name.lower() for p in data_dir.iterdir() if p.is_dir()} if data_dir.is_dir() else set()
    if "train" in names and names & {"test", "val", "validation", "valid"}:
        samples, layout = discover(data_dir).test, "test split"
    else:
        samples, layout = read_class_folders(data_dir, "DATA_DIR"), "class folders"
    out = check_writable_dir(out if out is not None else run.directory / "evaluations" / data_dir.resolve().name)
    model_index = {c: i for i, c in enumerate(run.classes)}
    labels = []
    for s in samples:
        name = mapping.get(s.label, s.label)
        if name not in model_index:
            raise TransferlabError(f"DATA_DIR {data_dir}: class '{s.label}' is not one of the model's classes "
                                   f"({', '.join(run.classes)}); map it with --class-map")
        labels.append(model_index[name])
    decoded = decode_samples(samples, run.preprocess, strict=strict, desc="decoding images")
    index_of = {s: labels[i] for i, s in enumerate(samples)}
    y_true = np.array([index_of[s] for s in decoded.samples], dtype=np.int64)
    if len(y_true) == 0:
        raise TransferlabError(f"DATA_DIR {data_dir}: no usable images")
    probs = run.predict_tensors(decoded.images).numpy()
    from .metrics import compute_metrics
    from .plots import class_distribution_png, confusion_matrix_png

    metrics = compute_metrics(y_true, probs, run.classes)
    metrics["data_dir"] = str(data_dir.resolve())
    metrics["tta"] = run.tta
    write_json(out / "metrics.json", metrics)
    counts = class_counts([Sample(s.path, run.classes[index_of[s]]) for s in decoded.samples], run.classes)
    write_json(out / "data_report.json", {"data_dir": str(data_dir.resolve()), "layout": layout,
                                          "class_map": mapping, "counts": {"evaluation": counts},
                                          "skipped": decoded.skipped})
    confusion_matrix_png(metrics["confusion_matrix"], run.classes, out / "confusion_matrix.png",
                         title=f"Confusion matrix ({data_dir.name})")
    class_distribution_png({"evaluation": counts}, out / "class_distribution.png")
    log.info("accuracy %.4f on %d images of %s; written to %s", metrics["accuracy"], len(y_true), data_dir, out)
    return metrics
