#!/usr/bin/env bash
# Sets up .venv if needed, then runs the whole test suite, then the kernel tests again under the other
# supported Triton releases (scripts/test_triton_versions.sh; SINGA_TRITON_VERSIONS="" skips them).
# Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
"${SINGA_VENV:-$root/.venv}/bin/python" -m pytest tests "$@"
if [ -n "${SINGA_TRITON_VERSIONS-3.6.0 3.7.1 3.8.0}" ] && [ $# -eq 0 ]; then
    bash "$root/scripts/test_triton_versions.sh" ${SINGA_TRITON_VERSIONS-3.6.0 3.7.1 3.8.0}
fi
