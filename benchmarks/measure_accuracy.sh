#!/usr/bin/env bash
# Issue 7's accuracy table: default settings, 3 seeds, both strategies, on the datasets of ../shared/data
# and the MNIST -> scikit-learn digits pair. Resumable: re-running skips finished runs.
#   bash benchmarks/measure_accuracy.sh [OUT]        (OUT defaults to runs/accuracy)
# then: python benchmarks/accuracy_table.py OUT      (mean +- std, per-seed values, 95% intervals, TTA)
set -euo pipefail
OUT=${1:-runs/accuracy}
SHARED=${SHARED:-../shared/data}
TL="${TL:-transferlab} -q"
export TRANSFERLAB_OFFLINE=1
$TL experiment "$SHARED/cats_and_dogs" --strategies freeze,unfreeze --seeds 0,1,2 --out "$OUT/cats_and_dogs"
$TL experiment "$SHARED/hymenoptera" --strategies freeze,unfreeze --seeds 0,1,2 --out "$OUT/hymenoptera"
python scripts/digits_folders.py "$OUT/digits-data" > /dev/null
# 28x28 digits: 96 px is plenty for the network and 5x cheaper than 224 px
$TL experiment "$OUT/digits-data/mnist_5k" --strategies freeze,unfreeze --seeds 0,1,2 --image-size 96 \
    --eval-on "$OUT/digits-data/sklearn_digits" --out "$OUT/digits"
# small grey-scale images upscaled, in-domain: scikit-learn's 8x8 digits (1797 images, about 180 per class;
# no test folder, so the experiment holds out a stratified test split)
$TL experiment "$OUT/digits-data/sklearn_digits" --strategies freeze,unfreeze --seeds 0,1,2 --image-size 96 \
    --out "$OUT/sklearn_digits"
# the larger offline backbones, frozen (one backbone pass each)
$TL experiment "$SHARED/hymenoptera" --strategies freeze --backbones efficientnet_lite1,efficientnet_lite2 \
    --seeds 0,1,2 --out "$OUT/hymenoptera-lite12"
$TL experiment "$SHARED/cats_and_dogs" --strategies freeze --backbones efficientnet_lite1,efficientnet_lite2 \
    --seeds 0,1,2 --out "$OUT/cats_and_dogs-lite12"
# test-time augmentation on the runs whose test split is a folder (no retraining)
for run in "$OUT"/{cats_and_dogs,hymenoptera}*/runs/*/; do
  data=$(python -c "import json,sys;print(json.load(open(sys.argv[1]))['train']['data_dir'])" "$run/config.json")
  [ -f "$run/evaluations/tta/metrics.json" ] || $TL evaluate "$run" "$data" --tta --out "$run/evaluations/tta" > /dev/null
done
