"""An audit directory: the one module that names its files.

    AUDIT_DIR/audit.json            every figure of the audit (label issues, duplicates, curve, health)
    AUDIT_DIR/label_issues.csv      every scored image, most suspicious label first
    AUDIT_DIR/learning_curve.png    accuracy and per-class recall against training images per class
    AUDIT_DIR/class_distribution.png
    AUDIT_DIR/audit.html            the self-contained page
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TransferlabError
from .files import read_json

AUDIT_FILE = "audit.json"
LABEL_ISSUES_CSV = "label_issues.csv"
LABEL_ISSUES_COLUMNS = ("rank", "path", "split", "given", "suggested", "suggested_probability", "quality",
                        "flagged")


class AuditDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.audit = self.path / AUDIT_FILE
        self.label_issues = self.path / LABEL_ISSUES_CSV
        self.learning_curve = self.path / "learning_curve.png"
        self.class_distribution = self.path / "class_distribution.png"
        self.page = self.path / "audit.html"

    def read_audit(self) -> dict:
        if not self.audit.is_file():
            raise TransferlabError(f"AUDIT_DIR {self.path}: no {AUDIT_FILE} (run transferlab audit first)")
        record = read_json(self.audit)
        if not isinstance(record, dict) or "label_issues" not in record:
            raise TransferlabError(f"{self.audit}: not a transferlab audit file")
        return record
