"""Reference rows and the leakage check of an experiment, from the frozen features of its first backbone.

- the majority class of the training split (what any classifier must beat);
- a logistic-regression probe on standardised frozen features (what a linear model on the same features
  gives; C chosen by cross-validation on the training images only);
- test/train image pairs whose frozen features are nearly identical (a duplicate in both splits inflates
  the test score).

Per seed's test split (a carved split depends on the seed) and per --eval-on folder; written to
references.json, recomputed only when the runs, splits, --eval-on data or threshold change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..audit.duplicates import NEAR_DUPLICATE_THRESHOLD
from ..config import TrainConfig
from ..data.discovery import Sample, discover, discover_evaluation
from ..features import FeatureCache, FeatureExtractor, cache_root
from ..io.expdir import TEST, ExperimentDir
from ..io.files import write_json
from ..io.rundir import MetricsRecord
from ..metrics import compute_metrics
from ..models.build import ModelSpec, build_model
from ..provenance import seed_everything
from ..runtime.precision import resolve_policy
from .grid import data_fingerprint
from .results import METRICS

log = logging.getLogger("transferlab")

# Cosine similarity of frozen (pooled) backbone features above which a test and a train image count as
# near-duplicates: the audit's measured threshold (transferlab.audit.duplicates).
LEAKAGE_THRESHOLD = NEAR_DUPLICATE_THRESHOLD



@dataclass
class ReferenceInputs:
    """What the reference rows are computed on, read from the experiment's finished runs."""

    config: TrainConfig  # the first finished run's
    classes: list[str]
    splits: dict[int, list[tuple[Path, str]]]  # seed -> its test split (path, class)
    everything: dict[Path, str]  # every image of the data folder -> class
    evals: dict[str, list[Sample]]  # --eval-on name -> samples labelled with the model's classes
    key: str  # changes whenever any of the above (or the threshold) does


def _reference_inputs(exp: ExperimentDir) -> ReferenceInputs | None:
    meta = exp.read_experiment()
    runs = [r for r in meta["runs"] if exp.run(r["name"]).is_finished()]
    if not runs:
        return None
    first = exp.run(runs[0]["name"]).read_config()
    cfg, classes = TrainConfig.from_dict(first["train"]), first["classes"]
    splits = {}
    for seed in meta["grid"]["seeds"]:
        member = next((r for r in runs if r["seed"] == seed), None)
        rows = exp.run(member["name"]).read_test_predictions() if member is not None else []
        if rows:
            splits[seed] = [(Path(row["path"]), row["true"]) for row in rows]
    if not splits:
        return None
    discovered = discover(cfg.data_dir, cfg.test_dir, cfg.labels)
    everything = {Path(s.path).resolve(): s.label for s in discovered.train + (discovered.val or [])
                  + (discovered.test or [])}
    mapping = meta.get("class_map") or {}
    evals = {e["name"]: _eval_samples(e["path"], classes, mapping) for e in meta["eval_on"]}
    key = json.dumps({"runs": [r["name"] for r in runs], "splits": {str(k): [str(p) for p, _ in v]
                                                                     for k, v in splits.items()},
                      "evals": {e["name"]: data_fingerprint(e["path"]) for e in meta["eval_on"]},
                      "threshold": LEAKAGE_THRESHOLD}, sort_keys=True)
    return ReferenceInputs(cfg, classes, splits, everything, evals, hashlib.sha256(key.encode()).hexdigest())


def _eval_samples(path: str, classes: list[str], mapping: dict[str, str]) -> list[Sample]:
    """The samples an evaluation of ``path`` scores, labelled with the model's class names (classes the
    model does not know are left out; the experiment refused them before training)."""
    renamed = (Sample(s.path, mapping.get(s.label, s.label)) for s in discover_evaluation(path)[0])
    return [s for s in renamed if s.label in classes]


def _frozen_features(inputs: ReferenceInputs) -> dict[Path, np.ndarray]:
    """Features of every image involved, from the grid's first backbone with its default weights and
    preprocessing (the feature cache shared with the runs)."""
    cfg, index = inputs.config, set(inputs.classes)
    seed_everything(cfg.seed)  # a random-init backbone (--weights none) must be the runs' one
    policy = resolve_policy(cfg.precision, cfg.device)
    model = build_model(ModelSpec.of(cfg), len(inputs.classes), policy)
    extractor = FeatureExtractor(model, policy, FeatureCache(cache_root(cfg.cache_dir)))
    samples = [Sample(p, label) for p, label in inputs.everything.items() if label in index]
    samples += [s for ev in inputs.evals.values() for s in ev]
    features = extractor.extract(samples).features
    return {Path(s.path).resolve(): v.float().numpy() for s, v in features.items()}


