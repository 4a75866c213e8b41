"""The results tables: one per dataset, every run, across datasets, and the rows of results.csv.

Each table is ``{"columns": [...], "rows": [{"cells": [{"text", "value", "bold"}], "kind"}]}``: the
markdown and the HTML report render the same cells (value: what a column sorts by; bold: the best value of
a column among the runs; kind "reference" for the reference rows).
"""

from __future__ import annotations

from pathlib import Path

from ..experiment.results import mean_std
from ..io.expdir import TEST
from ..selection import finite_float

# metrics.json key -> results.csv column ("precision" alone would clash with the TrainConfig field)
CSV_METRICS = {"accuracy": "accuracy", "precision": "precision_macro", "recall": "recall_macro", "f1": "f1_macro",
               "precision_weighted": "precision_weighted", "recall_weighted": "recall_weighted",
               "f1_weighted": "f1_weighted", "roc_auc": "roc_auc"}



def csv_rows(results: dict) -> list[dict]:
    """One row per finished run and dataset (its own test split, then each --eval-on folder)."""
    rows = []
    for r in results["runs"]:
        if not r["finished"]:
            continue
        for d in results["datasets"]:
            m = r["datasets"].get(d)
            if m is None:
                continue
            low, high = m.get("accuracy_ci95") or (None, None)
            row = {"run": r["name"], "configuration": r["label"], "dataset": d, "rank": r["rank"],
                   **{k: v for k, v in r["config"].items()},
                   "selection_by": results["selection_by"], "val_score": r["val_score"],
                   "selection_score": r["selection_score"], "selection_loss": r["selection_loss"]}
            row |= {column: m.get(key) for key, column in CSV_METRICS.items()}
            row |= {"accuracy_ci95_low": low, "accuracy_ci95_high": high, "train_seconds": r["train_seconds"],
                    "images_per_s": round(r["images_per_s"], 2) if r["images_per_s"] else None,
                    "n_test": m.get("n_test")}
            rows.append(row)
    return rows



def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)



def _cell(mean, std=None, digits=4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"



TABLE_METRICS = (("accuracy", "accuracy"), ("precision", "precision (macro)"), ("recall", "recall (macro)"),
                 ("f1", "F1 (macro)"), ("f1_weighted", "F1 (weighted)"), ("roc_auc", "ROC AUC"))



def _reference_rows(results: dict, dataset: str, multi_seed: bool) -> list[dict]:
    """The majority-class and probe rows of the main table (mean ± std over seeds)."""
    rows = []
    refs = (results.get("references") or {}).get("datasets", {}).get(dataset, {})
    for kind, label in (("majority", "reference: majority class"), ("probe", "reference: logistic-regression probe")):
        entries = refs.get(kind)
        if not entries:
            continue
        name = label + (f" ({entries[0]['class']})" if kind == "majority" else
                        f" on frozen {results['references']['backbone']} features")
        cells = [("–", None), (name, name)] + ([(",".join(str(e["seed"]) for e in entries), len(entries))]
                                               if multi_seed else [])
        cells.append(("–", None))
        for key, _ in TABLE_METRICS:
            mean, std = mean_std([finite_float(e.get(key)) for e in entries])
            cells.append((_cell(mean, std), mean))
        ci = entries[0].get("accuracy_ci95") if len(entries) == 1 else None
        cells.append((f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "–", ci[0] if ci else None))
        cells += [("–", None), ("–", None), (_fmt(entries[0].get("n_test")), entries[0].get("n_test"))]
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "reference"})
    return rows


