"""Shared fixtures: Triton's interpreter on hosts without a GPU, the paths a layer runs on, and shared N-rank\nworlds."""
import os
import shutil
import threading

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


# The paths a native layer can run on: torch's own ops on the CPU, the Triton kernels in the interpreter,
# and the Triton kernels on a real GPU. Tests marked `kernels` exercise only the two kernel paths.
LAYER_PATHS = ("torch", "triton", "cuda")
KERNEL_PATHS = ("triton", "cuda")


def pytest_generate_tests(metafunc):
    if "layer_device" in metafunc.fixturenames:
        paths = KERNEL_PATHS if metafunc.definition.get_closest_marker("kernels") else LAYER_PATHS
        metafunc.parametrize("layer_device", paths, indirect=True)


@pytest.fixture
def layer_device(request, monkeypatch):
    """The device for one path (see LAYER_PATHS); SINGA_FORCE_TRITON sends CPU tensors to the kernels."""
    if request.param == "torch":
        monkeypatch.delenv("SINGA_FORCE_TRITON", raising=False)
        return torch.device("cpu")
    if request.param == "triton":
        if not INTERPRET:
            pytest.skip("CPU kernel tests need TRITON_INTERPRET=1")
        monkeypatch.setenv("SINGA_FORCE_TRITON", "1")
        return torch.device("cpu")
    if not HAS_CUDA:
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def single_process():
    """This test's process as a job of one (sd.init() without a launcher), left again afterwards."""
    import singa_dist as sd

    sd.init()
    yield
    sd.shutdown()


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
    # Side by side: a world with parameter servers takes seconds to stop, and each would wait for the one before.
    closing = [threading.Thread(target=world.close) for world in _worlds.values()]
    for thread in closing:
        thread.start()
    for thread in closing:
        thread.join()
