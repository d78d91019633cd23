#!/usr/bin/env bash
# Create the virtual environment at .venv and install suti into it (idempotent).
# torch 2.14.1 + torchvision 0.29.1 are pinned as a pair in pyproject.toml (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.suti-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/suti ]; then
  echo "suti: installing into .venv (first run downloads torch and friends; a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
