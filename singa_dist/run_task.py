"""A worker of `singa_dist.run_elastic` (horovod.run with elastic arguments): `python -m singa_dist.run_task DIR`.

DIR holds the task (the function and its arguments, by cloudpickle).
The worker joins the job, runs the function, and leaves its result as DIR/result.<worker id>: (round, rank,
value), so that the caller keeps those of the job's last round in rank order.
"""
from __future__ import annotations

import os
import pickle
import sys

import torch

from . import runtime


def main(folder: str) -> None:
    with open(os.path.join(folder, "task"), "rb") as f:
        fn, args, kwargs = pickle.load(f)
    torch.set_num_threads(1)
    runtime.init()
    value = fn(*args, **kwargs)
    path = os.path.join(folder, f"result.{os.environ.get('SINGA_WORKER_ID', '0')}")
    with open(path + ".part", "wb") as f:
        pickle.dump((runtime.elastic_round(), runtime.rank(), value), f)
    os.replace(path + ".part", path)  # whole or not at all: a worker killed while writing leaves no result
    runtime.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
