"""ps.sockets: the calls of processes that joined a running job (a replacement worker group) over plain TCP."""
import collections
import logging
import os
import pickle
import re
import socket
import struct
import threading
import time

import pytest
import torch

from singa_dist.ps import sockets, transport

KEY = b"the job's secret for these tests"


@sockets.handler
def add(a, b):
    return a + b


@sockets.handler
def echo(*args):
    return args


@sockets.handler
def slow(seconds):
    time.sleep(seconds)
    return seconds


@sockets.handler
def raises():
    raise ValueError("the handler's own words")


@sockets.handler
def later(x):
    """An asynchronous handler: answered when its future completes (as the servers' push and open_table)."""
    future = torch.futures.Future()
    threading.Timer(0.05, lambda: future.set_result(x * 2)).start()
    return future


@sockets.handler
def unpicklable():
    return threading.Lock()


@pytest.fixture
def peer():
    listener = sockets.Listener("127.0.0.1", KEY)
    conn = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5, key=KEY)
    yield listener, conn
    conn.close()
    listener.close()


@pytest.mark.timeout(30)
def test_tensors_of_every_kind_arrive_equal(peer):
    _, conn = peer
    tensors = [torch.randn(300, 7), torch.randn(5, 4).to(torch.bfloat16), torch.randn(6).half(),
               torch.arange(10, dtype=torch.int64), torch.tensor([True, False, True]), torch.randn(4, 6).t(),
               torch.empty(0, 3), torch.tensor(3.5, dtype=torch.float64), torch.randn(3, requires_grad=True)]
    back = conn.call(echo, tuple(tensors), 5).wait()
    assert len(back) == len(tensors)
    for sent, got in zip(tensors, back):
        assert got.dtype == sent.dtype and got.shape == sent.shape and got.requires_grad == sent.requires_grad
        assert torch.equal(got.detach(), sent.detach())
    assert torch.equal(conn.call(add, (tensors[0], tensors[0]), 5).wait(), tensors[0] * 2)
    assert conn.call(echo, ({"a": [1, (2, "x")]}, None), 5).wait() == ({"a": [1, (2, "x")]}, None)


@pytest.mark.timeout(30)
def test_an_asynchronous_handler_answers_when_its_future_completes(peer):
    _, conn = peer
    futures = [conn.call(later, (torch.tensor([float(i)]),), 5) for i in range(20)]
    assert [f.wait().item() for f in futures] == [2.0 * i for i in range(20)]


@pytest.mark.timeout(30)
def test_failures_name_the_peer_and_say_what_happened(peer):
    listener, conn = peer
    with pytest.raises(sockets.RemoteError, match="raised on process 7: (.|\n)*ValueError: the handler's own words"):
        conn.call(raises, (), 5).wait()
    with pytest.raises(sockets.RemoteError, match="raised on process 7: the answer could not be sent"):
        conn.call(unpicklable, (), 5).wait()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="the call to process 7 timed out"):
        conn.call(slow, (3,), 0.3).wait()
    assert time.monotonic() - t0 < 2
    assert conn.call(add, (1, 2), 5).wait() == 3  # the connection still serves after a late answer is left behind
    pending = conn.call(slow, (5,), 30)
    listener.close()
    with pytest.raises(ConnectionError, match="the connection to process 7 closed"):
        pending.wait()
    with pytest.raises(ConnectionError, match="the connection to process 7 closed"):
        conn.call(add, (1, 2), 5).wait()


def test_peer_errors_from_the_sockets_read_as_torch_rpc_ones(monkeypatch):
    monkeypatch.setattr(transport, "describe", lambda proc: f"process {proc}")
    error = transport.PeerError(3, "push", sockets.RemoteError("raised on process 3: Traceback ...\nValueError: no"))
    assert "raised during push: ValueError: no" in str(error)
    assert "did not answer within 7s" in str(transport.PeerError(3, "push", TimeoutError("timed out"), 7.0))


@sockets.handler
def fails_later():
    """An asynchronous handler whose future fails (a server's push refused after a wait)."""
    future = torch.futures.Future()
    threading.Timer(0.05, lambda: future.set_exception(ValueError("refused after a wait"))).start()
    return future


def not_a_handler():
    return "ran"


