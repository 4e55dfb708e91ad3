#!/usr/bin/env bash
# The tower comparison on one GPU, every run in parallel: the long schedules that 2 CPU cores
# cannot afford, the 1-epoch recipe variants that choose the demo's defaults, and the table rows
# still missing. Each run is bench/compare_towers.py, so each writes its own OUT/<name>.{md,json,png};
#     python bench/compare_towers.py --merge OUT/*.json --results bench/results/<name>
# makes one table of them.
#
#     bench/gpu_towers.sh OUT [SECONDS]
#
# SECONDS (default 3600) bounds every run; a run cut short keeps its learning curve up to its last
# save in OUT/runs/<name>/*/config.json. Environment: PYTHON (python), CATALOG, LIMIT (0 = all
# products), DEVICE (cuda), LONG_EPOCHS (10), RUNS (the space-separated names below to run).
set -u
out=${1:?usage: bench/gpu_towers.sh OUT [SECONDS]}
seconds=${2:-3600}
py=${PYTHON:-python}
catalog=${CATALOG:-../shared/data/fashion/catalog.parquet}
limit=${LIMIT:-0}
device=${DEVICE:-cuda}
long=${LONG_EPOCHS:-10}
runs=${RUNS:-long-mm3 long-text long3-mm3 rows base iqw1 attr1 lr2 ptw2 bs256 crop08}
# The runs are Python-bound on the CPU side: one thread each keeps them from starving each other.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p "$out"

# Decode the photos once into the shared cache; every run below then loads it.
$py - "$catalog" "$limit" <<'EOF' || exit 1
import sys
from core.catalog import read_catalog
from training.data import load_pixels
from training.factory import get_model_config, preprocess_config
df, report = read_catalog(sys.argv[1], None, limit=int(sys.argv[2]) or None)
load_pixels(df, preprocess_config(get_model_config("mm3-concat"))["image"], report, "cache")
EOF

declare -A args=(
  [long-mm3]="--models mm3-concat --epochs $long"
  [long-text]="--models text-only --epochs $long"
  [long3-mm3]="--models mm3-concat --epochs 3"
  [rows]="--models mm4-alpha,mm4-mlp"
  [base]="--models mm3-concat"
  [iqw1]="--models mm3-concat --set image_query_weight=1.0"
  [attr1]="--models mm3-concat --set attribute_weight=1.0"
  [lr2]="--models mm3-concat --set lr=2e-3"
  [ptw2]="--models mm3-concat --set photo_text_weight=2.0"
  [bs256]="--models mm3-concat --set batch_size=256"
  [crop08]="--models mm3-concat --set crop_scale=0.8"
)
for name in $runs; do
  # shellcheck disable=SC2086  # the argument strings above are meant to split
  timeout "$seconds" $py bench/compare_towers.py --catalog "$catalog" --limit "$limit" --device "$device" \
    --runs "$out/runs/$name" --results "$out/$name" --set save_every=100 ${args[$name]} >"$out/$name.log" 2>&1 &
done
wait
ls "$out"/*.json 2>/dev/null | wc -l | xargs -I{} echo "{} of $(wc -w <<<"$runs") runs finished"
