#!/usr/bin/env bash
# The shared deployment on one host, without Docker: Milvus Lite served over TCP + Triton, on loopback, left
# running, so the page, client/search.py, client/index.py and client/upgrade.py work at the same time.
#   make serve                 start both (and, on first use, index the catalog behind the serving name "products")
#   make stop                  stop both
# Settings: CATALOG, REPO, LIMIT as in demo.sh; MILVUS_DATA (runs/milvus-server), MILVUS_PORT (19530);
# TRITON_ADMIN_KEY (default: generated once into runs/triton/admin-key) guards loading models.
set -euo pipefail
cd "$(dirname "$0")/.."
CATALOG=${CATALOG:-../shared/data/fashion/catalog.parquet}
REPO=${REPO:-model_repository}
MILVUS_DATA=${MILVUS_DATA:-runs/milvus-server}
MILVUS_PORT=${MILVUS_PORT:-19530}
MILVUS_URI=http://127.0.0.1:$MILVUS_PORT
LIMIT=${LIMIT:-0}
limit_args=()
[ "$LIMIT" != 0 ] && limit_args=(--limit "$LIMIT")
PY=.venv/bin/python
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

if [ "${1:-}" = stop ]; then
    $PY -m export.serve --stop
    $PY -m client.milvus_server --data "$MILVUS_DATA" --stop
    exit 0
fi
[ -f "$REPO/export_report.json" ] || { echo "no model repository at $REPO: run \`make demo\` first" >&2; exit 2; }
mkdir -p runs/triton
if [ -z "${TRITON_ADMIN_KEY:-}" ]; then
    [ -s runs/triton/admin-key ] || (umask 077; $PY -c "import secrets; print(secrets.token_urlsafe(24))" > runs/triton/admin-key)
    TRITON_ADMIN_KEY=$(cat runs/triton/admin-key)
fi
export TRITON_ADMIN_KEY

$PY -m client.milvus_server --data "$MILVUS_DATA" --port "$MILVUS_PORT" --detach
# Explicit model control: an upgrade loads a new model set into this running server (with the key).
$PY -m export.serve --model-repository "$REPO" --model-control explicit --detach
if ! $PY - "$MILVUS_URI" <<'PYEOF'
import sys
from client import serving, store
sys.exit(0 if serving.resolve(store.connect(sys.argv[1]), store.COLLECTION) else 1)
PYEOF
then
    echo "== first deployment: index $CATALOG into Milvus behind the serving name ${COLLECTION:-products}"
    $PY client/upgrade.py --tag "" --catalog "$CATALOG" --milvus-uri "$MILVUS_URI" "${limit_args[@]}"
fi
cat <<EOT

Milvus (Lite over TCP) at $MILVUS_URI (data $MILVUS_DATA), Triton at 127.0.0.1:8001 (admin key: runs/triton/admin-key).
  page:     MILVUS_URI=$MILVUS_URI make page
  search:   $PY client/search.py "red kurta" --milvus-uri $MILVUS_URI
  sync:     $PY client/index.py --catalog $CATALOG --milvus-uri $MILVUS_URI
  upgrade:  $PY -m export --checkpoint runs/NEW --out $REPO --tag v2
            TRITON_ADMIN_KEY=\$(cat runs/triton/admin-key) $PY client/upgrade.py --tag v2 --milvus-uri $MILVUS_URI
  rollback: $PY client/upgrade.py --rollback --milvus-uri $MILVUS_URI
  stop:     make stop
EOT
