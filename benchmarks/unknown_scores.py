"""Which "unknown" score: maximum probability, energy, or k-nearest-neighbour distance (k = 1, 5, 10, 50).

    .venv/bin/python benchmarks/unknown_scores.py [--data ../shared/data] [--out runs/unknown-bench]

Trains two frozen runs with the product's code and a 15% validation split: hymenoptera, and oxford17 with
12 of its 17 species. Each score's threshold is set on the run's validation split to keep 95% of known
images (the product's rule); printed per score: AUROC and the share flagged of (a) very different images
(cats_and_dogs and aid_dev for hymenoptera) and (b) look-alikes (oxford17's 5 other species), and the share
of known test images kept. Not a timed test; the figures in transferlab/trust/unknown.py come from it.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

import numpy as np
import torch

from transferlab.api import train
from transferlab.data.discovery import Sample, discover
from transferlab.data.splits import plan_splits
from transferlab.features import FeatureCache, FeatureExtractor, cache_root
from transferlab.metrics import binary_roc_auc
from transferlab.trust.conformal import upper_quantile
from transferlab.trust.unknown import NearestNeighbourScore, bank_of

KNOWN_FLOWERS = 12


def flowers_subset(source: Path, out: Path) -> tuple[Path, list[Sample]]:
    """out/{train,test}/<species>/ links for the first 12 species; the other 5 species' images returned."""
    species = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    others = []
    for split in ("train", "test"):
        for i, name in enumerate(species):
            for image in sorted((source / split / name).iterdir()):
                if i >= KNOWN_FLOWERS:
                    others.append(Sample(image, name))
                    continue
                link = out / split / name / image.name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(image.resolve(), link)
    return out, others


def sample(samples: list[Sample], n: int) -> list[Sample]:
    return random.Random(0).sample(samples, min(n, len(samples)))


def measure(name: str, run, unknown_sets: dict[str, list[Sample]]) -> None:
    cfg = run.config["train"]
    splits = discover(cfg["data_dir"], cfg.get("test_dir"))
    listed = splits.train + (splits.val or []) + (splits.test or [])
    plan = plan_splits(splits, set(listed), cfg["test_size"], cfg["val_size"], cfg["seed"])
    extractor = FeatureExtractor(run.model, run.policy, FeatureCache(cache_root(None)))

    def features(samples):
        found = extractor.extract(samples).features
        return torch.stack([found[s] for s in samples if s in found])

    known = {"train": features(plan.train), "val": features(plan.val), "test": features(plan.test)}
    others = {label: features(s) for label, s in unknown_sets.items()}

    def logits(f):
        with torch.no_grad():
            return run.model.head(f).float()

    knn = {k: NearestNeighbourScore(bank_of(known["train"].numpy()), k) for k in (1, 5, 10, 50)}
    scores = {"max probability": lambda f: 1 - torch.softmax(logits(f), 1).max(1).values.numpy(),
              "energy": lambda f: -torch.logsumexp(logits(f), 1).numpy(),
              **{f"knn k={k}": (lambda f, s=s: s(f.numpy())) for k, s in knn.items()}}
    print(f"\n{name}: {len(plan.train)} train, {len(plan.val)} validation (threshold), {len(plan.test)} test images")
    print("| score | known test kept | " + " | ".join(f"{label}: flagged / AUROC" for label in others) + " |")
    print("|---|---|" + "---|" * len(others))
    for label, fn in scores.items():
        threshold = upper_quantile(fn(known["val"]), 0.95)
        test = fn(known["test"])
        cells = [f"{np.mean(test <= threshold):.3f}"]
        for other in others.values():
            u = fn(other)
            auroc = binary_roc_auc(np.r_[np.zeros(len(test)), np.ones(len(u))].astype(bool), np.r_[test, u])
            cells.append(f"{np.mean(u > threshold):.3f} / {auroc:.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--out", default="runs/unknown-bench")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    hym = train(data / "hymenoptera", out=out / "hymenoptera", strategy="freeze", val_size=0.15, export=False)
    cats = discover(data / "cats_and_dogs")
    aid = discover(data / "aid_dev")
    measure("hymenoptera", hym, {"cats_and_dogs (1000)": sample(cats.train + cats.test, 1000),
                                 "aid_dev (600)": sample(aid.train, 600)})
    flowers, other_species = flowers_subset(data / "oxford17", out / "oxford12-data")
    run = train(flowers, out=out / "oxford12", strategy="freeze", val_size=0.15, export=False)
    measure("oxford17, 12 species known", run, {"the 5 other species (look-alikes)": other_species,
                                                "aid_dev (600)": sample(aid.train, 600)})


if __name__ == "__main__":
    main()
