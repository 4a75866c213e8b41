#!/usr/bin/env bash
# Measurements behind the defaults in docs/defaults.md (hymenoptera, default backbone, 2 CPU cores).
# Usage: benchmarks/measure_defaults.sh OUT_DIR [DATA_DIR]   (re-running skips finished runs)
set -u
out=${1:-runs/defaults}; data=${2:-data/hymenoptera}
tl=${TRANSFERLAB:-.venv/bin/transferlab}
go() { name=$1; shift; [ -f "$out/$name/metrics.json" ] || $tl -q train "$data" --out "$out/$name" "$@" >/dev/null; }
for seed in 0 1 2; do
  go freeze-val0-s$seed --strategy freeze --seed $seed
  go freeze-val10-s$seed --strategy freeze --val-size 0.1 --seed $seed
  go freeze-head0-s$seed --strategy freeze --head 0 --seed $seed
done
for seed in 0 1; do
  go unfreeze-bnfrozen-s$seed --strategy unfreeze --bn frozen --seed $seed
  go unfreeze-bntrain-s$seed --strategy unfreeze --bn train --seed $seed
done
python3 - "$out" <<'PY'
import json, sys, pathlib, collections, statistics
rows = collections.defaultdict(list)
for m in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    rows[m.parent.name.rsplit("-s", 1)[0]].append(json.loads(m.read_text())["accuracy"])
print("| setting | runs | accuracy mean | std | per seed |\n|---|---|---|---|---|")
for k, v in rows.items():
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"| {k} | {len(v)} | {statistics.mean(v):.4f} | {sd:.4f} | {', '.join(f'{x:.4f}' for x in v)} |")
PY
