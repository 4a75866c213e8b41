"""``transferlab audit``: the data audit of an image folder, from the frozen features of one backbone.

The order: find the images (empty classes and unreadable files are reported, not fatal), check their
health, compute (or read from the cache) their frozen features and file digests, then the label issues,
the duplicates and the learning curve. Writes AUDIT_DIR/audit.json, label_issues.csv and the figures;
the page (audit.html) is rendered by :mod:`transferlab.report.audit`.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import TrainConfig
from ..data.discovery import Sample, discover
from ..data.splits import split_per_class
from ..errors import TransferlabError
from ..features import FeatureCache, FeatureExtractor, cache_root
from ..io.auditdir import LABEL_ISSUES_COLUMNS, AuditDir
from ..io.digest import file_digest
from ..io.files import check_writable_dir, write_json, write_text
from ..models.build import ModelSpec, build_model
from ..plots import class_distribution_png, learning_curve_png
from ..provenance import environment, seed_everything
from ..runtime.precision import resolve_policy
from . import curve as curves
from .duplicates import NEAR_DUPLICATE_THRESHOLD, Item, duplicate_groups
from .health import balance, health_checks, scan
from .labels import DEFAULT_FOLDS, head, normalise, out_of_fold, rank_label_issues

log = logging.getLogger("transferlab")

FORMAT_VERSION = 1
CURVE_NOTE = ("Frozen-feature curves understate what fine-tuning gains: fine-tuning also improves the "
              "features, so a fine-tuned model needs fewer images than this curve says for the same accuracy.")


@dataclass
class AuditResult:
    directory: Path
    record: dict  # what audit.json holds
    page: Path


@dataclass
class Inventory:
    """The images of the data folder, split by split, and what could not be used."""

    classes: list[str]
    items: list[Item]
    layout: str
    empty_classes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            split = out.setdefault(it.split, dict.fromkeys(self.classes, 0))
            split[it.label] += 1
        return out


@dataclass
class Features:
    """Feature rows of the usable items (``rows[i]`` is the feature of ``usable[i]``)."""

    usable: list[Item]
    rows: np.ndarray
    digests: list[str | None]
    cache_hits: int
    engine: str | None


def inventory(config: TrainConfig) -> Inventory:
    empty: list[str] = []
    splits = discover(config.data_dir, config.test_dir, config.labels, empty=empty)
    items = [Item(str(s.path), s.label, name) for name, samples in
             (("train", splits.train), ("val", splits.val), ("test", splits.test)) for s in samples or []]
    return Inventory(splits.classes, items, splits.layout, empty, splits.ignored)


def extract(config: TrainConfig, inv: Inventory, unreadable: set[str]) -> tuple[Features, dict]:
    """Frozen features (the shared cache) and digests of every readable item; returns the backbone's record."""
    seed_everything(config.seed)  # a random-init backbone (--weights none) is the same on every call
    policy = resolve_policy(config.precision, config.device)
    model = build_model(ModelSpec.of(config), len(inv.classes), policy)
    samples = [Sample(Path(it.path), it.label) for it in inv.items if it.path not in unreadable]
    extractor = FeatureExtractor(model, policy, FeatureCache(cache_root(config.cache_dir)), config.engine)
    result = extractor.extract(samples)
    usable = [it for it in inv.items
              if it.path not in unreadable and Sample(Path(it.path), it.label) in result.features]
    rows = np.stack([result.features[Sample(Path(it.path), it.label)].float().numpy() for it in usable]) if usable \
        else np.zeros((0, 1), dtype=np.float32)
    digests = []
    for it in usable:
        try:
            digests.append(file_digest(it.path))
        except OSError:
            digests.append(None)
    backbone = {"backbone": config.backbone, "weights": config.weights, "pool": config.pool,
                "input_size": model.backbone.preprocess.input_size, "precision": policy.precision,
                "device": policy.device}
    for skipped in result.skipped:
        unreadable.add(skipped["path"])
    return Features(usable, rows, digests, result.hits, result.engine), backbone


