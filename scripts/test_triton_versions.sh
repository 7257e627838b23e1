#!/usr/bin/env bash
# Runs the kernel tests (interpreter and sm_90 compilation) under other Triton releases than the one in .venv,
# since the kernels must work with Triton 3.6 through 3.9. Each release is installed once into
# .triton/<version> and put ahead of .venv's own triton on PYTHONPATH.
#   bash scripts/test_triton_versions.sh [VERSION ...]     (default: SINGA_TRITON_VERSIONS or "3.6.0 3.7.1 3.8.0")
# Extra pytest arguments go after "--".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup.sh"
cd "$root"
py="${SINGA_VENV:-$root/.venv}/bin/python"

versions=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do versions+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#versions[@]} -gt 0 ] || read -r -a versions <<< "${SINGA_TRITON_VERSIONS:-3.6.0 3.7.1 3.8.0}"

# The test files that exercise triton_kernels or native_layers.
mapfile -t kernel_tests < <(grep -l -E "native_layers|triton_kernels" tests/test_*.py)

status=0
for v in "${versions[@]}"; do
    target="$root/.triton/$v"
    if [ ! -f "$target/.installed" ]; then
        rm -rf "$target"
        # Triton 3.6's interpreter turns 1-element arrays into Python ints, which NumPy 2.4 refuses.
        "$py" -m pip install --quiet --disable-pip-version-check --target "$target" "triton==$v" "numpy<2.4"
        touch "$target/.installed"
    fi
    echo "== kernel tests under triton $v"
    PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" SINGA_EXPECT_TRITON="$v" \
        "$py" -m pytest -q -p no:cacheprovider -W "ignore:Conversion of an array with ndim:DeprecationWarning" \
        "${kernel_tests[@]}" "$@" || status=$?
done
exit $status
