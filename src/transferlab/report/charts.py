"""The data behind the comparison chart (the grouped bar chart of every configuration on every metric)."""

from __future__ import annotations

from ..experiment.grid import AXIS_FIELD, GRID_AXES
from ..experiment.results import mean_std
from ..selection import finite_float


def comparison_chart_data(results: dict, dataset: str) -> dict:
    """Configurations in grid order (grouped by the grid's axes), then the reference rows."""
    labels, reference, separators = [], [], []
    metrics = ("accuracy", "precision", "recall", "f1")
    values = {m: [] for m in metrics}
    errors = {m: [] for m in metrics}
    previous = None
    for g in sorted(results["groups"], key=lambda g: g["order"]):
        stats = g["datasets"].get(dataset)
        if stats is None:
            continue
        varying = [a for a in GRID_AXES[:-1] if len(results["meta"]["grid"][a]) > 1]
        # a line between the values of the outermost varying axis, when another axis varies inside it
        outer = g["axes"].get(AXIS_FIELD[varying[0]]) if len(varying) > 1 else None
        if previous is not None and outer != previous:
            separators.append(len(labels))
        previous = outer
        labels.append(g["label"])
        reference.append(False)
        for m in metrics:
            values[m].append(stats[m][0])
            errors[m].append(stats[m][1])
    refs = (results.get("references") or {}).get("datasets", {}).get(dataset, {})
    if labels and refs:
        separators.append(len(labels))
    for kind, name in (("probe", "reference: LR probe"), ("majority", "reference: majority class")):
        entries = refs.get(kind)
        if not entries:
            continue
        labels.append(name)
        reference.append(True)
        for m in metrics:
            mean, std = mean_std([finite_float(e.get(m)) for e in entries])
            values[m].append(mean)
            errors[m].append(std)
    return {"labels": labels, "values": values, "errors": errors, "reference": reference, "separators": separators}

