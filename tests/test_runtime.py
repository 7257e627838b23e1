"""The runtime: a lone process, real 2- and 3-rank Gloo worlds, node layouts, and leaving the job."""
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

import singa_dist as sd
from singa_dist import environment
from tests.dist_harness import free_port, kill_session


def test_single_process_without_launcher():
    """A lone process is a job of one: torch.distributed's own APIs work, as under torchrun with one process."""
    code = ("import singa_dist as sd, torch, torch.distributed as dist; sd.init(); "
            "print(sd.rank(), sd.size(), sd.local_rank(), sd.local_size(), sd.is_distributed(), "
            "dist.get_world_size(), len(list(torch.utils.data.distributed.DistributedSampler(range(5))))); "
            "sd.shutdown(); print(dist.is_initialized())")
    env = {k: v for k, v in __import__('os').environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                        "PMI_RANK", "SLURM_PROCID", "SINGA_PROC_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "0", "1", "True", "1", "5", "False"]


def test_every_call_that_needs_the_job_names_init():
    code = textwrap.dedent("""
        import torch, singa_dist as sd, singa_dist.horovod as hvd
        model = torch.nn.Linear(2, 2)
        calls = {
            "DistributedOptimizer": lambda: sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)),
            "broadcast_parameters": lambda: sd.broadcast_parameters(model.state_dict()),
            "broadcast_optimizer_state": lambda: sd.broadcast_optimizer_state(torch.optim.Adam(model.parameters())),
            "allreduce": lambda: sd.allreduce(torch.ones(2)), "allgather": lambda: hvd.allgather(torch.ones(2)),
            "broadcast": lambda: sd.broadcast(torch.ones(2), 0), "barrier": sd.barrier, "join": hvd.join,
            "rank": sd.rank, "size": hvd.size, "add_process_set": lambda: hvd.add_process_set([0]),
            "partition": lambda: sd.partition.partition(torch.nn.Sequential(model)),
        }
        for name, call in calls.items():
            try:
                call()
                print(name, "no error")
            except sd.NotInitializedError as exc:
                # a ValueError as Horovod raises, and a RuntimeError as singa_dist always did
                print(name, isinstance(exc, ValueError) and "call singa_dist.init() before" in str(exc))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert all(line.endswith(" True") for line in out.stdout.splitlines()), out.stdout
    assert len(out.stdout.splitlines()) == 12


def _identity():
    t = torch.tensor([float(sd.rank())])
    dist.all_reduce(t, group=sd.workers_process_group())
    return sd.rank(), sd.size(), sd.worker_group(), t.item()


def test_world_ranks(world2, world3):
    assert world2.run(_identity) == [(0, 2, 0, 1.0), (1, 2, 0, 1.0)]
    assert [r[3] for r in world3.run(_identity)] == [3.0, 3.0, 3.0]


def test_import_leaves_the_parameter_server_modules_out():
    # torch itself may import torch.distributed.rpc (torch._jit_internal does); singa_dist must add no RPC
    # module, nor the parameter-server code, until a parameter-server strategy is asked for.
    code = textwrap.dedent("""
        import sys, torch
        before = set(sys.modules)
        import singa_dist as sd
        added = set(sys.modules) - before
        print(sorted(m for m in added if "rpc" in m or m.startswith("singa_dist.ps")
                     or m.rsplit(".", 1)[-1] in ("sandblaster", "downpour", "hogwild", "hybrid")))
        print("torch.distributed.rpc" in sys.modules, "torch.distributed.rpc" in before)
        print(sd.Downpour.__name__, "singa_dist.ps.transport" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    added, rpc, downpour = out.stdout.splitlines()
    assert added == "[]"
    rpc_now, rpc_before = rpc.split()
    assert rpc_now == rpc_before  # present only if torch brought it
    assert downpour == "Downpour True"


def test_cross_ranks_follow_horovod_for_uneven_nodes():
    # Nodes of 3, 1 and 2 processes: a process's cross rank counts the processes with its local rank before it.
    local_ranks = [0, 1, 2, 0, 0, 1]
    assert environment.ranks_within(local_ranks) == [(0, 3), (0, 2), (0, 1), (1, 3), (2, 3), (1, 2)]
    assert environment.ranks_within([0, 1, 0, 1]) == [(0, 2), (0, 2), (1, 2), (1, 2)]  # uniform: node index, nodes


@pytest.mark.parametrize("distribution, expected", [
    (None, [(0, 3), (1, 3), (1, 2)]),
    ("block:cyclic", [(0, 3), (1, 3), (1, 2)]),
    ("cyclic", [None, None, None]),  # tasks dealt round-robin: SLURM's node list does not say the order
])
def test_cross_ranks_from_slurm(distribution, expected, monkeypatch):
    # Nodes of 2, 1 and 2 tasks in block order: local ranks 0 1 | 0 | 0 1; asked: node 0's local rank 0,
    # node 1's local rank 0 and node 2's local rank 1 (processes 0, 2 and 4).
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "2,1,2")
    if distribution is None:
        monkeypatch.delenv("SLURM_DISTRIBUTION", raising=False)
    else:
        monkeypatch.setenv("SLURM_DISTRIBUTION", distribution)
    found = []
    for node, local in [(0, 0), (1, 0), (2, 1)]:
        monkeypatch.setenv("SLURM_NODEID", str(node))
        found.append(environment.layout_from_slurm(local))
    assert found == expected


def _run_processes(envs: list[dict], code: str, timeout: float = 120.0) -> list[str]:
    """Start one `python -c code` per environment (each in its own session), return their outputs."""
    base = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "OMP_NUM_THREADS": "1"})
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**base, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True) for env in envs]
    outputs = []
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            assert p.returncode == 0 and "terminate called" not in err, f"exit {p.returncode}\n{out}\n{err}"
            outputs.append(out)
    finally:
        for p in procs:
            kill_session(p.pid)
            p.wait()
    return outputs


