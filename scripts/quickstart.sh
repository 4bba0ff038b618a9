#!/usr/bin/env bash
# Install, then pretrain the tiny MAE on 2 local processes; results land in runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m mae_core.launch --nproc 2 jobs/quickstart_train.yaml
