#!/usr/bin/env bash
# The performance rows that need a GPU, in one run (under 10 minutes on one H100); the rows are
# described in benchmarks/gpu_suite.py. sd15-arch (SD 1.5's architecture, random weights) and
# flux-arch (FLUX.1-dev's): no hub download.
#
#   bash benchmarks/gpu_suite.sh                  # GPU machine: installs what is missing, then runs
#   bash benchmarks/gpu_suite.sh --dry-run        # CPU, tiny preset and sizes (CI): every row
#   bash benchmarks/gpu_suite.sh --json rows.json # extra arguments go to benchmarks/gpu_suite.py
#
# A lent GPU machine with no registry and a few minutes (sizes cut to fit about 8 minutes; the rows
# give steps/s, so 500-step figures follow): first `bash benchmarks/gpu_wheelhouse.sh` here, then
# with .whl/ copied along, there:
#   PYTHON=python3 SUTI_SUITE_TIMEOUT=450 bash benchmarks/gpu_suite.sh --expert-steps 100 --class-images 4 \
#     --timed-images 2 --train-steps 10 --throughput-clusters 3 --throughput-steps 100 \
#     --rows experts,apprentice,training,throughput --json rows.json
# (one H200: 437 s, plus the machine's start; docs/results.md "On one H200" has the rows)
# The stacked-expert K sweep alone (issue 32; traces go to traces/ beside rows.json; its defaults,
# K = 1,2,4,8 on 32 clusters, 16 steps and 10 sample steps per expert, are sized for about
# 6 minutes on one H100 by reasoning from 0.18 s per K = 1 step; not yet run on a GPU):
#   bash benchmarks/gpu_suite.sh --rows throughput --json rows.json
# The FLUX rows alone (issue 33: flux-arch, FLUX.1-dev's 11.9B transformer in bf16 built on the GPU
# from its config, ~24 GB; no T5 or VAE on the device), sized for about 2-3 minutes on one H100
# (by reasoning, not yet run on a GPU):
#   bash benchmarks/gpu_suite.sh --rows flux --json rows.json
#
# Python: $PYTHON, else .venv/bin/python (scripts/setup.sh), else python3. Missing packages are
# installed from the lock file requirements/cpu.lock; a CUDA torch already on the machine is kept.
# On a machine without a registry, they come from the wheels in .whl/ (benchmarks/gpu_wheelhouse.sh,
# made on a machine with one), installed with --no-index into $TMPDIR/suti-site.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done

need='import torch, diffusers, transformers, peft, deepspeed, webdataset, fsspec, open_clip, yaml, filelock'
if ! "$PY" -c "$need" 2>/dev/null; then
  if [ "$DRY" = 1 ]; then
    echo "gpu_suite: packages missing for $PY; run scripts/setup.sh first" >&2
    exit 2
  fi
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_suite: installing the missing packages from .whl/ (no index)" >&2
    site="${TMPDIR:-/tmp}/suti-site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "$need" || { echo "gpu_suite: still missing packages after installing .whl/" >&2; exit 2; }
  else
  echo "gpu_suite: installing the missing packages from requirements/cpu.lock" >&2
  if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    lock="${TMPDIR:-/tmp}/suti-gpu-suite.lock"  # keep the machine's CUDA build of torch
    grep -vE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+)==' requirements/cpu.lock > "$lock"
    "$PY" -m pip install -q -r "$lock"
  else
    "$PY" -m pip install -q -r requirements/cpu.lock
  fi
  fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY" = 0 ]; then
  "$PY" -c 'import torch; print("gpu_suite: device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")'
fi
exec timeout "${SUTI_SUITE_TIMEOUT:-900}" "$PY" benchmarks/gpu_suite.py "$@"
