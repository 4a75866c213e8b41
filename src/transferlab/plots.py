"""Figures, each written atomically as a PNG.

Drawn on :class:`matplotlib.figure.Figure` with the Agg canvas, never through pyplot: a notebook user's
backend and pyplot's global list of open figures are left alone, and drawing is safe from several threads.
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np

from .io.files import write_bytes


def _png_bytes(fig) -> bytes:
    """Render a figure with the Agg canvas: no pyplot, so the caller's matplotlib backend is never touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


# The runs of an experiment share class distributions (and often confusion matrices), and drawing is most
# of what saving a run costs: PNG bytes are remembered by the figure's inputs (JSON text, so hashable).
# lru_cache is bounded and safe to call from several threads.
@functools.lru_cache(maxsize=64)
def _drawn(kind: str, arguments: str) -> bytes:
    return _DRAW[kind](**json.loads(arguments))


def _write_figure(kind: str, target: str | os.PathLike, **arguments) -> None:
    # no sort_keys: the order of dict entries (metrics, splits) is the order of bars and legends
    write_bytes(target, _drawn(kind, json.dumps(arguments)))


def confusion_matrix_png(matrix: list[list[int]], classes: list[str], target: str | os.PathLike,
                         title: str = "Confusion matrix (test)") -> None:
    """Counts (left) and row-normalised recall (right); rows are true classes, columns predictions."""
    _write_figure("confusion_matrix", target, matrix=matrix, classes=classes, title=title)


def class_distribution_png(counts: dict[str, dict[str, int]], target: str | os.PathLike) -> None:
    """Grouped bar graph: images per class, one bar per split. ``counts``: split -> class -> count."""
    _write_figure("class_distribution", target, counts=counts)


