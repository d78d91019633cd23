#!/usr/bin/env bash
# Create the virtual environment at .venv and install suti into it (idempotent).
# Dependencies come from the lock file requirements/cpu.lock (uv pip compile of pyproject.toml
# with the s3 and test extras), so a fresh machine gets the tested set, not the newest releases.
# Re-lock after changing pyproject.toml:
#   uv pip compile pyproject.toml --extra test --extra s3 --python-version 3.11 \
#       --python-platform x86_64-manylinux_2_28 --no-header -o requirements/cpu.lock
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/cpu.lock
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.suti-installed
want=$(cat pyproject.toml "$LOCK" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/suti ]; then
  echo "suti: installing into .venv from $LOCK (first run downloads torch and friends; a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$LOCK"
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > "$stamp"
fi
