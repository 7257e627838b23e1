"""The runtime: a lone process, and real 2- and 3-rank Gloo worlds."""
import subprocess
import sys

import torch
import torch.distributed as dist

import singa_dist as sd


def test_single_process_without_launcher():
    code = ("import singa_dist as sd; sd.init(); "
            "print(sd.rank(), sd.size(), sd.local_rank(), sd.local_size(), sd.is_distributed()); sd.shutdown()")
    env = {k: v for k, v in __import__('os').environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK",
                        "PMI_RANK", "SLURM_PROCID", "SINGA_PROC_RANK")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1", "0", "1", "False"]


def _identity():
    t = torch.tensor([float(sd.rank())])
    dist.all_reduce(t, group=sd.workers_process_group())
    return sd.rank(), sd.size(), sd.worker_group(), t.item()


def test_world_ranks(world2, world3):
    assert world2.run(_identity) == [(0, 2, 0, 1.0), (1, 2, 0, 1.0)]
    assert [r[3] for r in world3.run(_identity)] == [3.0, 3.0, 3.0]
