"""Summarise `benchmarks/measure_accuracy.sh OUT` as one Markdown table (issue 7).

    python benchmarks/accuracy_table.py runs/accuracy

One row per (experiment, evaluation set, backbone, strategy): test accuracy mean +- sample std over seeds,
the per-seed values, a 95% Wilson interval at the mean accuracy over the n test images, and the mean
accuracy with test-time augmentation where `evaluate --tta` was run.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from transferlab.metrics import wilson_interval


def wilson(p: float, n: int) -> tuple[float, float]:
    return wilson_interval(round(p * n), n)


def main(out: str) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for results in sorted(Path(out).glob("*/results.csv")):
        with open(results, newline="") as fh:
            for row in csv.DictReader(fh):
                key = (results.parent.name, row["dataset"], row["backbone"], row["strategy"],
                       row["image_size"] or "default")
                tta = results.parent / "runs" / row["run"] / "evaluations" / "tta" / "metrics.json"
                row["tta_accuracy"] = json.loads(tta.read_text())["accuracy"] if tta.is_file() else None
                groups[key].append(row)
    print("| experiment | evaluated on | backbone | strategy | image size | seeds | accuracy mean ± std | per seed "
          "| 95% CI at the mean | with --tta |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (exp, dataset, backbone, strategy, size), rows in groups.items():
        rows.sort(key=lambda r: int(r["seed"]))
        accs = [float(r["accuracy"]) for r in rows]
        mean = statistics.fmean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        low, high = wilson(mean, int(rows[0]["n_test"]))
        ttas = [r["tta_accuracy"] for r in rows if r["tta_accuracy"] is not None]
        tta = f"{statistics.fmean(ttas):.4f} ({len(ttas)} seeds)" if ttas else "–"
        print(f"| {exp} | {dataset} (n={rows[0]['n_test']}) | {backbone} | {strategy} | {size} | "
              f"{','.join(r['seed'] for r in rows)} | {mean:.4f} ± {std:.4f} | {', '.join(f'{a:.4f}' for a in accs)} "
              f"| {low:.3f}–{high:.3f} | {tta} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/accuracy")
