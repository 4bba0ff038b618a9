#!/usr/bin/env bash
# Install everything, then lint and run the whole test suite. CI runs exactly this.
# The SLURM tests need Debian's slurm-wlm, munge and MariaDB packages (installed here as root);
# elsewhere they skip, except under MAESTRO_REQUIRE_ALL=1 (CI), where a skip fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash scripts/local_slurm.sh install
fi
.venv/bin/ruff check .
.venv/bin/python -m pytest -q --durations=20 "$@"  # the slowest tests, to keep CI short
