"""The default ``--val-size`` of ``--strategy auto``, measured on frozen features (cheap: cached features).

    python benchmarks/val_size.py DATA [DATA ...] [--fractions 0.05,0.1,0.15,0.2,0.3] [--seeds 0,1,2,3,4]

A validation split trades two things: every image in it is one image less to train the final model on, and
a small one picks badly (its accuracy is a binomial estimate with a standard error of ~sqrt(p(1-p)/n)).
For each dataset, fraction and seed this makes the product's split plan (``plan_splits``: the dataset's own
test split, or 20% carved, then the validation fraction carved from the training images), trains the frozen
candidates of ``--strategy auto`` (``--backbones`` at their own resolution x heads 0 and 256, the freeze
recipe) on the training split minus validation, lets the validation split pick one (highest validation
accuracy; ties: the cheaper, listed first) and reports its test accuracy. The best fraction is the one
whose pick scores highest on test: the trade-off measured end to end. Also reported: the best candidate on
test (an oracle, never used to pick), how often validation found it, and the same candidates trained on
every training image (no validation split: what holding out costs when nothing is picked).

The decision auto makes on its validation split in the product (fine-tuned vs frozen, the kept epoch) is
more expensive to repeat 25 times per dataset; this measures the same trade-off on the choice between
frozen candidates. Features come from the cache the auto runs filled (TRANSFERLAB_CACHE_DIR).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from transferlab.auto.ranking import fit_head
from transferlab.config import TrainConfig
from transferlab.data.discovery import discover
from transferlab.data.splits import plan_splits
from transferlab.features import FeatureCache, FeatureExtractor, cache_root
from transferlab.models.build import ModelSpec, build_model
from transferlab.options import DEFAULT_EPOCHS
from transferlab.provenance import cpu_name
from transferlab.runtime.precision import resolve_policy

HEADS = ("0", "256")


def features_by_backbone(backbones: list[str], samples, num_classes: int) -> dict[str, dict]:
    policy = resolve_policy("auto", "auto")
    cache = FeatureCache(cache_root(None))
    out = {}
    for backbone in backbones:
        model = build_model(ModelSpec(backbone, head="0"), num_classes, policy)
        out[backbone] = FeatureExtractor(model, policy, cache).extract(samples).features
    return out


def accuracy(module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((module(x).argmax(1) == y).float().mean())


def measure(data: Path, backbones: list[str], fractions: list[float], seeds: list[int]) -> list[dict]:
    splits = discover(data)
    samples = splits.train + (splits.val or []) + (splits.test or [])
    features = features_by_backbone(backbones, samples, len(splits.classes))
    usable = set.intersection(*(set(f) for f in features.values()))
    cfg = TrainConfig(data_dir=str(data), strategy="freeze", epochs=DEFAULT_EPOCHS["freeze"]).resolved()
    classes = splits.classes

    def tensors(backbone, part):
        return (torch.stack([features[backbone][s] for s in part]).float(),
                torch.tensor([classes.index(s.label) for s in part]))

    rows = []
    for fraction in [0.0, *fractions]:
        for seed in seeds:
            plan = plan_splits(splits, usable, cfg.test_size, fraction, seed)
            scored = []  # (validation accuracy, test accuracy) per candidate, cheapest first
            for backbone in backbones:
                x, y = tensors(backbone, plan.train)
                tx, ty = tensors(backbone, plan.test)
                vx, vy = tensors(backbone, plan.val) if plan.val else (None, None)
                for head in HEADS:
                    module = fit_head(x, y, len(classes), head, cfg.replace(seed=seed))
                    val = accuracy(module, vx, vy) if vx is not None else float("nan")
                    scored.append((val, accuracy(module, tx, ty)))
            tests = [t for _, t in scored]
            pick = max(range(len(scored)), key=lambda i: (scored[i][0], -i)) if fraction else None
            rows.append({"fraction": fraction, "seed": seed, "n_val": len(plan.val or []), "n_test": len(plan.test),
                         "n_train": len(plan.train), "picked": tests[pick] if pick is not None else None,
                         "oracle": max(tests), "found_oracle": pick is not None and tests[pick] == max(tests),
                         "mean_candidate": statistics.mean(tests)})
    return rows


def summary(name: str, rows: list[dict]) -> list[str]:
    lines = []
    for fraction in sorted({r["fraction"] for r in rows}):
        part = [r for r in rows if r["fraction"] == fraction]
        mean = statistics.mean
        picked = f"{mean(r['picked'] for r in part):.4f}" if fraction else "–"
        found = f"{sum(r['found_oracle'] for r in part)}/{len(part)}" if fraction else "–"
        oracle, candidate = mean(r["oracle"] for r in part), mean(r["mean_candidate"] for r in part)
        lines.append(f"| {name} | {fraction:g} | {part[0]['n_train']} | {part[0]['n_val']} | {picked} | "
                     f"{oracle:.4f} | {found} | {candidate:.4f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="+")
    parser.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1")
    parser.add_argument("--fractions", default="0.05,0.1,0.15,0.2,0.3")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    args = parser.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    cpu = cpu_name()
    started = time.perf_counter()
    lines = [f"Machine: {cpu}; backbones {args.backbones} x heads {','.join(HEADS)}; seeds {args.seeds}", "",
             "| dataset | val fraction | train images | val images | test acc. of validation's pick | "
             "best candidate on test (oracle) | pick = oracle | mean candidate |", "|---|---|---|---|---|---|---|---|"]
    for data in args.data:
        lines += summary(Path(data).name, measure(Path(data), args.backbones.split(","), fractions, seeds))
    lines += ["", f"{time.perf_counter() - started:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
