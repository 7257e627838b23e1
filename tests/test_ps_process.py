"""A server started as singa-launch starts it (`python -m singa_dist.ps`) exits cleanly after the workers."""
import os
import subprocess
import sys
import time

import singa_dist as sd
from tests.dist_harness import free_port, kill_session

WORKER = """
import torch, singa_dist as sd
torch.set_num_threads(1)
sd.init()
model = torch.nn.Linear(4, 2)
opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
for _ in range(3):
    opt.zero_grad(); model(torch.ones(2, 4)).sum().backward(); opt.step()
print("versions", opt.strategy.versions, type(opt.strategy).__name__)
sd.shutdown()
"""


def test_server_process_exits_after_workers_shut_down():
    topology = sd.ClusterTopology.sandblaster(1, 1)
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")), "OMP_NUM_THREADS": "1",
            "SINGA_TOPOLOGY": topology.to_json(), "SINGA_PROC_WORLD_SIZE": "2", "SINGA_TIMEOUT": "30",
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    procs = []
    try:
        for rank, args in ((0, ["-c", WORKER]), (1, ["-m", "singa_dist.ps"])):
            env = {**base, "SINGA_PROC_RANK": str(rank), "RANK": str(rank), "WORLD_SIZE": "1"}
            procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        deadline = time.monotonic() + 90
        outs = [p.communicate(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    finally:
        for p in procs:
            kill_session(p.pid)
    assert procs[0].returncode == 0, outs[0][1][-2000:]
    assert procs[1].returncode == 0, outs[1][1][-2000:]
    assert "versions [3] Sandblaster" in outs[0][0]
