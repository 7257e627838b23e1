"""ps.sockets: the calls of processes that joined a running job (a replacement worker group) over plain TCP."""
import threading
import time

import pytest
import torch

from singa_dist.ps import sockets, transport


def add(a, b):
    return a + b


def echo(*args):
    return args


def slow(seconds):
    time.sleep(seconds)
    return seconds


def raises():
    raise ValueError("the handler's own words")


def later(x):
    """An asynchronous handler: answered when its future completes (as the servers' push and open_table)."""
    future = torch.futures.Future()
    threading.Timer(0.05, lambda: future.set_result(x * 2)).start()
    return future


def unpicklable():
    return threading.Lock()


@pytest.fixture
def peer():
    listener = sockets.Listener("127.0.0.1")
    conn = sockets.Connection(("127.0.0.1", listener.port), "process 7", connect_timeout=5)
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
