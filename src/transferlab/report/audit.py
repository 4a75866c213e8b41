"""audit.html: the data audit as one self-contained page (inline CSS, images as data: URIs)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .. import __version__
from ..io.auditdir import AuditDir
from ..io.files import write_text
from .html import data_uri, environment, thumbnail_uri

log = logging.getLogger("transferlab")

SHOWN_ISSUES = 24
SHOWN_GROUPS = 30
SHOWN_PER_GROUP = 6


def _issues(record: dict) -> list[dict]:
    """The flagged images (most suspicious first; the top of the ranking when cleanlab flags none)."""
    top = record["label_issues"].get("top", [])
    flagged = [r for r in top if r["flagged"]] or top[:8]
    return [{**r, "name": Path(r["path"]).name, "thumb": thumbnail_uri(r["path"])} for r in flagged[:SHOWN_ISSUES]]


def _groups(record: dict) -> list[dict]:
    out = []
    for group in record["duplicates"]["groups"][:SHOWN_GROUPS]:
        members = [{**m, "name": Path(m["path"]).name, "thumb": thumbnail_uri(m["path"], 112)}
                   for m in group["members"][:SHOWN_PER_GROUP]]
        out.append({**group, "shown": members, "more": len(group["members"]) - len(members)})
    return out


def _checks(record: dict) -> list[dict]:
    return [{**c, "shown": [{**e, "name": Path(e["path"]).name, "thumb": thumbnail_uri(e["path"], 96)}
                            for e in c["examples"]]} for c in record["health"]["checks"]]


def audit_context(directory: AuditDir, record: dict) -> dict:
    return {"record": record, "version": __version__, "issues": _issues(record), "groups": _groups(record),
            "checks": _checks(record), "curve": record["learning_curve"],
            "curve_figure": data_uri(directory.learning_curve),
            "distribution_figure": data_uri(directory.class_distribution)}


def render_audit(audit_dir: str | os.PathLike, record: dict | None = None) -> Path:
    """Render AUDIT_DIR/audit.html from audit.json (or the given record)."""
    directory = AuditDir(audit_dir)
    record = record if record is not None else directory.read_audit()
    html = environment().get_template("audit.html.j2").render(**audit_context(directory, record))
    write_text(directory.page, html)
    log.info("audit page: %s", directory.page)
    return directory.page
