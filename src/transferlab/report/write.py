"""Write an experiment's results files: results.csv, results.md, the comparison charts and the class
distribution, all from :func:`transferlab.experiment.results.collect`."""

from __future__ import annotations

import csv
import io
import os

from ..config import TrainConfig
from ..experiment.results import collect
from ..io.expdir import ExperimentDir
from ..io.files import write_text
from ..plots import class_distribution_png, comparison_png
from .charts import comparison_chart_data
from .markdown import results_markdown
from .tables import CSV_METRICS, csv_rows, dataset_title

CSV_FIELDS = ["run", "configuration", "dataset", "rank", *TrainConfig.field_names(), "selection_by", "val_score",
              "selection_score", "selection_loss", "accuracy", "accuracy_ci95_low", "accuracy_ci95_high",
              *list(CSV_METRICS.values())[1:], "train_seconds", "images_per_s", "n_test"]


def results_csv(results: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in csv_rows(results):
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def write_results(exp_dir: str | os.PathLike) -> dict:
    """results.csv, results.md, comparison.png (+ one per --eval-on folder) and class_distribution.png;
    returns the collected results, with ``figures`` (dataset -> chart file name) added."""
    exp = ExperimentDir(exp_dir)
    results = collect(exp.path)
    write_text(exp.results_csv, results_csv(results))
    write_text(exp.results_markdown, results_markdown(results))
    results["figures"] = {}
    for d in results["datasets"]:
        chart = comparison_chart_data(results, d)
        if chart["labels"]:
            name = exp.comparison_name(d)
            comparison_png(chart, exp.path / name, title=f"Comparison on the {dataset_title(results, d)}")
            results["figures"][d] = name
    first = next((r for r in results["runs"] if r["finished"]), None)
    if first and first["data_report"].get("counts"):
        class_distribution_png({k: v for k, v in first["data_report"]["counts"].items() if v}, exp.class_distribution)
    return results