def label_issues(feats: Features, classes: list[str], seed: int, folds: int) -> tuple[dict, list[dict]]:
    """cleanlab's ranking of out-of-fold probabilities: (summary, one row per scored image, worst first)."""
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[it.label] for it in feats.usable], dtype=np.int64)
    oof = out_of_fold(feats.rows, y, classes, seed=seed, folds=folds) if len(y) else None
    if oof is None:
        return {"scored": 0, "flagged": 0, "notes": ["fewer than two classes with 2 or more images: not scored"]}, []
    quality, flagged = rank_label_issues(y[oof.index], oof.probabilities)
    order = np.argsort(quality, kind="stable")
    rows = []
    for rank, k in enumerate(order, 1):
        item, probs = feats.usable[oof.index[k]], oof.probabilities[k]
        best = int(np.argmax(probs))
        rows.append({"rank": rank, "path": item.path, "split": item.split, "given": item.label,
                     "suggested": classes[best], "suggested_probability": round(float(probs[best]), 4),
                     "quality": round(float(quality[k]), 6), "flagged": bool(flagged[k])})
    accuracy = float(np.mean(oof.probabilities.argmax(1) == y[oof.index]))
    summary = {"scored": len(rows), "flagged": int(flagged.sum()), "folds": oof.folds, "C": oof.c,
               "log_loss": {str(c): round(v, 5) for c, v in oof.log_loss.items()},
               "out_of_fold_accuracy": round(accuracy, 4), "notes": oof.notes,
               "method": "k-fold logistic regression on L2-normalised frozen features; cleanlab "
                         "get_label_quality_scores (self_confidence) and find_label_issues"}
    return summary, rows


def _curve_splits(feats: Features, classes: list[str], seed: int):
    """(train rows, eval rows, eval split name): the shipped test (or val) split, else 20% carved from train."""
    train = [k for k, it in enumerate(feats.usable) if it.split == "train"]
    for name in ("test", "val"):
        held = [k for k, it in enumerate(feats.usable) if it.split == name]
        if held:
            return train, held, name
    per_class = Counter(feats.usable[k].label for k in train)
    train = [k for k in train if per_class[feats.usable[k].label] >= 3]  # carving needs 3 (2 train + 1 held out)
    samples = [Sample(Path(feats.usable[k].path), feats.usable[k].label) for k in train]
    keep, held = split_per_class(samples, 0.2, seed, "held-out", min_train=2)
    position = {Sample(Path(feats.usable[k].path), feats.usable[k].label): k for k in train}
    return [position[s] for s in keep], [position[s] for s in held], "20% of train (carved)"


def learning_curve(feats: Features, classes: list[str], seed: int, c: float | None) -> dict:
    """Points, the fitted power law, its prediction band and "images per class needed" for a few targets."""
    try:
        train, held, eval_name = _curve_splits(feats, classes, seed)
    except TransferlabError as exc:
        return {"fitted": False, "reason": f"no held-out images for a curve ({exc})", "points": []}
    index = {cl: i for i, cl in enumerate(classes)}
    y = np.array([index[it.label] for it in feats.usable])
    x = normalise(feats.rows)
    if len(np.unique(y[train])) < 2:
        return {"fitted": False, "reason": "fewer than two classes in the training split", "points": []}
    points = curves.measure(lambda a, b: head(c or 1.0).fit(a, b), x[train], y[train], (x[held], y[held]),
                            len(classes))
    fit = curves.fit_curve(points, len(held), seed)
    out = {"eval_split": eval_name, "n_eval": len(held), "C": c, "points": points, "note": CURVE_NOTE,
           "fitted": fit["fitted"]}
    if not fit["fitted"]:
        return out | {"reason": fit["reason"]}
    law, largest = fit["law"], fit["max_per_class"]
    grid = np.geomspace(min(p["per_class"] for p in points), largest * 8, 40)
    band = [curves.predict(fit, n) for n in grid]
    measured = next(p["accuracy"] for p in points if p["fraction"] >= 1.0)
    out |= {"law": {"a": law.a, "b": law.b, "c": law.c}, "per_class_now": largest, "accuracy_now": measured,
            "band": {"per_class": grid.tolist(), "accuracy": [b["accuracy"] for b in band],
                     "low": [b["low"] for b in band], "high": [b["high"] for b in band]},
            "at_2x": curves.predict(fit, 2 * largest),
            "needed": [curves.images_needed(fit, t) for t in curves.targets(measured, law.a)]}
    return out


