"""Shared fixtures: Triton's interpreter on hosts without a GPU, kernel devices, and shared N-rank worlds."""
import os
import shutil

# Must happen before anything imports triton: kernels run in the interpreter where there is no GPU.
_HAS_NVIDIA = shutil.which("nvidia-smi") is not None
os.environ.setdefault("TRITON_INTERPRET", "0" if _HAS_NVIDIA else "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.dist_harness import World  # noqa: E402

torch.set_num_threads(1)
INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(params=["cpu", "cuda"])
def kernel_device(request, monkeypatch):
    """A device on which the Triton kernels run: CPU through the interpreter, or a real GPU."""
    if request.param == "cpu":
        if not INTERPRET:
            pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")
        monkeypatch.setenv("SINGA_FORCE_TRITON", "1")
    elif not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device(request.param)


_worlds: dict = {}


def get_world(nprocs: int, **env) -> World:
    """A started world of `nprocs` ranks with `env`, shared by every test that asks for the same one."""
    key = (nprocs, tuple(sorted(env.items())))
    world = _worlds.get(key)
    if world is None or not world.alive:
        world = _worlds[key] = World(nprocs, env=env)
    return world


@pytest.fixture
def world2() -> World:
    return get_world(2)


@pytest.fixture
def world3() -> World:
    return get_world(3)


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    for world in _worlds.values():
        world.close()
