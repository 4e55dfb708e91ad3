"""The layering: core/ is the torch-free ground floor; client/ stands on it alone (README, Layout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "transformers", "open_clip", "training", "export")


def modules(package: str) -> list[str]:
    return sorted(f"{package}.{p.stem}" for p in (ROOT / package).glob("*.py") if p.stem != "__init__")


def test_every_client_and_core_module_imports_no_torch_no_training_no_export():
    names = modules("core") + modules("client")
    assert "client.app" in names and "client.deadlines" in names and len(names) >= 20
    code = (f"import importlib, json, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            f"print(json.dumps([m for m in {FORBIDDEN!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == []
