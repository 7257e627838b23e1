"""The parameter servers' two transports, side by side: torch RPC (TensorPipe) and ps.sockets (a replacement worker
group's calls, plain TCP).

Two processes on this machine: the caller sends a tensor of each size and gets it back (a push answered with the
fresh values, the exchange a Downpour worker makes every step), through one transport and then the other, in
alternating rounds. The table gives the median round trip of each and the ratio sockets / RPC, with its spread
over the rounds; the CSV lands in benchmarks/results/door_transport.csv.

    python -m benchmarks.door_transport [--rounds 3] [--reps 30]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import print_table, write_csv

SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 22]  # float32 elements: 4 KiB to 16 MiB


def echo(t: torch.Tensor) -> torch.Tensor:
    return t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rpc(rank: int, port: int) -> None:
    import torch.distributed.rpc as rpc
    options = rpc.TensorPipeRpcBackendOptions(init_method=f"tcp://127.0.0.1:{port}", rpc_timeout=120,
                                              num_worker_threads=16, _transports=["uv"], _channels=["basic"])
    rpc.init_rpc(f"p{rank}", rank=rank, world_size=2, rpc_backend_options=options)


def _serve(port: int, door_file: str) -> None:
    import torch.distributed.rpc as rpc

    from singa_dist.ps import sockets
    door = sockets.Listener("127.0.0.1")
    with open(door_file + ".tmp", "w") as f:
        f.write(str(door.port))
    os.replace(door_file + ".tmp", door_file)
    _rpc(1, port)
    rpc.shutdown()  # waits for the caller to finish
    door.close()


def _time(call, tensor, reps: int) -> float:
    for _ in range(3):
        call(tensor)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call(tensor)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.serve:
        _serve(int(args.serve[0]), args.serve[1])
        return
    import tempfile

    import torch.distributed.rpc as rpc

    from singa_dist.ps import sockets
    port = _free_port()
    door_file = os.path.join(tempfile.mkdtemp(prefix="door-"), "port")
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.door_transport", "--serve", str(port), door_file],
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _rpc(0, port)
        while not os.path.exists(door_file):
            time.sleep(0.05)
        conn = sockets.Connection(("127.0.0.1", int(open(door_file).read())), "the server", connect_timeout=30)
        by_rpc = lambda t: rpc.rpc_sync("p1", echo, args=(t,))  # noqa: E731
        by_door = lambda t: conn.call(echo, (t,), 120).wait()  # noqa: E731
        for t in (torch.randn(8),):
            assert torch.equal(by_rpc(t), t) and torch.equal(by_door(t), t)
        ratios: dict[int, list] = {n: [] for n in SIZES}
        times: dict[int, dict] = {n: {"rpc": [], "sockets": []} for n in SIZES}
        for _ in range(args.rounds):
            for n in SIZES:
                t = torch.randn(n)
                reps = max(5, args.reps * (1 << 16) // max(n, 1 << 16))
                r, d = _time(by_rpc, t, reps), _time(by_door, t, reps)
                times[n]["rpc"].append(r)
                times[n]["sockets"].append(d)
                ratios[n].append(d / r)
        conn.close()
        rpc.shutdown()
    finally:
        server.wait(timeout=60)
    rows = []
    for n in SIZES:
        rows.append({"bytes": n * 4, "rpc_ms": round(statistics.median(times[n]["rpc"]), 4),
                     "sockets_ms": round(statistics.median(times[n]["sockets"]), 4),
                     "ratio_sockets_over_rpc": round(statistics.median(ratios[n]), 3),
                     "ratio_min": round(min(ratios[n]), 3), "ratio_max": round(max(ratios[n]), 3),
                     "rounds": args.rounds})
    print_table(rows, ["bytes", "rpc_ms", "sockets_ms", "ratio_sockets_over_rpc", "ratio_min", "ratio_max"])
    write_csv("door_transport", rows)


if __name__ == "__main__":
    main()