def _label_issues_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=LABEL_ISSUES_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run_audit(config: TrainConfig, out: str | Path, folds: int = DEFAULT_FOLDS) -> dict:
    """Audit ``config.data_dir`` into ``out``; returns the audit record (also written as audit.json)."""
    if folds < 2:
        raise TransferlabError(f"--folds {folds}: must be at least 2")
    directory = AuditDir(check_writable_dir(out))
    started = time.perf_counter()
    inv = inventory(config)
    facts, unreadable = scan(inv.items)
    bad = {u["path"] for u in unreadable}
    feats, backbone = extract(config, inv, bad)
    unreadable += [{"path": it.path, "label": it.label, "split": it.split, "reason": "no features"}
                   for it in inv.items if it.path in bad and it.path not in {u["path"] for u in unreadable}]
    log.info("audit: %d images, %d readable; label issues (k-fold heads)", len(inv.items), len(feats.usable))
    summary, rows = label_issues(feats, inv.classes, config.seed, folds)
    groups = duplicate_groups(feats.usable, feats.digests, feats.rows)
    log.info("audit: %d duplicate group(s); learning curve", len(groups))
    curve = learning_curve(feats, inv.classes, config.seed, summary.get("C"))
    counts = inv.counts()
    record = {
        "format_version": FORMAT_VERSION, "data_dir": str(Path(config.data_dir).resolve()), "layout": inv.layout,
        "classes": inv.classes, "counts": counts, "model": backbone, "seed": config.seed,
        "features": {"images": len(feats.usable), "from_cache": feats.cache_hits, "engine": feats.engine},
        "label_issues": summary | {"top": rows[:200]},
        "duplicates": _duplicates_summary(groups),
        "learning_curve": curve,
        "health": {"balance": balance(counts, inv.classes), "checks": health_checks(inv.items, facts,
                                                                                     backbone["input_size"]),
                   "unreadable": unreadable, "empty_classes": inv.empty_classes,
                   "few_images": [c for c, n in balance(counts, inv.classes)["per_class"].items() if n < 2],
                   "ignored_non_images": len(inv.ignored)},
        "environment": environment({"device": backbone["device"], "precision": backbone["precision"]}),
    }
    record["seconds"] = round(time.perf_counter() - started, 2)
    _write(directory, record, rows)
    return record


def _duplicates_summary(groups: list[dict]) -> dict:
    return {"threshold": NEAR_DUPLICATE_THRESHOLD, "groups": groups, "n_groups": len(groups),
            "n_exact": sum(g["kind"] == "exact" for g in groups), "n_near": sum(g["kind"] == "near" for g in groups),
            "n_conflicts": sum(g["conflict"] for g in groups), "n_cross_split": sum(g["cross_split"] for g in groups),
            "images_in_groups": sum(len(g["members"]) for g in groups)}


def _write(directory: AuditDir, record: dict, rows: list[dict]) -> None:
    write_text(directory.label_issues, _label_issues_csv(rows))
    class_distribution_png(record["counts"], directory.class_distribution)
    curve = record["learning_curve"]
    if curve.get("points"):
        band = curve.get("band")
        learning_curve_png(curve["points"], band, record["classes"], directory.learning_curve)
    write_json(directory.audit, record)
