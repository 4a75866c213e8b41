"""Screen the fine-tuning recipe's pieces one at a time against the baseline (one seed: a screen, not a verdict).

    python benchmarks/recipe_screen.py /work/shared/data/hymenoptera --out runs/recipe_screen [--epochs 8]

Each piece trains ``--strategy unfreeze`` with a validation split (``--val-size 0.15``) through
``transferlab.train``: the baseline (every piece off), ``--layer-decay 0.75``, ``--ema 0.999``,
``--mixup 0.2 --cutmix 1.0``, ``--augment-policy trivial`` and ``randaugment``, ``--bn-update``. One JSON line
per finished run is appended to OUT/results.jsonl; a rerun skips the rows already there (a killed run resumes
from its own checkpoint in OUT/runs/<piece>). Prints a table of test and validation accuracy (the kept epoch's) with the
wall time, and the machine. The frozen features of the head-first stage are cached in OUT/cache, so only the
first run computes them.

A note on ``--ema 0.999`` with few steps: timm's warm-up caps the decay at ``1 - k ** -2/3`` after k steps
(0.93 after 56, 0.999 only after ~31,600), so on a small dataset any decay above that cap gives the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from transferlab.provenance import cpu_name

PIECES = {
    "baseline": {},
    "layer_decay 0.75": {"layer_decay": 0.75},
    "ema 0.999": {"ema": 0.999},
    "mixup 0.2 + cutmix 1.0": {"mixup": 0.2, "cutmix": 1.0},
    "trivial": {"augment_policy": "trivial"},
    "randaugment": {"augment_policy": "randaugment"},
    "bn_update": {"bn_update": True},
}


def machine() -> dict:
    import torch

    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kept_val_acc(run_dir: Path, selected: dict | None) -> float | None:
    if not selected:
        return None
    with open(run_dir / "history.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["stage"] == selected["stage"] and int(row["epoch"]) == selected["epoch"]:
                return float(row["val_acc"]) if row["val_acc"] else None
    return None


def run_piece(name: str, options: dict, args: argparse.Namespace, out: Path) -> dict:
    import transferlab

    run_dir = out / "runs" / name.replace(" ", "_").replace("+", "and")
    started = time.perf_counter()
    run = transferlab.train(args.data_dir, out=run_dir, strategy="unfreeze", val_size=args.val_size, seed=args.seed,
                            cache_dir=str(out / "cache"), export=False, **args.common, **options)
    wall = time.perf_counter() - started
    metrics = run.metrics
    return {"piece": name, "options": options, "common": args.common, "seed": args.seed,
            "data_dir": str(Path(args.data_dir).resolve()), "test_acc": metrics["accuracy"],
            "val_acc": kept_val_acc(run_dir, metrics.get("selected_epoch")),
            "selected_epoch": metrics["selected_epoch"],
            "n_test": metrics["n_test"], "train_seconds": metrics["train_seconds"], "wall_seconds": round(wall, 1),
            "machine": machine()}


def print_table(rows: list[dict]) -> None:
    base = next((r for r in rows if r["piece"] == "baseline"), None)
    print("| piece | test acc | vs baseline | val acc (kept epoch) | kept epoch | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        delta = f"{r['test_acc'] - base['test_acc']:+.4f}" if base else "–"
        val = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "–"
        kept = f"{r['selected_epoch']['stage']} {r['selected_epoch']['epoch']}" if r["selected_epoch"] else "–"
        print(f"| {r['piece']} | {r['test_acc']:.4f} | {delta} | {val} | {kept} | {r['wall_seconds']:.0f} |")
    if rows:
        m, n = rows[-1]["machine"], rows[-1]["n_test"]
        print(f"\n{n} test images (one image = {1 / n:.4f}); seed {rows[-1]['seed']}; options {rows[-1]['common']}")
        print(f"machine: {m['cpu']}, {m['threads']} threads, avx512_bf16 {m['avx512_bf16']}, cuda {m['cuda']}, "
              f"torch {m['torch']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir")
    p.add_argument("--out", default="runs/recipe_screen")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: transferlab's, 8)")
    p.add_argument("--head-epochs", type=int, help="head-first epochs (default: transferlab's, 5)")
    p.add_argument("--backbone", help="default: transferlab's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-size", type=float, default=0.15)
    p.add_argument("--pieces", default=",".join(PIECES), help=f"comma-separated, of: {', '.join(PIECES)}")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                   help="another TrainConfig field for every run, e.g. --set batch_size=16 (repeatable)")
    args = p.parse_args(argv)
    args.common = {k: v for k, v in (("epochs", args.epochs), ("head_epochs", args.head_epochs),
                                     ("backbone", args.backbone)) if v is not None}
    for item in args.set:
        field, _, value = item.partition("=")
        try:
            args.common[field] = json.loads(value)
        except json.JSONDecodeError:
            args.common[field] = value
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    wanted = [name.strip() for name in args.pieces.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in PIECES]
    if unknown:
        p.error(f"unknown piece {unknown[0]!r}; choose from {', '.join(PIECES)}")

    def key(row: dict) -> tuple:
        return row["piece"], row["data_dir"], row["seed"], json.dumps(row["common"], sort_keys=True)

    done = {key(r) for r in read_rows(results)}
    for name in wanted:
        probe = {"piece": name, "data_dir": str(Path(args.data_dir).resolve()), "seed": args.seed,
                 "common": args.common}
        if key(probe) in done:
            print(f"{name}: finished earlier, skipped", file=sys.stderr)
            continue
        row = run_piece(name, PIECES[name], args, out)
        with open(results, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(f"{name}: test {row['test_acc']:.4f}, val {row['val_acc']}, {row['wall_seconds']:.0f}s", file=sys.stderr)
    rows = [r for r in read_rows(results) if r["piece"] in wanted and r["seed"] == args.seed
            and r["common"] == args.common and r["data_dir"] == str(Path(args.data_dir).resolve())]
    print_table(sorted(rows, key=lambda r: list(PIECES).index(r["piece"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
