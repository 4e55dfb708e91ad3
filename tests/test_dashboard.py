"""The Grafana dashboard (docker/monitoring/, copied into deploy/), validated offline: its layout, every query
parsed by Prometheus's own promtool, and every page metric it reads exported by client/metrics.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from client.metrics import Metrics

DASHBOARD = Path(__file__).resolve().parents[1] / "docker" / "monitoring" / "grafana-dashboard.json"


def _targets(dashboard: dict) -> list[dict]:
    return [t for panel in dashboard["panels"] for t in panel["targets"]]


def test_the_dashboards_panels_are_laid_out_and_named():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    titles = " ".join(p["title"] for p in dashboard["panels"])
    assert "Click-through rate by position" in titles and "by model" in titles


def test_every_query_parses_and_reads_metrics_the_page_exports(tmp_path):
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: it comes with Debian's prometheus (scripts/system-deps.sh)"
    targets = _targets(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": t["expr"]}
                                                          for i, t in enumerate(targets)]}]}
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    metrics = Metrics()
    metrics.impressions("abc-fp32", 3)
    metrics.event("click", "abc-fp32", 2)
    metrics.served_model("abc-fp32")
    exported = set(re.findall(r"^(mmsearch_\w+?)(?:\{| )", metrics.render().decode(), re.M))
    for target in targets:
        for name in re.findall(r"\b(mmsearch_\w+)", target["expr"]):
            assert name in exported, f"{name} (in {target['expr']!r}) is not exported by the page"
