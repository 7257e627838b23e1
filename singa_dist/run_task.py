"""One process of `singa_dist.run` or `singa_dist.run_elastic`: `python -m singa_dist.run_task DIR [INDEX]`.

DIR holds the task (the function and its arguments, by cloudpickle). The process joins the job, runs the
function, and leaves what happened in DIR, each file written whole:
- with INDEX (sd.run, a job of fixed processes): `returned.<INDEX>` (the pickled value), then `left.<INDEX>`
  once shutdown() is over, or `error.<INDEX>` (the traceback) when anything raised;
- without (an elastic job's worker): `result.<worker id>` holding (round, rank, value), so that the caller keeps
  those of the job's last round in rank order.
"""
from __future__ import annotations

import os
import pickle
import sys
import traceback

import torch

from . import runtime
from .runner import OUTPUT_VARIABLE, _output_to_files


def _leave(folder: str, name: str, data: bytes) -> None:
    path = os.path.join(folder, name)
    with open(path + ".part", "wb") as f:
        f.write(data)
    os.replace(path + ".part", path)  # whole or not at all: a process killed while writing leaves nothing


def _task(folder: str):
    with open(os.path.join(folder, "task"), "rb") as f:
        return pickle.load(f)


def elastic_worker(folder: str) -> None:
    fn, args, kwargs = _task(folder)
    torch.set_num_threads(1)
    runtime.init()
    value = fn(*args, **kwargs)
    _leave(folder, f"result.{os.environ.get('SINGA_WORKER_ID', '0')}",
           pickle.dumps((runtime.elastic_round(), runtime.rank(), value)))
    runtime.shutdown()


def fixed_process(folder: str, index: int) -> None:
    if os.environ.get(OUTPUT_VARIABLE):
        _output_to_files(os.path.join(os.environ[OUTPUT_VARIABLE], f"rank.{index}"))
    torch.set_num_threads(1)
    try:
        fn, args, kwargs = _task(folder)
        runtime.init()
        _leave(folder, f"returned.{index}", pickle.dumps(fn(*args, **kwargs)))
    except runtime.ServerDone:  # a parameter server: init() served until the workers were done
        _leave(folder, f"returned.{index}", pickle.dumps(None))
        _leave(folder, f"left.{index}", b"")
        return
    except BaseException:
        _leave(folder, f"error.{index}", traceback.format_exc().encode())
        runtime.shutdown()  # with the exception in flight: leaves without waiting for the others
        raise SystemExit(1) from None
    try:
        runtime.shutdown()
    except BaseException:
        _leave(folder, f"error.{index}", traceback.format_exc().encode())
        raise SystemExit(1) from None
    _leave(folder, f"left.{index}", b"")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        fixed_process(sys.argv[1], int(sys.argv[2]))
    else:
        elastic_worker(sys.argv[1])
