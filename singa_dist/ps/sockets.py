"""Calls between processes over plain TCP, for processes that joined a running job.

torch's RPC group is fixed when the job starts: a process that takes the place of a lost one later (a replacement
worker group of an asynchronous job) cannot join it, since joining means connecting to every member and the lost
ones refuse. The parameter servers (and every process that hands out values) therefore also listen here, at a
"door", and a replacement's calls travel this way; everything else keeps torch's RPC.

Nothing a door receives is read before it is authenticated (docs/security.md). Every process of the job holds the
job's secret (SINGA_SECRET, handed down by the launcher in the environment). A connection opens with a greeting each
way (a magic word and 16 random bytes); every frame then carries two HMAC-SHA256 tags under the secret, bound to both
greetings, to the frame's direction and to its sequence number (so that no frame can be replayed, reordered or moved
to another connection):

  head  [u64 sequence] [u32 count of buffers] [u64 length of the pickle] [u64 length of the buffers]
        [tag of the head]                                   checked before anything else is read or allocated
  body  [u64 length of each buffer] [pickle]
        [tag of the head's tag and the body]                checked before the pickle is loaded
        [buffers ...]                                       the raw bytes of the tensors (see docs/security.md)

The pickle (protocol 5; tensors travel out of band as raw bytes) is then loaded by an unpickler that knows only what
the protocol sends: tensors through this module's own rebuild functions, numbers, strings, containers, dtypes,
exceptions. A call names its handler, one of the functions marked with `handler` (the servers' and Hogwild masters'),
never a function to import. A request is ("call", id, handler name, args); the answer ("ok", id, value) or
("err", id, text). A handler that returns a torch Future (an asynchronous handler) is answered when the future
completes. A frame that fails a check closes its connection, with one warning naming the peer.

Each connection is served in a thread of its own: a peer that greets badly, sends nothing, half a frame, garbage or
a huge length costs that thread only, and only for a bounded time (GREETING_S, FRAME_S). Each process publishes its
door's address in the job's store; a caller connects once per peer and keeps the connection.
"""
from __future__ import annotations

import builtins
import collections
import concurrent.futures
import errno
import hashlib
import hmac
import io
import itertools
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import time
import traceback

import torch

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often pending calls are checked against their deadlines
GREETING_S = 10.0  # a connection must greet and deliver its first whole frame within this many seconds
FRAME_S = 60.0  # once a frame has begun, each read of the rest must come within this many seconds
MAX_UNVERIFIED = 32  # connections not yet past their first frame, at once; more are closed as they come
MAX_BUFFERS = 1 << 20  # buffers of one frame
MAX_PICKLE = 1 << 30  # bytes of one frame's pickle (tensors travel beside it)
MAX_PAYLOAD = 1 << 40  # bytes of one frame's buffers

_MAGIC = b"SINGADR1"
_NONCE = 16
_HEAD = struct.Struct("!QIQQ")
_TAG = hashlib.sha256().digest_size
_IOV_MAX = 512


class RemoteError(RuntimeError):
    """The handler raised on the peer (the text is its exception and traceback)."""


class FrameError(ConnectionError):
    """What a peer sent failed a check (greeting, tag, sequence, size, or a global the protocol does not send): the
    connection is closed."""


# ---- handlers -------------------------------------------------------------------------------------------------
HANDLERS: dict = {}  # handler name -> function: the only functions a door runs


def handler_name(fn) -> str:
    return f"{fn.__module__}:{fn.__qualname__}"


def handler(fn):
    """Mark `fn` (a module-level function) as callable through a door; a door runs nothing else."""
    HANDLERS[handler_name(fn)] = fn
    return fn


# ---- what a pickle may name -------------------------------------------------------------------------------------
def _rebuild(buffer, dtype: str, shape: tuple, requires_grad: bool) -> torch.Tensor:
    t = torch.frombuffer(buffer, dtype=torch.uint8).view(_dtype(dtype)).reshape(shape)
    return t.requires_grad_(True) if requires_grad is True else t


def _rebuild_empty(dtype: str, shape: tuple, requires_grad: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=_dtype(dtype), requires_grad=requires_grad is True)


def _dtype(name: str) -> torch.dtype:
    found = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(found, torch.dtype):
        raise pickle.UnpicklingError(f"{name!r} is not a torch dtype")
    return found


# Harmless to name and to call with any arguments: the protocol's containers, numbers and text.
_SAFE_BUILTINS = {"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "list", "dict", "tuple",
                  "int", "float", "str", "bool"}
_ALLOWED = {(__name__, "_rebuild"): _rebuild, (__name__, "_rebuild_empty"): _rebuild_empty,
            ("collections", "OrderedDict"): collections.OrderedDict, ("torch", "Size"): torch.Size,
            ("torch", "device"): torch.device}


