"""The parameter servers' two transports, side by side: torch RPC (TensorPipe) and ps.sockets (a replacement worker
group's calls, plain TCP), and what signing ps.sockets' frames costs.

Two processes on this machine: the caller sends a tensor of each size and gets it back (a push answered with the
fresh values, the exchange a Downpour worker makes every step), through each transport in turn, in alternating
rounds:
- `rpc`: torch RPC;
- `signed`: ps.sockets as it is (greetings, HMAC-SHA256 tags over each frame's head and pickle, the restricted
  unpickler; docs/security.md);
- `unsigned`: the frames ps.sockets sent before they were signed (no greeting, no tags, `pickle.loads`), kept here
  only as the baseline;
- `every_byte`: as `signed`, with a third tag over the tensors' raw bytes too (the design not taken: see
  docs/security.md).
The first table gives the median round trip of RPC and the door and their ratio (benchmarks/results/
door_transport.csv); the second the door's round trip signed, unsigned and tagged over every byte, with the ratios
to the unsigned one and their spread over the rounds (benchmarks/results/door_signing.csv).

    python -m benchmarks.door_transport [--rounds 3] [--reps 30]
"""
from __future__ import annotations

import argparse
import hmac
import io
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

import torch

from benchmarks.common import print_table, write_csv
from singa_dist.ps import sockets

SIZES = [1 << 10, 1 << 16, 1 << 20, 1 << 22]  # float32 elements: 4 KiB to 16 MiB
KEY = os.urandom(32)  # (the server process gets it in its environment, as a job's processes do)
DOORS = ("signed", "unsigned", "every_byte")


@sockets.handler
def echo(t: torch.Tensor) -> torch.Tensor:
    return t


class Unsigned(sockets.Channel):
    """The frames of ps.sockets before they were signed: [u32 count] [u64 pickle length] [u64 each buffer's
    length] [pickle] [buffers], loaded with pickle.loads."""

    def __init__(self, sock, key, side, greeting_timeout):
        self.sock = sock
        self.verified = True
        self._send_lock = threading.Lock()
        sock.settimeout(None)

    def send(self, message) -> None:
        buffers: list = []
        stream = io.BytesIO()
        sockets._Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
        raws = [b.raw() for b in buffers]
        head = struct.pack("!IQ", len(raws), stream.getbuffer().nbytes) + b"".join(
            struct.pack("!Q", r.nbytes) for r in raws)
        with self._send_lock:
            for part in [head, stream.getbuffer(), *raws]:
                self.sock.sendall(part)

    def receive(self, deadline=None):
        count, size = struct.unpack("!IQ", sockets._read_exactly(self.sock, 12))
        lengths = struct.unpack(f"!{count}Q", sockets._read_exactly(self.sock, 8 * count)) if count else ()
        body = sockets._read_exactly(self.sock, size)
        buffers = [sockets._read_exactly(self.sock, n) for n in lengths]
        return pickle.loads(body, buffers=buffers)


class EveryByte(sockets.Channel):
    """Signed frames with a third tag, over the tensors' raw bytes, after them."""

    def send(self, message) -> None:
        buffers: list = []
        stream = io.BytesIO()
        sockets._Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
        raws = [b.raw() for b in buffers]
        body = stream.getbuffer()
        lengths = struct.pack(f"!{len(raws)}Q", *(r.nbytes for r in raws))
        with self._send_lock:
            head = sockets._HEAD.pack(self._sent, len(raws), body.nbytes, sum(r.nbytes for r in raws))
            head_tag = self._tag(self._out, b"h", head)
            body_tag = self._tag(self._out, b"b", head_tag, lengths, body)
            raw_tag = self._tag(self._out, b"r", body_tag, *raws)
            self._sent += 1
            sockets._send_all(self.sock, [head, head_tag, lengths, body, body_tag, *raws, raw_tag])

    def receive(self, deadline=None):
        sock = self.sock
        head = sockets._read_exactly(sock, sockets._HEAD.size + sockets._TAG)
        head, head_tag = bytes(head[:sockets._HEAD.size]), bytes(head[sockets._HEAD.size:])
        if not hmac.compare_digest(self._tag(self._in, b"h", head), head_tag):
            raise sockets.FrameError("head")
        _, count, size, _ = sockets._HEAD.unpack(head)
        rest = sockets._read_exactly(sock, 8 * count + size + sockets._TAG)
        body, body_tag = memoryview(rest)[:-sockets._TAG], bytes(rest[-sockets._TAG:])
        if not hmac.compare_digest(self._tag(self._in, b"b", head_tag, body), body_tag):
            raise sockets.FrameError("body")
        lengths = struct.unpack(f"!{count}Q", body[:8 * count]) if count else ()
        buffers = [sockets._read_exactly(sock, n) for n in lengths]
        if not hmac.compare_digest(self._tag(self._in, b"r", body_tag, *buffers),
                                   bytes(sockets._read_exactly(sock, sockets._TAG))):
            raise sockets.FrameError("payload")
        self._received += 1
        self.verified = True
        return sockets._Unpickler(io.BytesIO(body[8 * count:]), buffers=buffers).load()