def compute_references(exp_dir) -> dict | None:
    """Majority-class baseline and a logistic-regression probe per seed's test split and per --eval-on folder,
    and the train/test near-duplicate check. Written to references.json (kept while its inputs are the same)."""
    exp = ExperimentDir(exp_dir)
    inputs = _reference_inputs(exp)
    if inputs is None:
        return None
    old = exp.read_references()
    if isinstance(old, dict) and old.get("key") == inputs.key:
        return old
    started = time.perf_counter()
    log.info("reference rows: majority class and logistic-regression probe on %s features", inputs.config.backbone)
    feats = _frozen_features(inputs)
    cfg = inputs.config
    out = {"key": inputs.key, "backbone": cfg.backbone, "weights": cfg.weights, "pool": cfg.pool,
           "datasets": {}, "leakage": None}
    for seed, test in inputs.splits.items():
        _add_seed(out, inputs, feats, seed, test)
    out["seconds"] = round(time.perf_counter() - started, 3)
    write_json(exp.references, out)
    return out


def _add_seed(out: dict, inputs: ReferenceInputs, feats: dict[Path, np.ndarray], seed: int,
              test: list[tuple[Path, str]]) -> None:
    """The reference rows of one seed's split on every dataset, and the leakage check of the first seed."""
    classes, everything = inputs.classes, inputs.everything
    index = {c: i for i, c in enumerate(classes)}
    pairs = [(q.resolve(), label) for q, label in test if q.resolve() in feats and label in index]
    test_paths = [p for p, _ in pairs]
    test_set = set(test_paths)
    train_paths = [p for p, label in everything.items() if p not in test_set and p in feats and label in index]
    x_train = np.stack([feats[p] for p in train_paths])
    y_train = np.array([index[everything[p]] for p in train_paths])
    x_test = np.stack([feats[p] for p in test_paths])
    probe = _fit_probe(x_train, y_train, seed)
    majority = int(np.bincount(y_train, minlength=len(classes)).argmax())
    targets = {TEST: (x_test, np.array([index[label] for _, label in pairs]))}
    for name, ev in inputs.evals.items():
        known = [s for s in ev if Path(s.path).resolve() in feats]
        if known:
            targets[name] = (np.stack([feats[Path(s.path).resolve()] for s in known]),
                             np.array([index[s.label] for s in known]))
    for name, (x, y) in targets.items():
        entry = out["datasets"].setdefault(name, {"majority": [], "probe": []})
        onehot = np.zeros((len(y), len(classes)))
        onehot[:, majority] = 1.0
        entry["majority"].append({"seed": seed, "class": classes[majority],
                                  **_slim(compute_metrics(y, onehot, classes))})
        probs = probe["model"].predict_proba(x)
        entry["probe"].append({"seed": seed, "C": probe["C"], **_slim(compute_metrics(y, probs, classes))})
    if out["leakage"] is None:
        out["leakage"] = leakage_check(x_train, [str(p) for p in train_paths], x_test,
                                       [str(p) for p in test_paths]) | {"seed": seed}


def _slim(metrics: MetricsRecord) -> dict:
    return {k: metrics.get(k) for k in (*METRICS, "accuracy_ci95", "n_test")}


def _fit_probe(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """Standardised features -> logistic regression; C chosen by stratified cross-validation on the
    training images only (a plain C=1 fit when a class has fewer than 2 images)."""
    import warnings

    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = min(3, int(np.bincount(y).min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on tiny or separable data
        if folds >= 2:
            # A small C grid and 3 folds keep the probe to seconds on thousands of images.
            lr = LogisticRegressionCV(Cs=[1e-3, 1e-2, 1e-1, 1.0], max_iter=500,
                                      cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        else:
            lr = LogisticRegression(C=1.0, max_iter=500)
        model = make_pipeline(StandardScaler(), lr).fit(x, y)
    c = lr.C_[0] if hasattr(lr, "C_") else lr.C
    return {"model": model, "C": float(c)}



def leakage_check(x_train: np.ndarray, train_paths: list[str], x_test: np.ndarray, test_paths: list[str],
                  threshold: float = LEAKAGE_THRESHOLD, limit: int = 100) -> dict:
    """Test/train image pairs whose frozen features have cosine similarity above ``threshold``."""
    def unit(x):
        return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)

    sims = unit(x_test.astype(np.float64)) @ unit(x_train.astype(np.float64)).T
    ti, tj = np.nonzero(sims > threshold)
    order = np.argsort(-sims[ti, tj])
    pairs = [{"test": test_paths[int(ti[k])], "train": train_paths[int(tj[k])],
              "similarity": round(float(sims[ti[k], tj[k]]), 4)} for k in order[:limit]]
    nearest = sims.max(axis=1) if sims.size else np.zeros(0)
    closest = np.argsort(-nearest)[:5]
    return {"closest": [{"test": test_paths[int(i)], "train": train_paths[int(sims[i].argmax())],
                         "similarity": round(float(nearest[i]), 4)} for i in closest],
            "threshold": threshold, "n_pairs": int(len(ti)), "n_test_images": int(len(set(ti.tolist()))),
            "n_test": len(test_paths), "n_train": len(train_paths), "pairs": pairs,
            "median_nearest_similarity": float(np.median(nearest)) if len(nearest) else None}