def _allowed_global(module: str, name: str):
    """What the unpickler may look up: the protocol's own rebuild functions, containers, dtypes, and exception
    classes (answers carry them) of the standard library and of this project's modules already imported. None:
    forbidden. Nothing is imported."""
    found = _ALLOWED.get((module, name))
    if found is not None:
        return found
    if "." in name:
        return None
    if module == "builtins":
        found = getattr(builtins, name, None)
        if name in _SAFE_BUILTINS or (isinstance(found, type) and issubclass(found, Exception)):
            return found
        return None
    if module == "torch":
        found = getattr(torch, name, None)
        return found if isinstance(found, torch.dtype) else None
    if module.startswith("singa_dist.") and module in sys.modules:
        found = getattr(sys.modules[module], name, None)
        if isinstance(found, type) and issubclass(found, Exception):
            return found
    return None


class _Unpickler(pickle.Unpickler):
    """Loads only what the protocol sends (a defence behind the tags: an authenticated peer cannot run code here
    either)."""

    def find_class(self, module, name):
        found = _allowed_global(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"the frame names {module}.{name}, which no message of ps.sockets holds")
        return found


class _Pickler(pickle.Pickler):
    """Pickles CPU tensors as out-of-band raw bytes (no copy into the pickle, any dtype)."""

    def reducer_override(self, obj):
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided or obj.is_quantized \
                or obj.device.type != "cpu":
            raise pickle.PicklingError(f"a {type(obj).__name__} ({obj.layout}, {obj.device}) cannot travel through "
                                       "ps.sockets: only dense CPU tensors do")
        dtype = str(obj.dtype).split(".")[1]
        if obj.numel() == 0:
            return _rebuild_empty, (dtype, tuple(obj.shape), obj.requires_grad)
        data = obj.detach().contiguous().reshape(-1).view(torch.uint8)
        return _rebuild, (pickle.PickleBuffer(data.numpy()), dtype, tuple(obj.shape), obj.requires_grad)


