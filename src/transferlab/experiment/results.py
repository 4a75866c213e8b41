"""An experiment's results, collected from the files on disk: per run, per configuration (mean and sample
std over seeds), the ranking, and the McNemar test of the two best configurations.

Selection: runs are ranked by their best validation accuracy when the runs have a validation split
(``--val-size`` > 0 or a val/ folder beside test/); without one, by their final-epoch training accuracy, and
the report says so. Test numbers are shown, never used to rank or pick. Which epoch is a run's best is
decided by :func:`transferlab.selection.best_epoch`, the rule that chose the weights it kept.
"""

from __future__ import annotations

import os

import numpy as np

from ..io.expdir import TEST, ExperimentDir
from ..io.rundir import RunDir
from ..selection import best_epoch, finite_float, ranking_key

METRICS = ("accuracy", "precision", "recall", "f1", "precision_weighted", "recall_weighted", "f1_weighted",
           "roc_auc")


def selection(history: list[dict]) -> dict:
    """The last stage's best epoch (the weights that were kept) with its validation accuracy and loss, and
    the final epoch's training accuracy and loss."""
    out = {"val_score": None, "val_loss": None, "train_acc": None, "train_loss": None, "epoch": None}
    if not history:
        return out
    last_stage = history[-1].get("stage")
    best = best_epoch(r for r in history if r.get("stage") == last_stage)
    if best is not None:
        out["val_score"], out["val_loss"] = finite_float(best["val_acc"]), finite_float(best.get("val_loss"))
        out["epoch"] = int(best["epoch"])
    last = history[-1]
    out["train_acc"], out["train_loss"] = finite_float(last.get("train_acc")), finite_float(last.get("train_loss"))
    return out


def _run_record(entry: dict, order: int, run_dir: RunDir, datasets: list[str]) -> dict:
    record = {**entry, "order": order, "dir": str(run_dir.path), "finished": run_dir.is_finished()}
    if not record["finished"]:
        return record
    config, metrics, history = run_dir.read_config(), run_dir.read_metrics(), run_dir.read_history()
    report = run_dir.read_data_report()
    chosen = selection(history)
    n_train = sum((report.get("counts", {}).get("train") or {}).values())
    seconds = metrics.get("train_seconds") or 0.0
    record.update({"config": config["train"], "classes": config["classes"], "policy": config.get("policy"),
                   "versions": config.get("versions"), "data_report": report, "history_epochs": len(history),
                   "val_score": chosen["val_score"], "final_train_acc": chosen["train_acc"],
                   "selected_epoch": chosen["epoch"], "selection_loss": None, "_selection": chosen,
                   "train_seconds": metrics.get("train_seconds"),
                   "images_per_s": n_train * len(history) / seconds if seconds else None,
                   "n_train": n_train, "datasets": {TEST: metrics}})
    for name in datasets[1:]:
        evaluation = run_dir.evaluation(name).read_metrics()
        if evaluation is not None:
            record["datasets"][name] = evaluation
    return record


def collect(exp_dir: str | os.PathLike) -> dict:
    """Everything the tables, charts and report need, read from the files on disk."""
    exp = ExperimentDir(exp_dir)
    meta = exp.read_experiment()
    datasets = [TEST] + [e["name"] for e in meta.get("eval_on", [])]
    runs = [_run_record(entry, order, exp.run(entry["name"]), datasets) for order, entry in enumerate(meta["runs"])]
    done = [r for r in runs if r["finished"]]
    by_validation = bool(done) and all(r["val_score"] is not None for r in done)
    for r in done:
        r["selection_score"] = r["val_score"] if by_validation else r["final_train_acc"]
        r["selection_loss"] = r.pop("_selection")["val_loss" if by_validation else "train_loss"]
    ranked = sorted(done, key=lambda r: (*ranking_key(r["selection_score"], r["selection_loss"]), r["order"]))
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    groups = _aggregate(done, datasets)
    best_groups = [g for g in groups if g["rank"] is not None][:2]
    best = _group_run(best_groups[0], runs) if best_groups else None
    second = _group_run(best_groups[1], runs) if len(best_groups) > 1 else None
    return {"meta": meta, "dir": str(exp.path), "datasets": datasets, "runs": runs, "groups": groups,
            "selection_by": "validation accuracy" if by_validation else "final training accuracy",
            "has_validation": by_validation, "seeds": meta["grid"]["seeds"], "references": exp.read_references(),
            "best": best, "second": second, "mcnemar": mcnemar_runs(best, second) if best and second else None}


def _group_run(group: dict, runs: list[dict]) -> dict:
    """The group's run with the first seed (so that two groups' runs share their test images)."""
    members = [r for r in runs if r["finished"] and r["group"] == group["group"]]
    return min(members, key=lambda r: r["order"])



def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None



def _aggregate(runs: list[dict], datasets: list[str]) -> list[dict]:
    """One row per configuration (runs that differ only by seed): mean and sample std over seeds."""
    groups: dict[str, dict] = {}
    for r in runs:
        g = groups.setdefault(r["group"], {"group": r["group"], "label": r["label"], "order": r["order"],
                                           "runs": [], "axes": {k: v for k, v in r["axes"].items() if k != "seed"}})
        g["runs"].append(r)
    out = []
    for g in groups.values():
        members = g["runs"]
        g["seeds"] = [r["seed"] for r in members]
        g["selection_score"], g["selection_std"] = mean_std([r["selection_score"] for r in members])
        g["selection_loss"], _ = mean_std([r["selection_loss"] for r in members])
        g["val_score"], g["val_std"] = mean_std([r["val_score"] for r in members])
        g["train_seconds"], _ = mean_std([r["train_seconds"] for r in members])
        g["images_per_s"], _ = mean_std([r["images_per_s"] for r in members])
        g["datasets"] = {}
        for d in datasets:
            ms = [r["datasets"][d] for r in members if d in r["datasets"]]
            if not ms:
                continue
            stats = {m: mean_std([finite_float(x.get(m)) for x in ms]) for m in METRICS}
            stats["n_test"] = (ms[0].get("n_test"), None)
            stats["ci95"] = ms[0].get("accuracy_ci95") if len(ms) == 1 else None
            g["datasets"][d] = stats
        out.append(g)
    ranked = sorted(out, key=lambda g: (*ranking_key(g["selection_score"], g["selection_loss"]), g["order"]))
    for i, g in enumerate(ranked, 1):
        g["rank"] = i if g["selection_score"] is not None else None
    return ranked



def mcnemar(correct_a, correct_b) -> dict:
    """Exact McNemar test: a two-sided binomial test on the discordant pairs (a right/b wrong vs the reverse)."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b = np.asarray(correct_b, dtype=bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = float(binomtest(only_a, discordant, 0.5).pvalue) if discordant else 1.0
    return {"n": int(len(a)), "both_right": int((a & b).sum()), "both_wrong": int((~a & ~b).sum()),
            "only_a": only_a, "only_b": only_b, "p_value": p}



def mcnemar_runs(a: dict, b: dict) -> dict | None:
    pa = {r["path"]: r["true"] == r["pred"] for r in RunDir(a["dir"]).read_test_predictions()}
    pb = {r["path"]: r["true"] == r["pred"] for r in RunDir(b["dir"]).read_test_predictions()}
    common = sorted(set(pa) & set(pb))
    if not common:
        return None
    out = mcnemar([pa[p] for p in common], [pb[p] for p in common])
    out |= {"a": a["name"], "b": b["name"], "a_label": a["label"], "b_label": b["label"]}
    return out

