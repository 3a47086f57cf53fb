#!/usr/bin/env bash
# Create .venv and install trt-twotower with everything its tests use. The constraints file pins
# this environment's CPU build of torch; pyproject.toml keeps a range for GPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt -e '.[test]'