def training_curves_png(history: list[dict], target: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, train and validation (when there is a validation split)."""
    _write_figure("training_curves", target, history=history)


def _draw_confusion_matrix(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    side = min(3 + 0.45 * k, 14)
    fig = _figure((2 * side + 1, side))
    axes = fig.subplots(1, 2)
    for ax, data, fmt, sub in ((axes[0], cm, "{:.0f}", "counts"), (axes[1], norm, "{:.2f}", "row-normalised")):
        ax.imshow(data, cmap="Blues", vmin=0, vmax=max(data.max(), 1e-9))
        ax.set_xticks(range(k), classes, rotation=45 if k > 3 else 0, ha="right" if k > 3 else "center")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{title}: {sub}")
        if k <= 30:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if data[i, j] > 0.6 * data.max() else "black")
    fig.tight_layout()
    return _png_bytes(fig)


def _draw_class_distribution(counts: dict[str, dict[str, int]]) -> bytes:
    splits = [s for s in counts if counts[s]]
    classes = list(next(iter(counts.values())).keys())
    k = len(classes)
    fig = _figure((min(4 + 0.5 * k, 20), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, len(splits))
    x = np.arange(k)
    for i, split in enumerate(splits):
        values = [counts[split].get(c, 0) for c in classes]
        bars = ax.bar(x + (i - (len(splits) - 1) / 2) * width, values, width, label=split)
        if k <= 20:
            ax.bar_label(bars, fontsize=8)
    ax.set_xticks(x, classes, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
    ax.set_ylabel("images")
    ax.set_title("Class distribution")
    ax.legend()
    fig.tight_layout()
    return _png_bytes(fig)


def _draw_training_curves(history: list[dict]) -> bytes:
    epochs = list(range(1, len(history) + 1))
    fig = _figure((11, 4))
    axes = fig.subplots(1, 2)
    for ax, key in ((axes[0], "loss"), (axes[1], "acc")):
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label="train")
        val = [row.get(f"val_{key}") for row in history]
        if any(v is not None and v == v for v in val):
            ax.plot(epochs, [np.nan if v is None else v for v in val], marker="o", label="validation")
        stages = [row.get("stage") for row in history]
        for i in range(1, len(stages)):
            if stages[i] != stages[i - 1]:
                ax.axvline(i + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if key == "loss" else "accuracy")
        ax.set_title("loss" if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _png_bytes(fig)


def comparison_png(chart: dict, target: str | os.PathLike, title: str = "Comparison (test)") -> None:
    """Grouped horizontal bars: one group per configuration (top to bottom in the given order), one bar per
    metric, the value printed at the end of each bar, error bars (std over seeds) where given. ``chart``:
    ``labels``, ``values`` and ``errors`` (metric -> one value per label), ``reference`` (flags: hatched
    rows) and ``separators`` (indices where a new group of the grid starts: a thin line)."""
    _write_figure("comparison", target, title=title, **chart)


def _draw_comparison(labels: list[str], values: dict[str, list[float | None]],
                     errors: dict[str, list[float | None]], title: str, reference: list[bool] | None = None,
                     separators: list[int] | None = None) -> bytes:
    import matplotlib

    metrics = list(values)
    n, m = len(labels), len(metrics)
    reference = reference or [False] * n
    bar_h = 0.8 / max(1, m)
    fig = _figure((10, 1.2 + n * (0.32 * m + 0.25)))
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    y = np.arange(n)
    for j, metric in enumerate(metrics):
        pos = y + (j - (m - 1) / 2) * bar_h
        vals = np.array([np.nan if v is None else v for v in values[metric]], dtype=float)
        errs = errors.get(metric) or [None] * n
        xerr = np.array([0.0 if e is None else e for e in errs], dtype=float)
        bars = ax.barh(pos, np.nan_to_num(vals), bar_h * 0.92, color=colors[j % 10], label=metric,
                       xerr=xerr if xerr.any() else None, error_kw={"ecolor": "black", "capsize": 2, "lw": 0.8})
        for bar, is_ref in zip(bars, reference, strict=True):
            if is_ref:
                bar.set_hatch("///")
                bar.set_alpha(0.55)
        for p, v, e in zip(pos, vals, xerr, strict=True):
            if not np.isnan(v):
                text = f"{v:.3f}" + (f" ± {e:.3f}" if e else "")
                ax.text(min(v + e, 1.0) + 0.008, p, text, va="center", fontsize=7)
    for s in separators or []:
        ax.axhline(s - 0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_yticks(y, labels, fontsize=9)
    ax.set_ylim(n - 0.5, -0.5)  # first configuration on top, no empty margin
    ax.set_xlim(0, 1.18)
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("score")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.25 / max(3, n)), ncol=m, frameon=False,
              fontsize=9)
    fig.tight_layout()
    return _png_bytes(fig)


def learning_curve_png(points: list[dict], fit: dict | None, classes: list[str], target: str | os.PathLike) -> None:
    """Accuracy (left, with the fitted curve and its 95% band) and per-class recall (right) against training
    images per class. ``points``: per_class, accuracy, recall (one per class); ``fit``: per_class, accuracy,
    low, high (lists), or None."""
    _write_figure("learning_curve", target, points=points, fit=fit, classes=classes)


def _draw_learning_curve(points: list[dict], fit: dict | None, classes: list[str]) -> bytes:
    import matplotlib

    fig = _figure((11, 4.2))
    left, right = fig.subplots(1, 2)
    n = np.array([p["per_class"] for p in points], dtype=float)
    left.scatter(n, [p["accuracy"] for p in points], color="black", s=14, label="measured", zorder=3)
    if fit:
        left.plot(fit["per_class"], fit["accuracy"], color="tab:blue", label="fitted power law")
        left.fill_between(fit["per_class"], fit["low"], fit["high"], color="tab:blue", alpha=0.2,
                          label="95% interval of a measurement")
        left.axvline(max(n), color="grey", linestyle="--", linewidth=1)
    left.set_xscale("log")
    left.set_xlabel("training images per class")
    left.set_ylabel("accuracy (held-out split)")
    left.set_title("Learning curve (frozen features)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    sizes = sorted(set(n.tolist()))
    colors = matplotlib.colormaps["tab20"].colors
    for c, name in enumerate(classes):
        means = []
        for size in sizes:
            values = [p["recall"][c] for p in points if p["per_class"] == size and p["recall"][c] is not None]
            means.append(np.mean(values) if values else np.nan)
        right.plot(sizes, means, marker="o", markersize=3, color=colors[c % 20],
                   label=name if len(classes) <= 20 else None)
    right.set_xscale("log")
    right.set_xlabel("training images per class")
    right.set_ylabel("recall (mean over repeats)")
    right.set_title("Per-class recall")
    right.grid(alpha=0.3)
    if len(classes) <= 20:
        right.legend(fontsize=7, ncol=2 if len(classes) > 8 else 1)
    fig.tight_layout()
    return _png_bytes(fig)


def reliability_png(calibration: dict, target: str | os.PathLike, title: str = "Reliability (test)") -> None:
    """Accuracy against confidence per bin, before and after temperature scaling (``calibration``: the
    ``calibration`` entry of metrics.json)."""
    _write_figure("reliability", target, calibration={k: calibration[k] for k in (
        "temperature", "ece_before", "ece_after", "reliability_before", "reliability_after")}, title=title)


def _draw_reliability(calibration: dict, title: str) -> bytes:
    fig = _figure((8.4, 3.9))
    for i, name in enumerate(("before", "after")):
        ax = fig.add_subplot(1, 2, i + 1)
        bins = calibration[f"reliability_{name}"]
        centres = [(b["low"] + b["high"]) / 2 for b in bins]
        width = [b["high"] - b["low"] for b in bins]
        ax.bar(centres, [b["accuracy"] for b in bins], width=width, edgecolor="#1f4e79", color="#8fb4d9",
               label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#c0392b", ms=3,
                label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        t = 1.0 if name == "before" else calibration["temperature"]
        ax.set_title(f"{name} temperature scaling (T = {t:.2f})\nECE {calibration[f'ece_{name}']:.4f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-1 probability)")
        if i == 0:
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png_bytes(fig)


_DRAW = {"confusion_matrix": _draw_confusion_matrix, "class_distribution": _draw_class_distribution,
         "training_curves": _draw_training_curves, "comparison": _draw_comparison,
         "learning_curve": _draw_learning_curve, "reliability": _draw_reliability}
