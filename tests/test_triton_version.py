"""The kernels in triton_kernels are tested under the Triton release they are meant to run with.

scripts/test_triton_versions.sh reruns the kernel tests with other releases put first on PYTHONPATH; this
check makes sure that the release imported is the one asked for, not .venv's own.
"""
import os

import triton


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


def test_triton_release_is_supported_and_the_requested_one():
    assert (3, 6) <= _version(triton.__version__) < (3, 10), f"triton {triton.__version__} is not supported"
    want = os.environ.get("SINGA_EXPECT_TRITON")
    if want:
        assert triton.__version__.split("+")[0] == want, (triton.__version__, want)
