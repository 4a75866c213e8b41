"""Figures (matplotlib, Agg backend), each written atomically as a PNG."""

from __future__ import annotations

import functools
import json
import os
from collections import OrderedDict

import numpy as np

from .fileio import atomic_path, write_bytes

# PNG bytes of figures already drawn in this process, by their inputs: the runs of an experiment share
# class distributions (and often confusion matrices), and drawing is most of what saving a run costs.
_DRAWN: OrderedDict[str, bytes] = OrderedDict()
_DRAWN_MAX = 64


def _drawn_once(draw):
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        names = draw.__code__.co_varnames[:draw.__code__.co_argcount]
        call = dict(zip(names, args, strict=False)) | kwargs
        target = call.pop("target")
        key = json.dumps([draw.__name__, call], sort_keys=True, default=str)
        if key in _DRAWN:
            _DRAWN.move_to_end(key)
            write_bytes(target, _DRAWN[key])
            return
        draw(*args, **kwargs)
        with open(target, "rb") as fh:
            _DRAWN[key] = fh.read()
        if len(_DRAWN) > _DRAWN_MAX:
            _DRAWN.popitem(last=False)
    return wrapper


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, target: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


@_drawn_once
def confusion_matrix_png(matrix: list[list[int]], classes: list[str], target: str | os.PathLike,
                         title: str = "Confusion matrix (test)") -> None:
    """Counts (left) and row-normalised recall (right); rows are true classes, columns predictions."""
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    k = len(classes)
    side = min(3 + 0.45 * k, 14)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
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
    _save(fig, target)


@_drawn_once
def class_distribution_png(counts: dict[str, dict[str, int]], target: str | os.PathLike) -> None:
    """Grouped bar graph: images per class, one bar per split. ``counts``: split -> class -> count."""
    plt = _pyplot()
    splits = [s for s in counts if counts[s]]
    classes = list(next(iter(counts.values())).keys())
    k = len(classes)
    fig, ax = plt.subplots(figsize=(min(4 + 0.5 * k, 20), 4.5))
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
    _save(fig, target)


@_drawn_once
def training_curves_png(history: list[dict], target: str | os.PathLike) -> None:
    """Loss and accuracy per epoch, train and validation (when there is a validation split)."""
    plt = _pyplot()
    epochs = list(range(1, len(history) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    _save(fig, target)


def comparison_png(labels: list[str], values: dict[str, list[float | None]], errors: dict[str, list[float | None]],
                   target: str | os.PathLike, title: str = "Comparison (test)", reference: list[bool] | None = None,
                   separators: list[int] | None = None) -> None:
    """Grouped horizontal bars: one group per configuration (top to bottom in the given order), one bar per
    metric, the value printed at the end of each bar, error bars (std over seeds) where given. Reference
    rows are hatched; ``separators`` are indices where a new group of the grid starts (a thin line)."""
    plt = _pyplot()
    metrics = list(values)
    n, m = len(labels), len(metrics)
    reference = reference or [False] * n
    bar_h = 0.8 / max(1, m)
    fig, ax = plt.subplots(figsize=(10, 1.2 + n * (0.32 * m + 0.25)))
    colors = plt.get_cmap("tab10").colors
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
    _save(fig, target)
