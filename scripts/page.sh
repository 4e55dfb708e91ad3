#!/usr/bin/env bash
# The search page on what `make demo` built: Triton (detached) + client/app.py in the foreground.
#   make page        then open http://127.0.0.1:8080/      (PORT, REPO, MILVUS_URI, CATALOG as in demo.sh)
# Searches and shoppers' events are logged to EVENTS (runs/events.db; '' for none); EXPLORE_SHARE (0) of the
# searches show their top 10 in a random order, so the click model can estimate position bias (README: Shopper events).
set -euo pipefail
cd "$(dirname "$0")/.."
CATALOG=${CATALOG:-../shared/data/fashion/catalog.parquet}
REPO=${REPO:-model_repository}
MILVUS_URI=${MILVUS_URI:-runs/milvus.db}
export -n MILVUS_URI  # pymilvus reads this variable at import and rejects a Lite file path in it
PORT=${PORT:-8080}
PY=.venv/bin/python
if $PY -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)" 2>/dev/null; then
    echo "Triton already serves on 127.0.0.1:8000 (make serve): using it"
else
    $PY -m export.serve --model-repository "$REPO" --detach
    trap '$PY -m export.serve --stop' EXIT
fi
$PY client/app.py --catalog "$CATALOG" --milvus-uri "$MILVUS_URI" --port "$PORT" \
    --events "${EVENTS-runs/events.db}" --explore-share "${EXPLORE_SHARE:-0}"