# ---- frames -------------------------------------------------------------------------------------------------------
def _kernel_timeouts(sock: socket.socket, seconds: float) -> None:
    """Blocking reads and writes that fail after `seconds` without progress (SO_RCVTIMEO, SO_SNDTIMEO): the kernel
    keeps the time, so a large frame moves in as few system calls as a socket without a timeout (Python's own
    timeouts poll before every call and make a blocked send return to Python at each partial write)."""
    sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("@ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _read_exactly(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray:
    """n bytes; with a deadline (time.monotonic()) they must all come by then, else each read within the socket's
    timeout (FRAME_S, see _kernel_timeouts)."""
    out = bytearray(n)
    view = memoryview(out)
    got = 0
    while got < n:
        try:
            if deadline is not None:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            k = sock.recv_into(view[got:], n - got)
        except (TimeoutError, BlockingIOError):  # (BlockingIOError: the kernel's timeout ran out)
            within = "still missing when the time to greet ran out" if deadline is not None else \
                f"not sent within {FRAME_S:g} s"
            raise FrameError(f"{n - got} of {n} bytes {within}") from None
        if k == 0:
            raise ConnectionError("the connection closed" + (" in the middle of a frame" if got else ""))
        got += k
    return out


def _send_all(sock: socket.socket, parts: list) -> None:
    views = [v for v in (memoryview(p).cast("B") for p in parts) if v.nbytes]
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


class Channel:
    """One end of a connection between two processes of the job: greets the peer, then sends and receives
    authenticated frames. `side` is "client" (the end that connected) or "server"."""

    def __init__(self, sock: socket.socket, key: bytes, side: str, greeting_timeout: float):
        self.sock = sock
        self.verified = False  # a frame from the peer has passed its checks
        self._send_lock = threading.Lock()
        self._broken: BaseException | None = None
        self._sent = 0
        self._received = 0
        mine = os.urandom(_NONCE)
        deadline = time.monotonic() + greeting_timeout
        sock.settimeout(greeting_timeout)
        _send_all(sock, [_MAGIC + mine])
        greeting = _read_exactly(sock, len(_MAGIC) + _NONCE, deadline)
        if not hmac.compare_digest(bytes(greeting[:len(_MAGIC)]), _MAGIC):
            raise FrameError("it does not greet as a door of singa_dist.ps.sockets")
        theirs = bytes(greeting[len(_MAGIC):])
        client, server = (mine, theirs) if side == "client" else (theirs, mine)
        session = hmac.new(key, b"singa door 1" + client + server, hashlib.sha256)
        self._out = session.copy()
        self._out.update(b"c" if side == "client" else b"s")
        self._in = session.copy()
        self._in.update(b"s" if side == "client" else b"c")
        _kernel_timeouts(sock, FRAME_S)

    @staticmethod
    def _tag(base, *parts) -> bytes:
        mac = base.copy()
        for part in parts:
            mac.update(part)
        return mac.digest()

    def send(self, message) -> None:
        """Send `message` as one frame (it is pickled first: a message that cannot be pickled sends nothing, and the
        connection goes on). ConnectionError when the connection broke (then for good)."""
        buffers: list = []
        stream = io.BytesIO()
        _Pickler(stream, protocol=5, buffer_callback=buffers.append).dump(message)
        raws = [b.raw() for b in buffers]
        body = stream.getbuffer()
        lengths = struct.pack(f"!{len(raws)}Q", *(r.nbytes for r in raws))
        with self._send_lock:
            if self._broken is not None:
                raise ConnectionError(f"the connection broke in the middle of a frame: {self._broken}")
            head = _HEAD.pack(self._sent, len(raws), body.nbytes, sum(r.nbytes for r in raws))
            head_tag = self._tag(self._out, b"h", head)
            body_tag = self._tag(self._out, b"b", head_tag, lengths, body)
            self._sent += 1
            try:
                _send_all(self.sock, [head, head_tag, lengths, body, body_tag, *raws])
            except OSError as exc:  # part of a frame may have gone: nothing more can follow it
                self._broken = exc
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                raise ConnectionError(f"the connection broke in the middle of a frame: {exc}") from None

    def receive(self, deadline: float | None = None):
        """The next message. With `deadline`, the whole frame must have come by then (a peer not yet trusted);
        without, the frame may take its time to begin, then each read of the rest has FRAME_S."""
        sock = self.sock
        first = _HEAD.size + _TAG
        if deadline is not None:
            head = _read_exactly(sock, first, deadline)
        else:
            head = bytearray(first)
            view, got = memoryview(head), 0
            while got < first:
                try:
                    k = sock.recv_into(view[got:], first - got)
                except (TimeoutError, BlockingIOError):
                    if got:
                        raise FrameError(f"half a frame's head, then nothing for {FRAME_S:g} s") from None
                    continue  # idle between frames
                if k == 0:
                    raise ConnectionError("the connection closed" + (" in the middle of a frame" if got else ""))
                got += k
        head, head_tag = bytes(head[:_HEAD.size]), bytes(head[_HEAD.size:])
        if not hmac.compare_digest(self._tag(self._in, b"h", head), head_tag):
            raise FrameError("a frame whose tag does not match (not signed with this job's secret, or altered)")
        sequence, count, size, payload = _HEAD.unpack(head)
        if sequence != self._received:
            raise FrameError(f"frame {sequence} came where frame {self._received} was due (replayed or reordered)")
        if count > MAX_BUFFERS or size > MAX_PICKLE or payload > MAX_PAYLOAD:
            raise FrameError(f"a frame of {count} buffers, a {size}-byte pickle and {payload} bytes of buffers is "
                             "over the limits")
        rest = _read_exactly(sock, 8 * count + size + _TAG, deadline)
        body, body_tag = memoryview(rest)[:-_TAG], bytes(rest[-_TAG:])
        if not hmac.compare_digest(self._tag(self._in, b"b", head_tag, body), body_tag):
            raise FrameError("a frame whose body's tag does not match (altered)")
        lengths = struct.unpack(f"!{count}Q", body[:8 * count]) if count else ()
        if sum(lengths) != payload:
            raise FrameError("a frame whose buffers do not add up to its head's count")
        buffers = [_read_exactly(sock, n, deadline) for n in lengths]
        if deadline is not None:
            sock.settimeout(None)  # back to blocking, with the kernel's timeouts
        self._received += 1
        self.verified = True
        try:
            return _Unpickler(io.BytesIO(body[8 * count:]), buffers=buffers).load()
        except Exception as exc:  # a forbidden global, or a pickle that does not load
            raise FrameError(f"a frame that does not load: {exc}") from None


def _peer(address) -> str:
    try:
        host, port = address[0], address[1]
    except (TypeError, IndexError):
        return str(address)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


# ---- addresses ----------------------------------------------------------------------------------------------------
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



# ---- the two ends -------------------------------------------------------------------------------------------------
class Listener:
    """A door: serves calls on a TCP port at `host`, for peers that hold `key` (the job's secret). Each connection
    is read by a thread of its own; each request runs on a pool of threads and is answered on its connection."""

    channel = Channel

    def __init__(self, host: str, key: bytes, threads: int = 16):
        if not key:
            raise ValueError("a door needs the job's secret (SINGA_SECRET) to tell the job's processes from others")
        self._key = bytes(key)
        self._sock = socket.create_server((host, 0), backlog=64)
        self.port = self._sock.getsockname()[1]
        self.address = _peer((host, self.port))
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="singa-door")
        self._closed = False
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._unverified = 0
        threading.Thread(target=self._accept, name="singa-door-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, peer = self._sock.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM) and not self._closed:
                    time.sleep(POLL_S)  # out of descriptors for now: the connections in hand end in bounded time
                    continue
                return
            with self._lock:
                crowded = self._unverified >= MAX_UNVERIFIED
                if not crowded:
                    self._unverified += 1
                    self._connections.add(conn)
            if crowded:
                log.warning("door %s: closed the connection from %s: %d others are still to prove they belong to "
                            "the job", self.address, _peer(peer), MAX_UNVERIFIED)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), name="singa-door-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        verified = False
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = self.channel(conn, self._key, "server", GREETING_S)
            deadline = time.monotonic() + GREETING_S
            while True:
                message = channel.receive(None if verified else deadline)
                if not verified:
                    verified = True
                    with self._lock:
                        self._unverified -= 1
                if not (isinstance(message, tuple) and len(message) == 4 and message[0] == "call"
                        and isinstance(message[1], int) and isinstance(message[2], str)
                        and isinstance(message[3], tuple)):
                    raise FrameError("a frame that is no call")
                _, call_id, name, args = message
                self._pool.submit(self._run, channel, call_id, name, args)
        except Exception as exc:
            if not self._closed:
                if not verified or isinstance(exc, FrameError):
                    log.warning("door %s: dropped the connection from %s: %s", self.address, _peer(peer), exc)
                else:  # a caller of the job went away
                    log.debug("door %s: the connection from %s ended: %s", self.address, _peer(peer), exc)
        finally:
            with self._lock:
                if not verified:
                    self._unverified -= 1
                self._connections.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _run(self, channel: Channel, call_id: int, name: str, args: tuple) -> None:
        def answer(kind, value):
            try:
                channel.send((kind, call_id, value))
            except Exception as exc:
                if kind == "ok":  # an answer that cannot be pickled: say so rather than leave the caller waiting
                    try:
                        channel.send(("err", call_id, f"the answer could not be sent: {exc!r}"))
                    except Exception:
                        pass
        fn = HANDLERS.get(name)
        if fn is None:
            answer("err", f"{name} is no handler of this door (see singa_dist.ps.sockets.handler)")
            return
        try:
            result = fn(*args)
        except BaseException as exc:
            answer("err", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            return
        if isinstance(result, torch.futures.Future):
            def done(future):
                try:
                    value = future.value()
                except BaseException as exc:
                    answer("err", f"{type(exc).__name__}: {exc}")
                    return
                answer("ok", value)
            result.add_done_callback(done)
        else:
            answer("ok", result)

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)


