#!/usr/bin/env bash
# Debian packages the tests and benchmarks need beside the Python environments:
#   chromium    the search page's end-to-end test (driven by Playwright, no browser download)
#   libb64-0d   perf_analyzer from the tritonclient wheel (bench/perf.py)
#   prometheus  the test that scrapes the page and Triton with docker/monitoring/prometheus.yml
# Installs only what is missing; needs root (or sudo) and a Debian-family system.
set -euo pipefail
packages=(chromium libb64-0d prometheus)
missing=()
for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "== system packages: ${missing[*]}"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; }
