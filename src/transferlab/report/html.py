"""report.html: one self-contained page (inline CSS, JS and images as data: URIs; opens from disk offline)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
from pathlib import Path

from .. import __version__
from ..data.decode import ImageDecodeError, load_rgb
from ..io.auditdir import AuditDir
from ..io.expdir import TEST, ExperimentDir
from ..io.files import write_text
from ..io.rundir import RunDir
from .tables import cross_table, dataset_title, results_table, runs_table
from .write import write_results

log = logging.getLogger("transferlab")

TOP_LOSSES = 12
THUMBNAIL = 160


def data_uri(path: Path, mime: str = "image/png") -> str | None:
    try:
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    except OSError:
        return None


def thumbnail_uri(path: str | os.PathLike, size: int = THUMBNAIL) -> str | None:
    """A JPEG thumbnail (EXIF orientation applied) as a data: URI; None when the file cannot be read."""
    from PIL import Image

    try:
        im = load_rgb(path)
    except (ImageDecodeError, OSError):
        return None
    im = im.convert("RGB") if im.mode != "RGB" else im
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def top_losses(run: dict, limit: int = TOP_LOSSES) -> list[dict]:
    """The run's most confidently misclassified test images, highest score of the wrong class first."""
    wrong = [r for r in RunDir(run["dir"]).read_test_predictions() if r["true"] != r["pred"]]
    wrong.sort(key=lambda r: -float(r["score"]))
    out = []
    for r in wrong[:limit]:
        out.append({"path": r["path"], "name": Path(r["path"]).name, "true": r["true"], "pred": r["pred"],
                    "score": float(r["score"]), "thumb": thumbnail_uri(r["path"])})
    return out


def _leakage_rows(leakage: dict | None, limit: int = 24) -> list[dict]:
    if not leakage:
        return []
    rows = []
    for pair in leakage["pairs"][:limit]:
        rows.append({**pair, "test_thumb": thumbnail_uri(pair["test"], 96),
                     "train_thumb": thumbnail_uri(pair["train"], 96)})
    return rows


def _skipped(results: dict) -> list[dict]:
    seen, out = set(), []
    for r in results["runs"]:
        for item in (r.get("data_report") or {}).get("skipped", []):
            if item["path"] not in seen:
                seen.add(item["path"])
                out.append(item)
    return out


def _per_run(results: dict) -> list[dict]:
    """Each finished run's figures (confusion matrices, training curves), best rank first."""
    out = []
    for r in sorted([r for r in results["runs"] if r["finished"]], key=lambda r: r["rank"]):
        run_dir = RunDir(r["dir"])
        evals = []
        for d in results["datasets"][1:]:
            uri = data_uri(run_dir.evaluation(d).confusion_matrix)
            if uri:
                evals.append({"name": d, "uri": uri})
        calibration = (run_dir.read_metrics() or {}).get("calibration")
        out.append({"run": r, "confusion": data_uri(run_dir.confusion_matrix),
                    "curves": data_uri(run_dir.training_curves), "evals": evals,
                    "reliability": data_uri(run_dir.reliability), "calibration": calibration})
    return out


def _context(exp: ExperimentDir, results: dict) -> dict:
    figures = {d: data_uri(exp.path / name) for d, name in results["figures"].items()}
    finished = [r for r in results["runs"] if r["finished"]]
    first = finished[0] if finished else None
    data_report = first["data_report"] if first else {}
    n_test = (results["best"] or {}).get("datasets", {}).get(TEST, {}).get("n_test")
    policies = sorted({f"{r['policy']['device']} {r['policy']['precision']}"
                       + (" channels_last" if r["policy"].get("channels_last") else "")
                       for r in finished if r.get("policy")})
    references = results.get("references") or {}
    return {
        "results": results, "meta": results["meta"], "version": __version__,
        "tables": [{"title": dataset_title(results, d), "figure": figures.get(d), "table": results_table(results, d),
                    "dataset": d} for d in results["datasets"]],
        "runs_table": runs_table(results) if len(results["seeds"]) > 1 else None,
        "cross": cross_table(results), "per_run": _per_run(results),
        "class_distribution": data_uri(exp.class_distribution),
        "counts": data_report.get("counts", {}),
        "classes": data_report.get("classes") or (first or {}).get("classes") or [],
        "layout": data_report.get("layout"), "skipped": _skipped(results),
        "ignored": len(data_report.get("ignored_non_images") or []),
        "best": results["best"], "second": results["second"], "mcnemar": results["mcnemar"],
        "one_image": 100.0 / n_test if n_test else None, "n_test": n_test,
        "top_losses": top_losses(results["best"]) if results["best"] else [],
        "leakage": references.get("leakage"), "leakage_rows": _leakage_rows(references.get("leakage")),
        "references": references, "env": results["meta"].get("environment", {}), "policies": policies,
        "pending": [r["name"] for r in results["runs"] if not r["finished"]],
        "config_json": json.dumps(finished[0]["config"], indent=2) if finished else "",
        "audit": _audit_section(exp),
    }


def _audit_section(exp: ExperimentDir) -> dict | None:
    """The experiment's data audit, when it ran: its record and the learning curve figure."""
    directory = AuditDir(exp.audit)
    if not directory.audit.is_file():
        return None
    record = directory.read_audit()
    return {"record": record, "curve_figure": data_uri(directory.learning_curve),
            "page": f"{exp.audit.name}/{directory.page.name}"}


def environment():
    """The Jinja environment of the package's page templates (autoescaped; undefined names are errors)."""
    import jinja2

    loader = jinja2.PackageLoader("transferlab.report", "templates")
    env = jinja2.Environment(loader=loader, autoescape=jinja2.select_autoescape(["html", "j2"]),
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"
    return env


def render_report(exp_dir: str | os.PathLike, results: dict | None = None) -> Path:
    """Render EXP_DIR/report.html from the files on disk (re-writing results.* and the charts first when
    ``results`` is not given)."""
    exp = ExperimentDir(exp_dir)
    if results is None:
        results = write_results(exp.path)
    results.setdefault("figures", {})
    html = environment().get_template("report.html.j2").render(**_context(exp, results))
    write_text(exp.report, html)
    log.info("report: %s", exp.report)
    return exp.report