class Connection:
    """A caller's connection to one peer's door: calls return torch Futures, failed by a timeout or a closed
    connection."""

    channel = Channel

    def __init__(self, address: tuple[str, int], peer: str, connect_timeout: float, key: bytes):
        self.peer = peer
        if not key:
            raise ValueError("a door needs the job's secret (SINGA_SECRET) to tell the job's processes from others")
        sock = socket.create_connection(address, timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._channel = self.channel(sock, bytes(key), "client", connect_timeout)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, (OSError, FrameError)):
                raise ConnectionError(f"{peer} at {_peer(address)} did not open a door: {exc}") from None
            raise
        self._sock = sock
        self._pending: dict[int, tuple[torch.futures.Future, float]] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count()
        self.broken: BaseException | None = None
        threading.Thread(target=self._read, name=f"singa-door-{peer}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"singa-door-timer-{peer}", daemon=True).start()

    def call(self, fn, args: tuple, timeout: float) -> torch.futures.Future:
        """Run handler `fn(*args)` at the peer (fn marked with `handler` there)."""
        future = torch.futures.Future()
        if self.broken is not None:
            future.set_exception(ConnectionError(f"the connection to {self.peer} closed: {self.broken}"))
            return future
        call_id = next(self._ids)
        with self._pending_lock:
            self._pending[call_id] = (future, time.monotonic() + timeout)
        try:
            self._channel.send(("call", call_id, handler_name(fn), tuple(args)))
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
                message = self._channel.receive()
                if not (isinstance(message, tuple) and len(message) == 3 and message[0] in ("ok", "err")
                        and isinstance(message[1], int)):
                    raise FrameError("a frame that is no answer")
                kind, call_id, value = message
                if kind == "ok":
                    self._finish(call_id, value)
                else:
                    self._finish(call_id, exception=RemoteError(f"raised on {self.peer}: {value}"))
        except Exception as exc:
            if isinstance(exc, FrameError):
                log.warning("the door of %s: dropped the connection: %s", self.peer, exc)
            elif not self._channel.verified and self._pending:
                # (A door drops a caller whose frames fail its checks, with a warning on its side.)
                exc = ConnectionError(f"{exc}, before any answer: is the job's SINGA_SECRET the same there?")
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