_LAUNCHER_VARS = ("SINGA_PROC_RANK", "SINGA_PROC_WORLD_SIZE", "SINGA_TOPOLOGY", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "LOCAL_WORLD_SIZE", "GROUP_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_SIZE", "SLURM_PROCID",
                  "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT")

_LAYOUT = ("import singa_dist as sd; sd.init(); "
           "print(sd.rank(), sd.local_rank(), sd.local_size(), sd.cross_rank(), sd.cross_size()); sd.shutdown()")


def test_uneven_nodes_from_torchrun_environment():
    # torchrun's variables for two nodes of 1 and 2 processes (GROUP_RANK is the node): found by an all-gather.
    layout = [(0, 0, 1), (1, 0, 2), (1, 1, 2)]  # (node, local rank, local size) of ranks 0, 1, 2
    envs = [{"RANK": str(r), "WORLD_SIZE": "3", "GROUP_RANK": str(node), "LOCAL_RANK": str(local),
             "LOCAL_WORLD_SIZE": str(count)} for r, (node, local, count) in enumerate(layout)]
    outputs = _run_processes(envs, _LAYOUT)
    assert [o.split() for o in outputs] == [["0", "0", "1", "0", "2"], ["1", "0", "2", "1", "2"],
                                            ["2", "1", "2", "0", "1"]]


