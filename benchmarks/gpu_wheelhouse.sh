#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry: the lock file's versions of the
# packages suti needs beyond a CUDA PyTorch image (torch, torchvision, numpy, accelerate,
# safetensors, huggingface-hub, PIL... are taken from the machine). They go to .whl/ (ignored by
# git), which benchmarks/gpu_suite.sh installs from with --no-index when its imports fail.
#
#   bash benchmarks/gpu_wheelhouse.sh            # for the machine's Python 3.12, x86-64 Linux
#   PY_VERSION=3.11 bash benchmarks/gpu_wheelhouse.sh
#
# DeepSpeed ships no wheel on PyPI: it is built here from its source release (pure Python; its
# ops are compiled on first use, and suti's trainer uses none).
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${PY_VERSION:-3.12}
PACKAGES="transformers tokenizers diffusers peft pydantic pydantic-core annotated-types typing-inspection webdataset braceexpand
open-clip-torch ftfy wcwidth timm regex hjson fsspec filelock importlib-metadata"
mkdir -p .whl
pins=()
for p in $PACKAGES; do
  pin=$(grep -i "^$p==" requirements/cpu.lock) || { echo "gpu_wheelhouse: $p is not in requirements/cpu.lock" >&2; exit 2; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$(grep -i '^deepspeed==' requirements/cpu.lock)"
du -sh .whl