@pytest.mark.timeout(30)
def test_a_failed_asynchronous_handler_answers_with_its_error(peer):
    _, conn = peer
    t0 = time.monotonic()
    with pytest.raises(sockets.RemoteError, match="raised on process 7: ValueError: refused after a wait"):
        conn.call(fails_later, (), 20).wait()
    assert time.monotonic() - t0 < 5  # answered, not left to time out
    with pytest.raises(sockets.RemoteError, match="test_ps_sockets:not_a_handler is no handler of this door"):
        conn.call(not_a_handler, (), 5).wait()
    assert conn.call(add, (2, 3), 5).wait() == 5


# ---- what strangers send -----------------------------------------------------------------------------------------
class Marker:
    """Unpickled, it would run a shell command that creates a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def _drops(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "singa_dist.ps.sockets" and "dropped" in r.getMessage()]


def _closed_by_the_door(sock, timeout: float = 5.0) -> bool:
    """The door closed this connection (its greeting may come first)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


def _old_frame(message) -> bytes:
    """A frame in the format ps.sockets had before it signed them (no greeting, no tags)."""
    body = pickle.dumps(message, protocol=5)
    return struct.pack("!IQ", 0, len(body)) + body


@pytest.mark.timeout(60)
def test_frames_without_this_jobs_signature_are_dropped_unread(peer, tmp_path, caplog):
    listener, conn = peer
    caplog.set_level(logging.WARNING, logger="singa_dist.ps.sockets")
    marker = tmp_path / "ran"
    # Signed with another secret: the door drops it at the head's tag.
    stranger = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5,
                                  key=b"another job's secret, or a guess")
    with pytest.raises(ConnectionError, match="is the job's SINGA_SECRET the same there"):
        stranger.call(echo, (Marker(marker),), 5).wait()
    stranger.close()
    # No signature at all: the frame of an unsigned protocol, and after a proper greeting a frame with empty tags.
    bare = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    bare.sendall(_old_frame(("call", 0, echo, (Marker(marker),))))
    assert _closed_by_the_door(bare)
    greeted = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    greeted.sendall(b"SINGADR1" + os.urandom(16))
    body = pickle.dumps(("call", 0, sockets.handler_name(echo), (Marker(marker),)), protocol=5)
    greeted.sendall(struct.pack("!QIQQ", 0, 0, len(body), 0) + bytes(32) + body + bytes(32))
    assert _closed_by_the_door(greeted)
    time.sleep(0.2)
    assert not marker.exists()
    drops = _drops(caplog)
    assert len(drops) == 3, drops
    assert all(re.search(rf"door 127\.0\.0\.1:{listener.port}: dropped the connection from 127\.0\.0\.1:\d+: ", d)
               for d in drops), drops
    assert "tag does not match" in drops[0] and "does not greet as a door" in drops[1] \
        and "tag does not match" in drops[2], drops
    assert conn.call(add, (1, 2), 5).wait() == 3  # the job's own connection never noticed


@pytest.mark.timeout(60)
def test_a_signed_frame_that_names_a_forbidden_global_is_refused(peer, tmp_path, caplog):
    listener, _ = peer
    caplog.set_level(logging.WARNING, logger="singa_dist.ps.sockets")
    marker = tmp_path / "ran"
    member = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5, key=KEY)
    with pytest.raises(ConnectionError, match="the connection to process 7 closed"):
        member.call(echo, (Marker(marker),), 5).wait()
    member.close()
    time.sleep(0.2)
    assert not marker.exists()
    (drop,) = _drops(caplog)
    assert re.search(r"a frame that does not load: the frame names (posix|os)\.system, which no message of "
                     r"ps\.sockets holds", drop), drop
    # What the protocol sends still loads: every global it names is allowed.
    again = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5, key=KEY)
    sent = (torch.float16, torch.Size([2]), collections.OrderedDict(a=1), {1, 2}, frozenset(), 1j, b"x",
            slice(1, 2), RuntimeError("no"), torch.empty(0), torch.ones(2).half())
    back = again.call(echo, sent, 5).wait()
    assert back[:8] == sent[:8] and str(back[8]) == "no" and torch.equal(back[-1], sent[-1])
    again.close()