def _ends(kind: str):
    channel = {"signed": sockets.Channel, "unsigned": Unsigned, "every_byte": EveryByte}[kind]
    listener = type(f"{kind}Listener", (sockets.Listener,), {"channel": channel})
    connection = type(f"{kind}Connection", (sockets.Connection,), {"channel": channel})
    return listener, connection


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
    key = bytes.fromhex(os.environ["DOOR_BENCH_KEY"])
    doors = [_ends(kind)[0]("127.0.0.1", key) for kind in DOORS]
    with open(door_file + ".tmp", "w") as f:
        f.write(" ".join(str(door.port) for door in doors))
    os.replace(door_file + ".tmp", door_file)
    _rpc(1, port)
    rpc.shutdown()  # waits for the caller to finish
    for door in doors:
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

    port = _free_port()
    door_file = os.path.join(tempfile.mkdtemp(prefix="door-"), "port")
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.door_transport", "--serve", str(port), door_file],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "DOOR_BENCH_KEY": KEY.hex()})
    try:
        _rpc(0, port)
        while not os.path.exists(door_file):
            time.sleep(0.05)
        ports = [int(p) for p in open(door_file).read().split()]
        conns = {kind: _ends(kind)[1](("127.0.0.1", p), "the server", connect_timeout=30, key=KEY)
                 for kind, p in zip(DOORS, ports)}
        calls = {"rpc": lambda t: rpc.rpc_sync("p1", echo, args=(t,))}
        for kind, conn in conns.items():
            calls[kind] = lambda t, conn=conn: conn.call(echo, (t,), 120).wait()
        for t in (torch.randn(8),):
            assert all(torch.equal(call(t), t) for call in calls.values())
        times: dict[int, dict] = {n: {name: [] for name in calls} for n in SIZES}
        for _ in range(args.rounds):
            for n in SIZES:
                t = torch.randn(n)
                reps = max(5, args.reps * (1 << 16) // max(n, 1 << 16))
                for name, call in calls.items():
                    times[n][name].append(_time(call, t, reps))
        for conn in conns.values():
            conn.close()
        rpc.shutdown()
    finally:
        server.wait(timeout=60)
    transports, signing = [], []
    for n in SIZES:
        got = times[n]
        med = {name: statistics.median(values) for name, values in got.items()}
        over_rpc = [s / r for s, r in zip(got["signed"], got["rpc"])]
        transports.append({"bytes": n * 4, "rpc_ms": round(med["rpc"], 4), "sockets_ms": round(med["signed"], 4),
                           "ratio_sockets_over_rpc": round(statistics.median(over_rpc), 3),
                           "ratio_min": round(min(over_rpc), 3), "ratio_max": round(max(over_rpc), 3),
                           "rounds": args.rounds})
        signed = [s / u for s, u in zip(got["signed"], got["unsigned"])]
        every = [e / u for e, u in zip(got["every_byte"], got["unsigned"])]
        signing.append({"bytes": n * 4, "unsigned_ms": round(med["unsigned"], 4),
                        "signed_ms": round(med["signed"], 4), "every_byte_ms": round(med["every_byte"], 4),
                        "signed_over_unsigned": round(statistics.median(signed), 3),
                        "signed_min": round(min(signed), 3), "signed_max": round(max(signed), 3),
                        "every_byte_over_unsigned": round(statistics.median(every), 3), "rounds": args.rounds})
    print_table(transports, ["bytes", "rpc_ms", "sockets_ms", "ratio_sockets_over_rpc", "ratio_min", "ratio_max"])
    print()
    print_table(signing, ["bytes", "unsigned_ms", "signed_ms", "signed_over_unsigned", "signed_min", "signed_max",
                          "every_byte_ms", "every_byte_over_unsigned"])
    write_csv("door_transport", transports)
    write_csv("door_signing", signing)


if __name__ == "__main__":
    main()
