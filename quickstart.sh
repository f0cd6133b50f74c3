#!/usr/bin/env bash
# Set up ./.venv if needed, then run the quickstart recipe end to end on the offline teacher.
set -euo pipefail
cd "$(dirname "$0")"
bash tools/setup-env.sh
exec .venv/bin/python -m minidistill.run recipes/quickstart.yaml "$@"
