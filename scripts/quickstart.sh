#!/usr/bin/env bash
# Install, build the offline demo photo dataset once, then pretrain the tiny MAE on 2 local
# processes and follow it to the end. The run lands in the registry ($MAESTRO_ROOT, default ./runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -f data/demo/manifest.json ]; then
  .venv/bin/python -m mae_core.data demo data/demo --images 2048 --size 48
fi
.venv/bin/maestro submit jobs/quickstart.yaml
.venv/bin/maestro watch quickstart