def test_local_and_cross_ranks_count_workers_not_servers():
    # torchrun's variables for two nodes of 2 processes, Sandblaster's server the last process (on node 1):
    # a worker's local and cross ranks are among workers, as Horovod's are among its ranks.
    layout = [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    envs = [{"RANK": str(r), "WORLD_SIZE": "4", "GROUP_RANK": str(node), "LOCAL_RANK": str(local),
             "LOCAL_WORLD_SIZE": str(count), "SINGA_STRATEGY": "sandblaster", "SINGA_SERVERS": "1"}
            for r, (node, local, count) in enumerate(layout)]
    outputs = _run_processes(envs, _LAYOUT)
    assert [o.split() for o in outputs[:3]] == [["0", "0", "2", "0", "2"], ["1", "1", "2", "0", "1"],
                                                ["2", "0", "1", "1", "2"]]
    assert outputs[3] == ""  # the server serves inside init() and runs no more of the script


def test_local_ranks_from_host_names_when_the_launcher_gives_none():
    # An MPI that exports only PMI_RANK/PMI_SIZE: the processes find their local ranks from their host names.
    envs = [{"PMI_RANK": str(r), "PMI_SIZE": "3"} for r in range(3)]
    outputs = _run_processes(envs, _LAYOUT)
    assert [o.split() for o in outputs] == [[str(r), str(r), "3", "0", "1"] for r in range(3)]


_UNWAITED = textwrap.dedent("""
    import sys, weakref, torch
    import singa_dist as sd
    sd.init()
    model = torch.nn.Linear(64, 64)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    group = weakref.ref(sd.workers_process_group())
    # Asynchronous all-reduces whose handles are dropped unwaited: the groups' threads still work on them.
    handles = [sd.allreduce_async(torch.randn(2000), name=f"t{i}") for i in range(200)]
    del handles
    if sys.argv[1] == "shutdown":
        sd.shutdown()
        print("group gone:", group() is None)  # although the optimizer (and its strategy) is still here
""")


@pytest.mark.parametrize("how", ["shutdown", "exit"])
def test_job_ends_cleanly_with_collectives_in_flight(how):
    # Without shutdown() at exit, this aborted with "terminate called without an active exception" (SIGABRT)
    # in most runs: the groups' threads released tensors while the interpreter was finalizing.
    envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"} for r in range(2)]
    outputs = _run_processes(envs, _UNWAITED.replace("sys.argv[1]", repr(how)))
    if how == "shutdown":
        assert outputs == ["group gone: True\n"] * 2


_LATE = textwrap.dedent("""
    import os, time
    import singa_dist as sd
    sd.init()
    if sd.rank() == 1:
        time.sleep(float(os.environ["LATE_S"]))
    try:
        sd.shutdown()
        print("left")
    except RuntimeError as exc:
        print("error:", exc)
""")


def test_shutdown_names_a_process_that_never_comes():
    envs = [{"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2", "SINGA_TIMEOUT": "3",
             "LATE_S": "8"} for r in range(2)]
    start = time.monotonic()
    outputs = _run_processes(envs, _LATE)
    assert outputs[0].startswith("error: process 0: process 1 did not reach singa_dist.shutdown() within 3 s")
    assert time.monotonic() - start < 60


def test_shutdown_runs_the_registered_phases_in_order():
    """The layers above the runtime register what shutdown() must do; the runtime imports none of them."""
    from singa_dist import runtime

    calls = []
    runtime.on_shutdown(lambda: calls.append("release"), phase="release")
    runtime.on_shutdown(lambda: calls.append("close, first registered"))
    runtime.on_shutdown(lambda: calls.append("close, last registered"), phase="close")

    def failing():
        calls.append("failing")
        raise OSError("a dead server")
    runtime.on_shutdown(failing, phase="close")
    kept = []

    def keep():
        kept.append(1)
    runtime.on_shutdown(keep, phase="release", persistent=True)
    try:
        with pytest.raises(OSError, match="a dead server"):
            runtime.shutdown()  # a failed hook does not stop the others; its error is raised at the end
        assert calls == ["failing", "close, last registered", "close, first registered", "release"]
        runtime.shutdown()
        assert calls[4:] == [] and kept == [1, 1]  # one-shot hooks ran once; the persistent one runs every time
    finally:
        runtime._hooks["release"] = [h for h in runtime._hooks["release"] if h[0]() is not keep]
    with pytest.raises(ValueError, match="phase must be one of drain, close, release"):
        runtime.on_shutdown(print, phase="later")
