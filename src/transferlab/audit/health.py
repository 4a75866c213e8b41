"""Data health: class balance, and images that a classifier is likely to get wrong for reasons that are
not the model's (too small, extreme shapes, grey among colour, nearly blank, unreadable)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.decode import probe, stream
from ..progress import progress_bar
from .duplicates import Item

EXAMPLES = 8
SMALL_FRACTION = 0.5  # short side below this share of the model's input size: upscaled to the input, blurry
EXTREME_ASPECT = 2.5  # long side over short side: the centre crop sees less than 40% of the image
GREY_TOLERANCE = 2.0  # mean absolute channel difference (0-255) below which an image counts as grey
BLANK_STD = 4.0  # standard deviation of the brightness (0-255) below which an image counts as nearly blank


def image_facts(size: tuple[int, int], pixels: np.ndarray) -> dict:
    """What the checks need of one image: its size, shape, colour and contrast."""
    rgb = pixels.astype(np.float32)
    chroma = (np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])
              + np.abs(rgb[..., 0] - rgb[..., 2])).mean() / 3.0
    brightness = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    width, height = size
    return {"width": width, "height": height, "aspect": max(width, height) / max(1, min(width, height)),
            "grey": bool(chroma < GREY_TOLERANCE), "contrast": float(brightness.std())}


def scan(items: Sequence[Item], desc: str = "health") -> tuple[list[dict | None], list[dict]]:
    """Facts per item (None where it cannot be decoded) and the unreadable files with their reasons."""
    facts, unreadable = [], []
    decoded = stream([it.path for it in items], lambda path: image_facts(*probe(path)))
    for item, (fact, reason) in progress_bar(zip(items, decoded, strict=True), total=len(items), desc=desc):
        facts.append(fact)
        if fact is None:
            unreadable.append({"path": item.path, "label": item.label, "split": item.split, "reason": reason})
    return facts, unreadable


def _check(name: str, description: str, hits: list[Item], total: int) -> dict:
    return {"check": name, "description": description, "count": len(hits),
            "share": round(len(hits) / total, 4) if total else 0.0,
            "examples": [{"path": it.path, "label": it.label, "split": it.split} for it in hits[:EXAMPLES]]}


def balance(counts: dict[str, dict[str, int]], classes: list[str]) -> dict:
    """Images per class (all splits) and the ratio of the largest class to the smallest."""
    totals = {c: sum(split.get(c, 0) for split in counts.values()) for c in classes}
    present = [n for n in totals.values() if n > 0]
    return {"per_class": totals, "largest": max(totals, key=totals.get), "smallest": min(totals, key=totals.get),
            "imbalance": round(max(present) / min(present), 3) if present else None}


def health_checks(items: Sequence[Item], facts: Sequence[dict | None], input_size: int) -> list[dict]:
    """The counted checks with examples. Grey images are a finding only in a mostly colour data set."""
    known = [(it, f) for it, f in zip(items, facts, strict=True) if f is not None]
    total = len(known)
    small = int(input_size * SMALL_FRACTION)
    grey = [it for it, f in known if f["grey"]]
    checks = [
        _check("small", f"short side under {small} px (half the model's {input_size} px input): upscaled, blurry",
               [it for it, f in known if min(f["width"], f["height"]) < small], total),
        _check("aspect", f"long side over {EXTREME_ASPECT}x the short side: the centre crop misses most of it",
               [it for it, f in known if f["aspect"] > EXTREME_ASPECT], total),
        _check("blank", f"nearly blank (brightness varies by less than {BLANK_STD:g}/255)",
               [it for it, f in known if f["contrast"] < BLANK_STD], total),
    ]
    if grey and len(grey) < total / 2:
        checks.append(_check("grey", "grey images among colour ones (the model may learn colour as a cue)",
                             grey, total))
    else:
        checks.append({**_check("grey", "grey images (most of the data set is grey: not a finding)", [], total),
                       "count": len(grey), "finding": False})
    for check in checks:
        check.setdefault("finding", check["count"] > 0)
    return checks
