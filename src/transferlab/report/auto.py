"""auto.md: the ``--strategy auto`` search of a run as Markdown (every candidate, the finalists, the choice)."""

from __future__ import annotations

from .markdown import markdown_table


def _cell(text, bold: bool = False) -> dict:
    return {"text": "–" if text is None else str(text), "bold": bold}


def _row(cells: list[dict]) -> dict:
    return {"kind": "run", "cells": cells}


def candidates_table(record: dict) -> dict:
    best = max((c["cv_accuracy"] for c in record["candidates"] if c["cv_accuracy"] is not None), default=None)
    rows = []
    for c in record["candidates"]:
        acc = None if c["cv_accuracy"] is None else f"{c['cv_accuracy']:.4f} ± {c['cv_accuracy_se']:.4f}"
        loss = None if c["cv_log_loss"] is None else f"{c['cv_log_loss']:.4f}"
        rows.append(_row([_cell(c["backbone"]), _cell(c["image_size"]), _cell(c["head"]),
                          _cell(acc, best is not None and c["cv_accuracy"] == best), _cell(loss),
                          _cell(c.get("gflops")), _cell(f"{c['feature_seconds']:.1f}"),
                          _cell(c["cv_seconds"] and f"{c['cv_seconds']:.1f}"),
                          _cell(c["skipped"] or "")]))
    columns = ["Backbone", "Input", "Head", f"{record['folds']}-fold CV accuracy ± SE", "CV log-loss",
               "GFLOPs / image", "Features (s)", "CV (s)", "Note"]
    return {"columns": columns, "rows": rows}


def finalists_table(record: dict) -> dict:
    rows = []
    for f in record["finalists"]:
        chosen = f["name"] == record["chosen"]
        acc = None if f["val_accuracy"] is None else f"{f['val_accuracy']:.4f}"
        loss = None if f["val_loss"] is None else f"{f['val_loss']:.4f}"
        rows.append(_row([_cell(f["name"], chosen), _cell(f["epochs"]), _cell(acc, chosen), _cell(loss),
                          _cell(f"{f['seconds']:.0f}"), _cell(f["run_dir"] if f["skipped"] is None else f["skipped"])]))
    return {"columns": ["Finalist", "Epochs", "Validation accuracy", "Validation loss", "Seconds", "Run / note"],
            "rows": rows}


def auto_markdown(record: dict) -> str:
    limit = "no time limit" if record["time_limit"] is None else f"time limit {record['time_limit']:.0f} s"
    lines = ["# --strategy auto", "",
             f"Chosen: **{record['chosen']}**: {record['reason']}. Search and training took "
             f"{record['seconds']:.0f} s ({limit}).", "",
             "## Frozen candidates, ranked by cross-validation on the training split", "",
             markdown_table(candidates_table(record)), "",
             "## Finalists, judged on the validation split "
             f"({record['val_size']:.0%} of the training images, held out)", "",
             markdown_table(finalists_table(record)), "",
             "The test split ranked nothing: each finalist's test scores are in its own run directory, "
             "for the record only."]
    return "\n".join(lines + [f"- {note}" for note in record["notes"]]) + "\n"
