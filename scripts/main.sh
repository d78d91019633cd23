#!/usr/bin/env bash
# The README's main job: create .venv, install suti, run the demo on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/suti demo --output runs/demo "$@"
