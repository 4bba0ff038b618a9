#!/usr/bin/env bash
# Create .venv with maestro and its test tools. torch is pinned first: an unpinned torch would
# pull the CUDA build and gigabytes of libraries.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}"
.venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION}" -e ".[dev]"