@pytest.mark.timeout(60)
def test_a_replayed_or_spliced_frame_is_dropped(peer, tmp_path, caplog, monkeypatch):
    listener, _ = peer
    caplog.set_level(logging.WARNING, logger="singa_dist.ps.sockets")
    recorded = []
    real = sockets._send_all
    monkeypatch.setattr(sockets, "_send_all", lambda sock, parts: (recorded.append(b"".join(bytes(p) for p in parts)),
                                                                    real(sock, parts))[1])
    first = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5, key=KEY)
    assert first.call(add, (1, 1), 5).wait() == 2
    frame = recorded[-2]  # (the last one is the door's answer)
    monkeypatch.setattr(sockets, "_send_all", real)
    first._sock.sendall(frame)  # the same frame again on its own connection: its sequence number is spent
    assert _closed_by_the_door(first._sock)
    other = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    other.sendall(b"SINGADR1" + os.urandom(16) + frame)  # on another connection: bound to the first's greetings
    assert _closed_by_the_door(other)
    drops = _drops(caplog)
    assert len(drops) == 2 and "came where frame 1 was due" in drops[0] and "tag does not match" in drops[1], drops


@pytest.mark.timeout(60)
def test_strangers_neither_block_nor_slow_the_door(peer, caplog, monkeypatch):
    """Nothing, garbage, half a frame, a huge length, a crowd: each costs its own thread for a bounded time."""
    listener, conn = peer
    caplog.set_level(logging.WARNING, logger="singa_dist.ps.sockets")
    monkeypatch.setattr(sockets, "GREETING_S", 1.0)
    monkeypatch.setattr(sockets, "MAX_UNVERIFIED", 8)
    before = _median_call_s(conn)
    address = ("127.0.0.1", listener.port)
    silent = socket.create_connection(address)
    garbage = socket.create_connection(address)
    garbage.sendall(os.urandom(1024))
    half = socket.create_connection(address)
    half.sendall(b"SINGADR1" + os.urandom(16) + bytes(20))
    huge = socket.create_connection(address)
    huge.sendall(b"SINGADR1" + os.urandom(16) + struct.pack("!QIQQ", 0, 1 << 31, 1 << 60, 1 << 62) + bytes(32))
    crowd = [socket.create_connection(address) for _ in range(12)]  # more than MAX_UNVERIFIED at once
    during = _median_call_s(conn)
    t0 = time.monotonic()
    for sock in [silent, garbage, half, huge, *crowd]:
        assert _closed_by_the_door(sock, timeout=5.0)
        sock.close()
    assert time.monotonic() - t0 < 4.0  # within GREETING_S (and at once for the crowd beyond the limit)
    assert during < max(5 * before, 0.05), (before, during)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "still to prove they belong to the job" in messages and "does not greet as a door" in messages \
        and "still missing when the time to greet ran out" in messages and "tag does not match" in messages, messages
    fresh = sockets.Connection(address, "process 7", connect_timeout=5, key=KEY)
    assert fresh.call(add, (2, 2), 5).wait() == 4
    fresh.close()


def _median_call_s(conn, calls: int = 20) -> float:
    times = []
    for i in range(calls):
        t0 = time.perf_counter()
        assert conn.call(add, (i, 1), 5).wait() == i + 1
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.mark.timeout(60)
def test_a_member_may_idle_between_frames_but_not_inside_one(peer, caplog, monkeypatch):
    listener, _ = peer
    caplog.set_level(logging.WARNING, logger="singa_dist.ps.sockets")
    monkeypatch.setattr(sockets, "FRAME_S", 0.5)
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    channel = sockets.Channel(sock, KEY, "client", 5)
    channel.send(("call", 0, sockets.handler_name(add), (1, 2)))
    assert channel.receive() == ("ok", 0, 3)
    time.sleep(1.5)  # three times FRAME_S without a frame: a member's connection waits
    channel.send(("call", 1, sockets.handler_name(add), (2, 2)))
    assert channel.receive() == ("ok", 1, 4)
    sock.sendall(bytes(10))  # a tenth of the next frame's head, then nothing
    assert _closed_by_the_door(sock)
    (drop,) = _drops(caplog)
    assert "half a frame's head, then nothing for 0.5 s" in drop, drop
