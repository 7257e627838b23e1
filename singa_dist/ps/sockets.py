"""Calls between processes over plain TCP, for processes that joined a running job.

torch's RPC group is fixed when the job starts: a process that takes the place of a lost one later (a replacement
worker group of an asynchronous job) cannot join it, since joining means connecting to every member and the lost
ones refuse. The parameter servers (and every process that hands out values) therefore also listen here, and a
replacement's calls travel this way; everything else keeps torch's RPC.

A call is one frame each way. A frame is a pickle (protocol 5) whose tensors travel out of band as raw bytes:
  [u32 count of buffers] [u64 length of the pickle] [u64 length of each buffer] [pickle] [buffers ...]
A request is ("call", id, fn, args); the answer ("ok", id, value) or ("err", id, text). A handler that returns a
torch Future (an asynchronous handler) is answered when the future completes. Each process publishes its address
in the job's store; a caller connects once per peer and keeps the connection. As with torch's RPC, a call names a
function to run and carries pickles: the job's network must be trusted (a listener binds only the address the
job's hosts reach it by, loopback for a job on one host).
"""
from __future__ import annotations

import concurrent.futures
import io
import itertools
import pickle
import socket
import struct
import threading
import time
import traceback

import torch

POLL_S = 0.05  # how often pending calls are checked against their deadlines
_HEADER = struct.Struct("!IQ")


class RemoteError(RuntimeError):
    """The handler raised on the peer (the text is its exception and traceback)."""


def _rebuild(buffer, dtype: str, shape: tuple, requires_grad: bool) -> torch.Tensor:
    t = torch.frombuffer(buffer, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)
    return t.requires_grad_(requires_grad) if requires_grad else t


class _Pickler(pickle.Pickler):
    """Pickles CPU tensors as out-of-band raw bytes (no copy into the pickle, any dtype)."""

    def reducer_override(self, obj):
        if type(obj) in (torch.Tensor, torch.nn.Parameter) and obj.layout == torch.strided and not obj.is_cuda \
                and obj.numel() > 0 and obj.dtype not in (torch.complex32,) and not obj.is_quantized:
            data = obj.detach().contiguous().reshape(-1).view(torch.uint8)
            return _rebuild, (pickle.PickleBuffer(data.numpy()), str(obj.dtype).split(".")[1], tuple(obj.shape),
                              obj.requires_grad)
        return NotImplemented


def _encode(message) -> list:
    buffers: list = []
    stream = io.BytesIO()
    _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
    raws = [b.raw() for b in buffers]
    head = _HEADER.pack(len(raws), stream.getbuffer().nbytes) + b"".join(struct.pack("!Q", r.nbytes) for r in raws)
    return [head, stream.getbuffer(), *raws]


def _read_exactly(sock: socket.socket, n: int) -> bytearray:
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the connection closed")
        got += k
    return out


def _receive(sock: socket.socket):
    count, size = _HEADER.unpack(_read_exactly(sock, _HEADER.size))
    lengths = struct.unpack(f"!{count}Q", _read_exactly(sock, 8 * count)) if count else ()
    body = _read_exactly(sock, size)
    buffers = [_read_exactly(sock, n) for n in lengths]
    return pickle.loads(body, buffers=buffers)


def _send(sock: socket.socket, lock: threading.Lock, message) -> None:
    parts = _encode(message)
    with lock:
        for part in parts:
            sock.sendall(part)


def local_address(toward: str) -> str:
    """This host's address as seen from the way to `toward` (the job's store host): reachable by the job's
    other hosts, which a host name may not be."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.connect((socket.gethostbyname(toward), 9))
            return probe.getsockname()[0]
        finally:
            probe.close()
    except OSError:
        return "127.0.0.1"


class Listener:
    """Serves calls on a TCP port: each request runs on a pool of threads and is answered on its connection."""

    def __init__(self, host: str = "0.0.0.0", threads: int = 16):
        self._sock = socket.create_server((host, 0), backlog=64)
        self.port = self._sock.getsockname()[1]
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="singa-door")
        self._closed = False
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, name="singa-door-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="singa-door-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        lock = threading.Lock()
        try:
            while True:
                kind, call_id, fn, args = _receive(conn)
                self._pool.submit(self._run, conn, lock, call_id, fn, args)
        except Exception:  # the caller went away (or the listener closed)
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _run(self, conn, lock, call_id, fn, args) -> None:
        def answer(kind, value):
            try:
                _send(conn, lock, (kind, call_id, value))
            except Exception as exc:
                if kind == "ok":  # an answer that cannot be pickled: say so rather than leave the caller waiting
                    try:
                        _send(conn, lock, ("err", call_id, f"the answer could not be sent: {exc!r}"))
                    except Exception:
                        pass
        try:
            result = fn(*args)
        except BaseException as exc:
            answer("err", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            return
        if isinstance(result, torch.futures.Future):
            def done(future):
                try:
                    answer("ok", future.value())
                except BaseException as exc:
                    answer("err", call_id, f"{type(exc).__name__}: {exc}")
            result.add_done_callback(done)
        else:
            answer("ok", result)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)


class Connection:
    """A caller's connection to one peer: calls return torch Futures, failed by a timeout or a closed connection."""

    def __init__(self, address: tuple[str, int], peer: str, connect_timeout: float):
        self.peer = peer
        self._sock = socket.create_connection(address, timeout=connect_timeout)
        self._sock.settimeout(None)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._lock = threading.Lock()  # sending
        self._pending: dict[int, tuple[torch.futures.Future, float]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self.broken: BaseException | None = None
        threading.Thread(target=self._read, name=f"singa-door-{peer}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"singa-door-timer-{peer}", daemon=True).start()

    def call(self, fn, args: tuple, timeout: float) -> torch.futures.Future:
        future = torch.futures.Future()
        if self.broken is not None:
            future.set_exception(ConnectionError(f"the connection to {self.peer} closed: {self.broken}"))
            return future
        call_id = next(self._ids)
        with self._pending_lock:
            self._pending[call_id] = (future, time.monotonic() + timeout)
        try:
            _send(self._sock, self._lock, ("call", call_id, fn, args))
        except Exception as exc:
            self._finish(call_id, exception=ConnectionError(f"the call to {self.peer} could not be sent: {exc}"))
        return future

    def _finish(self, call_id: int, value=None, exception: BaseException | None = None) -> None:
        with self._pending_lock:
            entry = self._pending.pop(call_id, None)
        if entry is None:
            return
        if exception is not None:
            entry[0].set_exception(exception)
        else:
            entry[0].set_result(value)

    def _read(self) -> None:
        try:
            while True:
                kind, call_id, value = _receive(self._sock)
                if kind == "ok":
                    self._finish(call_id, value)
                else:
                    self._finish(call_id, exception=RemoteError(f"raised on {self.peer}: {value}"))
        except Exception as exc:
            self._fail_all(exc)

    def _fail_all(self, cause: BaseException) -> None:
        self.broken = cause
        with self._pending_lock:
            ids = list(self._pending)
        for call_id in ids:
            self._finish(call_id, exception=ConnectionError(f"the connection to {self.peer} closed: {cause}"))

    def _watch(self) -> None:
        while self.broken is None:
            time.sleep(POLL_S)
            now = time.monotonic()
            with self._pending_lock:
                late = [(i, d) for i, (_, d) in self._pending.items() if d < now]
            for call_id, _ in late:
                self._finish(call_id, exception=TimeoutError(f"the call to {self.peer} timed out"))

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
