#!/usr/bin/env bash
# Creates .venv in the repository root and installs singa with what it needs, once; later calls are quick.
# SINGA_TORCH overrides the torch requirement (default: torch==2.13.0, the CPU build, on hosts without an
# NVIDIA GPU; whatever torch is already importable on hosts with one).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SINGA_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.singa-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

if [ ! -x "$venv/bin/python" ]; then
    # On a GPU host the system torch (with CUDA) is reused rather than downloaded again.
    if command -v nvidia-smi >/dev/null 2>&1 && "$py" -c "import torch" 2>/dev/null; then
        "$py" -m venv --system-site-packages "$venv"
    else
        "$py" -m venv "$venv"
    fi
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    "${pip[@]}" "${SINGA_TORCH:-torch==2.13.0}"
fi
"${pip[@]}" -e "$root[dev,examples,mpi]"
echo "$want" > "$stamp"
