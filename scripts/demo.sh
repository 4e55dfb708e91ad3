#!/usr/bin/env bash
# The main job, end to end, on the embedded defaults: train -> export -> Triton -> index -> search.
# Each stage reuses what an earlier run built (FORCE=1 rebuilds everything). Settings:
#   CATALOG     catalog file (.parquet/.csv/.jsonl)   default ../shared/data/fashion/catalog.parquet
#   MODEL       model config (training/model_configs)  default mm3-concat
#   EPOCHS      training epochs (3: photo search >= 0.50, about an hour here, minutes on a GPU)  default 1
#   RUN         checkpoint directory                   default runs/$MODEL, plus -<catalog file stem> for
#               another catalog, -n$LIMIT with a LIMIT and -e$EPOCHS past 1: each setting trains its own run
#               (training refuses to resume a run of other settings or catalog content, and says what to do)
#   REPO        Triton model repository                default model_repository
#   MILVUS_URI  Milvus Lite file or http://host:19530  default runs/milvus.db
#   LIMIT       use only the first N catalog rows      default all
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT_CATALOG=../shared/data/fashion/catalog.parquet
CATALOG=${CATALOG:-$DEFAULT_CATALOG}
MODEL=${MODEL:-mm3-concat}
EPOCHS=${EPOCHS:-1}
LIMIT=${LIMIT:-0}
if [ -z "${RUN:-}" ]; then
    RUN=runs/$MODEL
    if [ ! "$CATALOG" -ef "$DEFAULT_CATALOG" ]; then name=$(basename "$CATALOG"); RUN+="-${name%.*}"; fi
    if [ "$LIMIT" != 0 ]; then RUN+="-n$LIMIT"; fi
    if [ "$EPOCHS" != 1 ]; then RUN+="-e$EPOCHS"; fi
fi
REPO=${REPO:-model_repository}
MILVUS_URI=${MILVUS_URI:-runs/milvus.db}
export -n MILVUS_URI  # pymilvus reads this variable at import and rejects a Lite file path in it
PY=.venv/bin/python
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
step() { printf '\n== %s\n' "$*"; }
limit_args=()
[ "$LIMIT" != 0 ] && limit_args=(--limit "$LIMIT")

if [ "${FORCE:-0}" = 1 ]; then
    rm -rf "$RUN" "$MILVUS_URI"
fi

step "1/6 train $MODEL on $CATALOG -> $RUN (resumes; skipped when done)"
$PY -m training.train --model "$MODEL" --catalog "$CATALOG" --out "$RUN" --epochs "$EPOCHS" "${limit_args[@]}"

step "2/6 export $RUN -> $REPO (ONNX, parity checks, Triton configs)"
exported=0
if [ ! -f "$REPO/export_report.json" ] || [ "$RUN/model.safetensors" -nt "$REPO/export_report.json" ] \
        || ! grep -q "\"checkpoint\": \"$RUN\"" "$REPO/export_report.json"; then
    $PY -m export --checkpoint "$RUN" --out "$REPO" --backend python --catalog "$CATALOG"
    exported=1
else
    echo "up to date: $REPO/export_report.json"
fi

step "3/6 start Triton on $REPO"
$PY -m export.serve --model-repository "$REPO" --detach
trap '$PY -m export.serve --stop' EXIT

step "4/6 index $CATALOG into Milvus ($MILVUS_URI) through product_encoder"
recreate=()
# A new model makes the demo's own Lite file stale (its vectors are another space): rebuild it. A server's
# collections are never dropped here: index.py refuses a stale one and says what to do.
if [ "$exported" = 1 ] && [ -e "$MILVUS_URI" ] && [[ "$MILVUS_URI" != http* ]]; then recreate=(--recreate); fi
$PY client/index.py --catalog "$CATALOG" --milvus-uri "$MILVUS_URI" "${limit_args[@]}" "${recreate[@]}"

step "5/6 search"
for query in "red kurta for women" "men's black leather wallet" "white running shoes" "PL13090JS-28E"; do
    $PY client/search.py "$query" -k 5 --milvus-uri "$MILVUS_URI"
    echo
done
$PY client/search.py "watch" -k 5 --gender Women --max-price 60 --milvus-uri "$MILVUS_URI"
echo
example=$($PY - "$CATALOG" <<'PYEOF'
import sys
from core.catalog import ImageFetcher, read_catalog
df, _ = read_catalog(sys.argv[1], limit=50)
fetch = ImageFetcher(base_dir=df.attrs["base_dir"])
for pid, ref, title in zip(df["product_id"], df["image"], df["title"]):
    try:
        data = fetch(ref)
    except Exception:
        continue
    open("runs/example_query.jpg", "wb").write(data)
    print(f"{pid}: {title}")
    break
PYEOF
)
if [ -n "$example" ]; then
    echo "image query: runs/example_query.jpg (the photo of product $example)"
    $PY client/search.py --image runs/example_query.jpg -k 5 --milvus-uri "$MILVUS_URI"
fi

step "6/6 quality of the served system: the committed evaluation sets through Triton + Milvus (hybrid search)"
$PY client/evaluate.py --catalog "$CATALOG" --milvus-uri "$MILVUS_URI" --json runs/served_eval.json
for set in codes names; do  # exact-match sets: model codes and rare product names
    $PY client/evaluate.py --queries "training/eval_sets/fashion-$set.jsonl" --milvus-uri "$MILVUS_URI" \
        --json "runs/served_eval_$set.json" | tail -n 1
done
echo
echo "search page: \`make page\` (or scripts/page.sh), then open http://127.0.0.1:${PORT:-8080}/"
