#!/usr/bin/env bash
# Sets up .venv if needed, then trains the digits MLP with 2 processes under singa-launch (AllReduce).
# Extra arguments go to the training script.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
venv="${SINGA_VENV:-$root/.venv}"
exec "$venv/bin/singa-launch" -np 2 "$venv/bin/python" examples/digits_mlp.py "$@"