def results_table(results: dict, dataset: str = TEST) -> dict:
    """The main table for one dataset: a row per configuration (mean ± std over seeds), ranked by the
    selection score, then the reference rows. Cells carry the text, a sort value and a bold flag."""
    multi_seed = len(results["seeds"]) > 1
    columns = ["rank", "configuration"] + (["seeds"] if multi_seed else [])
    columns += ["validation acc" if results["has_validation"] else "selection (train acc)"]
    columns += [title for _, title in TABLE_METRICS] + ["95% CI (acc)", "train s", "images/s", "n test"]
    higher_better = {title: True for _, title in TABLE_METRICS} | {"images/s": True, "train s": False}
    rows = []
    for g in results["groups"]:
        stats = g["datasets"].get(dataset)
        if stats is None:
            continue
        cells = [(_fmt(g["rank"]), g["rank"]), (g["label"], g["label"])]
        if multi_seed:
            cells.append((",".join(map(str, g["seeds"])), len(g["seeds"])))
        cells.append((_cell(g["selection_score"], g["selection_std"]), g["selection_score"]))
        for key, _ in TABLE_METRICS:
            mean, std = stats[key]
            cells.append((_cell(mean, std), mean))
        ci = stats.get("ci95")
        cells.append((f"{ci[0]:.3f}–{ci[1]:.3f}" if ci else "see per-run table", ci[0] if ci else None))
        cells.append((_fmt(g["train_seconds"], 1), g["train_seconds"]))
        cells.append((_fmt(g["images_per_s"], 1), g["images_per_s"]))
        n_test = stats["n_test"][0]
        cells.append((_fmt(n_test), n_test))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run",
                     "group": g["group"]})
    for i, title in enumerate(columns):  # bold: best value of the column among the runs
        if title not in higher_better:
            continue
        values = [r["cells"][i]["value"] for r in rows if r["cells"][i]["value"] is not None]
        if values:
            best = max(values) if higher_better[title] else min(values)
            for r in rows:
                if r["cells"][i]["value"] == best:
                    r["cells"][i]["bold"] = True
    rows += _reference_rows(results, dataset, multi_seed)
    return {"columns": columns, "rows": rows, "dataset": dataset}



def runs_table(results: dict) -> dict:
    """Every run (each seed) on its test split: the per-run numbers behind a mean ± std."""
    columns = ["rank", "run", "seed", "selection", "accuracy", "95% CI", "F1 (macro)", "n test", "train s"]
    rows = []
    for r in sorted([r for r in results["runs"] if r["finished"]], key=lambda r: r["rank"]):
        m = r["datasets"][TEST]
        ci = m.get("accuracy_ci95") or [None, None]
        cells = [(str(r["rank"]), r["rank"]), (r["name"], r["name"]), (str(r["seed"]), r["seed"]),
                 (_fmt(r["selection_score"]), r["selection_score"]), (_fmt(m["accuracy"]), m["accuracy"]),
                 (f"{ci[0]:.3f}–{ci[1]:.3f}" if ci[0] is not None else "–", ci[0]), (_fmt(m["f1"]), m["f1"]),
                 (str(m.get("n_test")), m.get("n_test")), (_fmt(r["train_seconds"], 1), r["train_seconds"])]
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run"})
    return {"columns": columns, "rows": rows}



def cross_table(results: dict) -> dict | None:
    """Accuracy and macro F1 per configuration on each dataset (a column group per dataset)."""
    if len(results["datasets"]) < 2:
        return None
    datasets = results["datasets"]
    rows = []
    for g in results["groups"]:
        cells = [(_fmt(g["rank"]), g["rank"]), (g["label"], g["label"])]
        for d in datasets:
            stats = g["datasets"].get(d)
            for key in ("accuracy", "f1"):
                mean, std = stats[key] if stats else (None, None)
                cells.append((_cell(mean, std), mean))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "run"})
    for i in range(2, 2 + 2 * len(datasets)):
        values = [r["cells"][i]["value"] for r in rows if r["cells"][i]["value"] is not None]
        for r in rows:
            r["cells"][i]["bold"] = bool(values) and r["cells"][i]["value"] == max(values)
    refs = (results.get("references") or {}).get("datasets", {})
    for kind, name in (("majority", "reference: majority class"), ("probe", "reference: logistic-regression probe")):
        cells = [("–", None), (name, name)]
        for d in datasets:
            entries = refs.get(d, {}).get(kind) or []
            for key in ("accuracy", "f1"):
                mean, std = mean_std([finite_float(e.get(key)) for e in entries])
                cells.append((_cell(mean, std), mean))
        rows.append({"cells": [{"text": t, "value": v, "bold": False} for t, v in cells], "kind": "reference"})
    n_tests = {d: next((g["datasets"][d]["n_test"][0] for g in results["groups"] if d in g["datasets"]), None)
               for d in datasets}
    return {"datasets": [{"name": d, "n_test": n_tests[d]} for d in datasets], "rows": rows,
            "columns": ["rank", "configuration"] + [f"{d} {k}" for d in datasets for k in ("accuracy", "F1")]}



def dataset_title(results: dict, dataset: str) -> str:
    if dataset == TEST:
        return f"test split of {Path(results['meta']['data_dir']).name}"
    path = next(e["path"] for e in results["meta"]["eval_on"] if e["name"] == dataset)
    return f"{dataset} ({path})"

