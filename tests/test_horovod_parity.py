"""horovod.torch's calls and behaviours, on 2 and 3 ranks, against references computed from every rank's inputs.

Every rank makes its inputs from a seed of its own, so that each rank can also make every other rank's inputs and
compute the expected result itself (in float64, with Horovod's integer rules). Error cases check that every rank
raises the same exception type, within seconds, and that the job goes on working afterwards.
"""
import time
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist.horovod as hvd
from tests.conftest import get_world

REDUCE_DTYPES = [torch.int32, torch.int64, torch.float16, torch.float32, torch.float64]
EXTRA_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.bool]
MOVE_DTYPES = REDUCE_DTYPES + EXTRA_DTYPES
SHAPES = [(5,), (3, 4), (2, 3, 2)]


@pytest.fixture(params=[2, 3], ids=["2 ranks", "3 ranks"])
def world(request):
    return get_world(request.param)


def _input(rank: int, dtype, shape, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + salt)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.uint8,):
        return torch.randint(0, 4, shape, generator=g).to(dtype)
    if not dtype.is_floating_point:
        return torch.randint(-3, 4, shape, generator=g).to(dtype)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)  # in [0.5, 2.5): Product stays small


def _scaled(x: torch.Tensor, factor: float, dtype) -> torch.Tensor:
    """Horovod's scaling: floating values in float64 here (the result is compared with a tolerance), integers
    multiplied in float64 and truncated toward zero."""
    y = x.double() * factor
    return y if dtype.is_floating_point else torch.trunc(y)


def _reference(op: str, inputs, dtype, pre: float = 1.0, post: float = 1.0) -> torch.Tensor:
    xs = [_scaled(x.double(), pre, dtype) for x in inputs]
    stack = torch.stack(xs)
    if op in ("Sum", "Average"):
        out = stack.sum(0)
        return _scaled(out, post / (len(inputs) if op == "Average" else 1), dtype)
    out = {"Min": stack.amin(0), "Max": stack.amax(0), "Product": stack.prod(0)}[op]
    return _scaled(out, post, dtype)


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> bool:
    if got.dtype != dtype or got.shape != want.shape:
        return False
    if dtype == torch.bool:
        return torch.equal(got, want != 0)
    if not dtype.is_floating_point:
        return torch.equal(got.long(), want.long())
    tol = {torch.float16: 2e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    return torch.allclose(got.double(), want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------------------
# allreduce: every op, dtype and rank of dimension, scale factors, in-place, async and grouped forms

def allreduce_sweep():
    r, n = hvd.rank(), hvd.size()
    bad = []
    salt = 0
    for dtype in REDUCE_DTYPES + EXTRA_DTYPES:
        ops = ["Sum", "Min", "Max"] if dtype == torch.bool else ["Sum", "Average", "Min", "Max", "Product"]
        for shape in SHAPES:
            for op in ops:
                for pre, post in ((1.0, 1.0), (1.5, 0.5)) if op in ("Sum", "Average") and dtype != torch.bool \
                        else ((1.0, 1.0),):
                    salt += 1
                    inputs = [_input(k, dtype, shape, salt) for k in range(n)]
                    want = _reference(op, inputs, dtype, pre, post)
                    if dtype == torch.bool:
                        want = {"Sum": want, "Min": want, "Max": want}[op]
                    got = hvd.allreduce(inputs[r], op=getattr(hvd, op), prescale_factor=pre, postscale_factor=post,
                                        name=f"x{salt}")
                    if not _close(got, want, dtype):
                        bad.append(("allreduce", dtype, shape, op, pre, post, got, want))
                    inplace = inputs[r].clone()
                    hvd.allreduce_(inplace, op=getattr(hvd, op), prescale_factor=pre, postscale_factor=post)
                    if not _close(inplace, want, dtype):
                        bad.append(("allreduce_", dtype, shape, op, inplace, want))
    # async forms and the deprecated `average`
    x = _input(r, torch.float32, (4,), 7)
    h1 = hvd.allreduce_async(x, name="async.a")
    h2 = hvd.allreduce_async_(x.clone(), average=False, name="async.b")
    assert hvd.poll(h1) in (True, False)
    want = _reference("Average", [_input(k, torch.float32, (4,), 7) for k in range(n)], torch.float32)
    if not _close(hvd.synchronize(h1), want, torch.float32):
        bad.append("allreduce_async")
    if not _close(hvd.synchronize(h2), want * n, torch.float32):
        bad.append("allreduce_async_ average=False")
    # grouped: mixed dtypes and shapes, one negotiation
    group = [_input(r, dt, sh, 50 + i) for i, (dt, sh) in enumerate(zip(REDUCE_DTYPES, SHAPES * 2))]
    outs = hvd.grouped_allreduce(group, op=hvd.Sum, name="grouped")
    for i, (dt, sh) in enumerate(zip(REDUCE_DTYPES, SHAPES * 2)):
        if not _close(outs[i], _reference("Sum", [_input(k, dt, sh, 50 + i) for k in range(n)], dt), dt):
            bad.append(("grouped_allreduce", dt, sh))
    copies = [t.clone() for t in group]
    returned = hvd.grouped_allreduce_(copies, op=hvd.Sum)
    if not all(a is b for a, b in zip(returned, copies)) or any(not torch.equal(a, b) for a, b in zip(copies, outs)):
        bad.append("grouped_allreduce_")
    handle = hvd.grouped_allreduce_async(group, op=hvd.Max)
    if len(hvd.synchronize(handle)) != len(group):
        bad.append("grouped_allreduce_async")
    return bad


def test_allreduce_every_op_dtype_and_rank_of_dimension(world):
    for bad in world.run(allreduce_sweep, timeout=240):
        assert not bad, bad[:3]


def allreduce_gradients():
    r, n = hvd.rank(), hvd.size()
    x = torch.full((3,), float(r + 1), requires_grad=True)
    y = hvd.allreduce(x, op=hvd.Sum)
    (y * torch.arange(3.0)).sum().backward()
    xs = [torch.full((2, 2), float(k + 1), requires_grad=True) for k in range(2)]
    outs = hvd.grouped_allreduce([xs[0], xs[1] * (r + 1)], op=hvd.Average)
    (outs[0].sum() + 2 * outs[1].sum()).backward()
    return x.grad.tolist(), xs[0].grad.tolist(), xs[1].grad.tolist(), n


def test_allreduce_gradients_are_allreduced(world):
    for rank, (x_grad, g0, g1, n) in enumerate(world.run(allreduce_gradients, timeout=60)):
        assert x_grad == [0.0, float(n), 2.0 * n]  # the gradient is reduced with the same op (Sum)
        assert g0 == [[1.0, 1.0], [1.0, 1.0]]  # Average of ones
        assert g1 == [[2.0 * (rank + 1)] * 2] * 2  # Average of twos, times this rank's factor


# --------------------------------------------------------------------------------------------------------------
# allgather, broadcast, alltoall, reducescatter

def movement_sweep():
    r, n = hvd.rank(), hvd.size()
    bad = []
    salt = 0
    for dtype in MOVE_DTYPES:
        for shape in SHAPES:
            salt += 1
            # allgather: rank k sends k + 1 rows
            inputs = [_input(k, dtype, (k + 1, *shape[1:]), salt) for k in range(n)]
            got = hvd.allgather(inputs[r])
            if not torch.equal(got, torch.cat(inputs)):
                bad.append(("allgather", dtype, shape))
            if not torch.equal(hvd.synchronize(hvd.allgather_async(inputs[r])), torch.cat(inputs)):
                bad.append(("allgather_async", dtype, shape))
            # broadcast from every root
            for root in range(n):
                mine = _input(r, dtype, shape, salt + 100 * root)
                want = _input(root, dtype, shape, salt + 100 * root)
                if not torch.equal(hvd.broadcast(mine, root), want):
                    bad.append(("broadcast", dtype, shape, root))
                copy = mine.clone()
                if hvd.broadcast_(copy, root) is not copy or not torch.equal(copy, want):
                    bad.append(("broadcast_", dtype, shape, root))
                if not torch.equal(hvd.synchronize(hvd.broadcast_async(mine, root)), want):
                    bad.append(("broadcast_async", dtype, shape, root))
            # alltoall: rank k sends (j + k) % 3 rows to rank j
            rows = [[(j + k) % 3 for j in range(n)] for k in range(n)]
            sends = [_input(k, dtype, (sum(rows[k]), *shape[1:]), salt + 7) for k in range(n)]
            out, received = hvd.alltoall(sends[r], splits=rows[r])
            want = torch.cat([sends[k].narrow(0, sum(rows[k][:r]), rows[k][r]) for k in range(n)])
            if not torch.equal(out, want) or received.tolist() != [rows[k][r] for k in range(n)]:
                bad.append(("alltoall", dtype, shape))
            even = _input(r, dtype, (2 * n, *shape[1:]), salt + 9)
            if not torch.equal(hvd.alltoall(even),
                               torch.cat([_input(k, dtype, (2 * n, *shape[1:]), salt + 9)[2 * r:2 * r + 2]
                                          for k in range(n)])):
                bad.append(("alltoall even", dtype, shape))
    # grouped allgather, uneven and mixed
    group = [_input(r, torch.float32, (r + 1, 2), 1), _input(r, torch.int16, (2 * r, 3), 2)]
    outs = hvd.grouped_allgather(group)
    if not torch.equal(outs[0], torch.cat([_input(k, torch.float32, (k + 1, 2), 1) for k in range(n)])) or \
            not torch.equal(outs[1], torch.cat([_input(k, torch.int16, (2 * k, 3), 2) for k in range(n)])):
        bad.append("grouped_allgather")
    return bad


def test_allgather_broadcast_alltoall_every_dtype(world):
    for bad in world.run(movement_sweep, timeout=240):
        assert not bad, bad[:3]


def reducescatter_sweep():
    r, n = hvd.rank(), hvd.size()
    bad = []
    salt = 0
    for dtype in REDUCE_DTYPES:
        for shape in [(7,), (5, 3), (4, 2, 2)]:
            for op in ("Sum", "Average"):
                for pre, post in ((1.0, 1.0), (2.0, 0.5)):
                    salt += 1
                    inputs = [_input(k, dtype, shape, salt) for k in range(n)]
                    full = _reference(op, inputs, dtype, pre, post)
                    sizes = [shape[0] // n + (1 if k < shape[0] % n else 0) for k in range(n)]  # lowest ranks more
                    want = full.narrow(0, sum(sizes[:r]), sizes[r])
                    got = hvd.reducescatter(inputs[r], op=getattr(hvd, op), prescale_factor=pre,
                                            postscale_factor=post)
                    if not _close(got, want, dtype):
                        bad.append(("reducescatter", dtype, shape, op, pre, got, want))
                    got = hvd.synchronize(hvd.reducescatter_async(inputs[r], op=getattr(hvd, op),
                                                                  prescale_factor=pre, postscale_factor=post))
                    if not _close(got, want, dtype):
                        bad.append(("reducescatter_async", dtype, shape, op))
    group = [_input(r, torch.float32, (5, 2), 1), _input(r, torch.float64, (4,), 2)]
    outs = hvd.grouped_reducescatter(group, op=hvd.Sum)
    for i, (dt, sh) in enumerate([(torch.float32, (5, 2)), (torch.float64, (4,))]):
        full = _reference("Sum", [_input(k, dt, sh, i + 1) for k in range(n)], dt)
        sizes = [sh[0] // n + (1 if k < sh[0] % n else 0) for k in range(n)]
        if not _close(outs[i], full.narrow(0, sum(sizes[:r]), sizes[r]), dt):
            bad.append(("grouped_reducescatter", i))
    # gradients: Sum scales by the set size, Average does not; both gather the blocks back
    x = torch.ones(2 * n, 3, requires_grad=True)
    hvd.reducescatter(x, op=hvd.Sum).sum().backward()
    if not torch.equal(x.grad, torch.full((2 * n, 3), float(n))):
        bad.append(("reducescatter backward Sum", x.grad))
    with pytest.raises(RuntimeError, match="only supports AVERAGE and SUM"):
        hvd.reducescatter(torch.ones(2), op=hvd.Max)
    return bad


def test_reducescatter_uneven_rows_ops_and_scales(world):
    for bad in world.run(reducescatter_sweep, timeout=240):
        assert not bad, bad[:3]


def alltoall_and_allgather_gradients():
    r, n = hvd.rank(), hvd.size()
    x = torch.arange(float(n), requires_grad=True) + 10 * r
    x.retain_grad()
    out = hvd.alltoall(x)
    (out * (r + 1)).sum().backward()
    g = torch.ones(r + 1, 2, requires_grad=True)
    gathered = hvd.allgather(g)
    (gathered * torch.arange(float(gathered.shape[0])).unsqueeze(1)).sum().backward()
    return x.grad.tolist(), g.grad.tolist()


def test_alltoall_and_allgather_gradients(world):
    results = world.run(alltoall_and_allgather_gradients, timeout=60)
    n = len(results)
    for r, (x_grad, g_grad) in enumerate(results):
        assert x_grad == [float(j + 1) for j in range(n)]  # element j went to rank j, which weighed it by j + 1
        offset = sum(k + 1 for k in range(r))
        assert g_grad == [[float(offset + i)] * 2 for i in range(r + 1)]  # Horovod: the averaged gradient's slice


# --------------------------------------------------------------------------------------------------------------
# objects, barrier, join

def objects_barrier_join(steps):
    r, n = hvd.rank(), hvd.size()
    obj = hvd.broadcast_object({"from": r, "list": [1, 2]} if r == 1 else None, root_rank=1)
    objs = hvd.allgather_object(("rank", r))
    hvd.barrier()
    results = []
    for i in range(steps[r]):
        results.append(hvd.allreduce(torch.full((2,), float(r + 1)), op=hvd.Sum, name=f"step.{i}").tolist())
    last = hvd.join()
    after = hvd.allreduce(torch.ones(1), op=hvd.Sum).item()
    return obj, objs, results, last, after


def test_objects_barrier_and_join_with_0_3_and_7_steps():
    world = get_world(3)
    steps = (0, 3, 7)
    for r, (obj, objs, results, last, after) in enumerate(world.run(objects_barrier_join, steps, timeout=120)):
        assert obj == {"from": 1, "list": [1, 2]}
        assert objs == [("rank", k) for k in range(3)]
        # step i sums the ranks still running (a joined rank counts as zero)
        want = [[float(sum(k + 1 for k in range(3) if steps[k] > i))] * 2 for i in range(steps[r])]
        assert results == want
        assert last == 2  # the rank with 7 steps joined last
        assert after == 3.0  # everyone is back


def uneven_training(steps):
    """Ranks run different numbers of DistributedOptimizer steps, then join: a joined rank's gradients count as
    zeros in the others' averages (divided by the full size, as in Horovod)."""
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    for i in range(steps[r]):
        g = torch.Generator().manual_seed(100 * r + i)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(3, 4, generator=g)), torch.randn(3, 2, generator=g)).backward()
        opt.step()
    last = hvd.join()
    return [p.detach().clone() for p in model.parameters()], last


def test_join_with_distributed_optimizer_and_uneven_steps():
    world = get_world(3)
    steps = (0, 3, 7)
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    after = [[p.detach().clone() for p in model.parameters()]]  # the model after each step, in one process
    for i in range(max(steps)):
        grads = [torch.zeros_like(p) for p in model.parameters()]
        for r in range(3):
            if i < steps[r]:
                g = torch.Generator().manual_seed(100 * r + i)
                model.zero_grad()
                F.mse_loss(model(torch.randn(3, 4, generator=g)), torch.randn(3, 2, generator=g)).backward()
                grads = [a + p.grad for a, p in zip(grads, model.parameters())]
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.1 * g / 3
        after.append([p.detach().clone() for p in model.parameters()])
    for r, (params, last) in enumerate(world.run(uneven_training, steps, timeout=120)):
        assert last == 2
        for got, want in zip(params, after[steps[r]]):  # a rank's model stops where its own steps stopped
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def async_returns_at_once():
    r = hvd.rank()
    if r == 1:
        time.sleep(1.5)
    start = time.monotonic()
    handles = [hvd.allgather_async(torch.ones(r + 1), name="late.gather"),
               hvd.allreduce_async(torch.ones(2), name="late.reduce"),
               hvd.alltoall_async(torch.arange(2.0), name="late.a2a"),
               hvd.broadcast_async(torch.ones(1), 0, name="late.bcast")]
    issued = time.monotonic() - start
    values = [hvd.synchronize(h) for h in handles]
    return issued, values[0].tolist()


def test_async_calls_return_at_once(world2):
    (issued0, gathered), (issued1, _) = world2.run(async_returns_at_once, timeout=60)
    assert issued0 < 0.5, f"rank 0 waited {issued0:.2f}s for a peer in *_async calls"
    assert gathered == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------------------------
# Mismatched collectives: the same exception type on every rank, quickly, and the job goes on

def _attempt(fn):
    start = time.monotonic()
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - start
    return None, None, time.monotonic() - start


def mismatches():
    r, n = hvd.rank(), hvd.size()
    other = r == n - 1
    cases = {
        "shape": lambda: hvd.allreduce(torch.ones(20 if other else 10), name="m.shape"),
        "dtype": lambda: hvd.allreduce(torch.ones(4, dtype=torch.float64 if other else torch.float32),
                                       name="m.dtype"),
        "op": lambda: hvd.allreduce(torch.ones(4), op=hvd.Max if other else hvd.Sum, name="m.op"),
        "root": lambda: hvd.broadcast(torch.ones(3), root_rank=1 if other else 0, name="m.root"),
        "scale": lambda: hvd.allreduce(torch.ones(3), prescale_factor=2.0 if other else 1.0, name="m.scale"),
        "allgather trailing dims": lambda: hvd.allgather(torch.ones(2, 3 if other else 4), name="m.gather"),
        "kind": lambda: (hvd.allgather(torch.ones(2), name="m.kind") if other
                         else hvd.allreduce(torch.ones(2), name="m.kind")),
        "name order": lambda: [hvd.allreduce(torch.ones(2), name=nm) for nm in
                               (("m.b", "m.a") if other else ("m.a", "m.b"))],
        "duplicate name": lambda: [hvd.allreduce_async(torch.ones(2), name="m.dup") for _ in range(2)],
        "bad splits": lambda: hvd.alltoall(torch.ones(5), splits=[4] * n),
    }
    out = {}
    for name, fn in cases.items():
        out[name] = _attempt(fn)
        if name == "duplicate name":
            hvd.synchronize(hvd.allreduce_async(torch.ones(1), name="m.after"))  # the first m.dup is in flight
    # the job goes on: every rank can still reduce
    out["after"] = hvd.allreduce(torch.ones(1), op=hvd.Sum).item()
    return out


EXPECTED_ERRORS = {
    "shape": ("CollectiveMismatchError", "Mismatched tensor shapes"),
    "dtype": ("CollectiveMismatchError", "Mismatched data types"),
    "op": ("CollectiveMismatchError", "Mismatched reduction operations"),
    "root": ("CollectiveMismatchError", "Mismatched root ranks"),
    "scale": ("CollectiveMismatchError", "Mismatched prescale and/or postscale factors"),
    "allgather trailing dims": ("CollectiveMismatchError", "trailing"),
    "kind": ("CollectiveMismatchError", "different collectives"),
    "name order": ("CollectiveMismatchError", "different collectives"),
    "duplicate name": ("ValueError", "same name as another tensor"),
    "bad splits": ("ValueError", "Sum of splits entries is greater"),
}


def test_mismatched_collectives_raise_on_every_rank(world):
    results = world.run(mismatches, timeout=120)
    n = len(results)
    for case, (kind, text) in EXPECTED_ERRORS.items():
        for r, out in enumerate(results):
            got_kind, message, seconds = out[case]
            assert got_kind == kind, (case, r, got_kind, message)
            assert text in message, (case, r, message)
            assert seconds < 10, (case, r, seconds)
            if kind == "CollectiveMismatchError":
                assert message.startswith(f"rank {r}: ") and f"rank{'s' if n > 2 else ''} " in message
    assert [out["after"] for out in results] == [float(n)] * n
    assert issubclass(hvd.CollectiveMismatchError if hasattr(hvd, "CollectiveMismatchError")
                      else __import__("singa_dist").CollectiveMismatchError, hvd.HorovodInternalError)


# --------------------------------------------------------------------------------------------------------------
# Process sets

def process_sets():
    r, n = hvd.rank(), hvd.size()
    evens = hvd.add_process_set([k for k in range(n) if k % 2 == 0])
    tail = hvd.add_process_set(hvd.ProcessSet([n - 1, n - 2]))
    out = {"ids": (evens.process_set_id, tail.process_set_id), "sizes": (evens.size(), tail.size())}
    try:
        if evens.included():
            out["evens sum"] = hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, process_set=evens).item()
            out["evens gather"] = hvd.allgather(torch.tensor([r]), process_set=evens).tolist()
            out["evens bcast"] = hvd.broadcast(torch.tensor([r]), root_rank=0, process_set=evens).item()
            out["evens rank"] = evens.rank()
            hvd.barrier(process_set=evens)
        else:
            out["outsider"] = _attempt(lambda: hvd.allreduce(torch.ones(1), process_set=evens))
        if tail.included():
            out["tail rs"] = hvd.reducescatter(torch.arange(4.0), op=hvd.Sum, process_set=tail).tolist()
            out["tail a2a"] = hvd.alltoall(torch.tensor([r, r]), process_set=tail).tolist()
            out["tail bad root"] = _attempt(lambda: hvd.broadcast(torch.ones(1), root_rank=n + 5, process_set=tail))
        out["global after"] = hvd.allreduce(torch.ones(1), op=hvd.Sum).item()
        out["duplicate"] = _attempt(lambda: hvd.add_process_set([k for k in range(n) if k % 2 == 0]))
    finally:
        out["removed"] = (hvd.remove_process_set(evens), hvd.remove_process_set(tail),
                          hvd.remove_process_set(hvd.global_process_set))
    out["unregistered"] = _attempt(lambda: hvd.allreduce(torch.ones(1), process_set=evens))
    return out


def test_process_sets(world):
    results = world.run(process_sets, timeout=120)
    n = len(results)
    evens = [k for k in range(n) if k % 2 == 0]
    for r, out in enumerate(results):
        assert out["ids"] == (1, 2) and out["sizes"] == (len(evens), 2)
        if r in evens:
            assert out["evens sum"] == float(sum(evens))
            assert out["evens gather"] == evens
            assert out["evens bcast"] == 0 and out["evens rank"] == evens.index(r)
        else:
            kind, message, _ = out["outsider"]
            assert kind == "ValueError" and f"Rank {r} is not a member of the provided process set" in message
        if r in (n - 1, n - 2):
            i = [n - 2, n - 1].index(r)
            assert out["tail rs"] == [2.0 * (2 * i), 2.0 * (2 * i + 1)]
            assert out["tail a2a"] == [n - 2, n - 1]
            assert out["tail bad root"][0] == "ValueError"
        assert out["global after"] == float(n)
        assert out["duplicate"][0] == "ValueError"
        assert out["removed"] == (True, True, False)
        assert out["unregistered"][0] == "ValueError"


def optimizer_in_a_process_set():
    r, n = hvd.rank(), hvd.size()
    pair = hvd.add_process_set([0, 1])
    try:
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.5),
                                       named_parameters=model.named_parameters(), process_set=pair)
        for i in range(3):
            opt.zero_grad()
            model(torch.full((2, 3), float(r + 1))).sum().backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]
    finally:
        hvd.remove_process_set(pair)


def test_distributed_optimizer_in_a_process_set(world3):
    p0, p1, p2 = world3.run(optimizer_in_a_process_set, timeout=60)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # averaged inside the set
    assert not all(torch.equal(a, b) for a, b in zip(p0, p2))  # rank 2 trains alone
    torch.manual_seed(0)
    alone = nn.Linear(3, 1)
    opt = torch.optim.SGD(alone.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        alone(torch.full((2, 3), 3.0)).sum().backward()
        opt.step()
    assert all(torch.allclose(a, b) for a, b in zip(p2, alone.parameters()))


# --------------------------------------------------------------------------------------------------------------
# Adasum

def adasum_values():
    r, n = hvd.rank(), hvd.size()
    inputs = [_input(k, torch.float64, (6,), 3) - 1.5 for k in range(n)]
    try:
        got = hvd.allreduce(inputs[r], op=hvd.Adasum)
    except NotImplementedError as exc:
        return "NotImplementedError", str(exc)
    return got, inputs


def _adasum_reference(vectors):
    while len(vectors) > 1:
        nxt = []
        for a, b in zip(vectors[::2], vectors[1::2]):
            dot, aa, bb = float(a @ b), float(a @ a), float(b @ b)
            nxt.append((1 - dot / (2 * aa)) * a + (1 - dot / (2 * bb)) * b)
        vectors = nxt
    return vectors[0]


def test_adasum_allreduce(world):
    results = world.run(adasum_values, timeout=60)
    if len(results) == 3:
        assert all(r == ("NotImplementedError", "Running Adasum with non-power of 2 ranks is not supported yet.")
                   for r in results)
        return
    want = _adasum_reference(results[0][1])
    for got, _ in results:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def adasum_training():
    r = hvd.rank()
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5),
                                   named_parameters=model.named_parameters(), op=hvd.Adasum)
    for i in range(3):
        g = torch.Generator().manual_seed(10 * r + i)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 3, generator=g)), torch.randn(4, 2, generator=g)).backward()
        opt.step()
    with pytest.raises(AssertionError, match="Skipping synchronization is not supported"):
        with opt.skip_synchronize():
            pass
    return [p.detach().clone() for p in model.parameters()]


def test_adasum_optimizer_combines_updates(world2):
    results = world2.run(adasum_training, timeout=60)
    # Reference: per parameter, each rank's SGD-with-momentum update on its own gradient, combined by Adasum.
    torch.manual_seed(0)
    models = [nn.Linear(3, 2) for _ in range(2)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.5) for m in models]
    for i in range(3):
        starts = [p.detach().clone() for p in models[0].parameters()]
        for r, (m, o) in enumerate(zip(models, opts)):
            g = torch.Generator().manual_seed(10 * r + i)
            o.zero_grad()
            F.mse_loss(m(torch.randn(4, 3, generator=g)), torch.randn(4, 2, generator=g)).backward()
            o.step()
        deltas = [[p.detach() - s for p, s in zip(m.parameters(), starts)] for m in models]
        with torch.no_grad():
            for j, s in enumerate(starts):
                combined = _adasum_reference([deltas[0][j].double().reshape(-1), deltas[1][j].double().reshape(-1)])
                for m in models:
                    list(m.parameters())[j].copy_(s + combined.view_as(s).float())
    for params in results:
        for got, want in zip(params, models[0].parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# DistributedOptimizer: Horovod's arguments and errors

def optimizer_arguments(variant):
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    params = list(model.parameters())
    kwargs = {"plain": {}, "predivide": {"gradient_predivide_factor": 4.0}, "groups int": {"groups": 2},
              "groups list": {"groups": [[params[0], params[3]]]}, "num_groups": {"num_groups": 3}}[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       named_parameters=model.named_parameters(), **kwargs)
    for i in range(3):
        g = torch.Generator().manual_seed(10 * r + i)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 4, generator=g)), torch.randn(4, 3, generator=g)).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("variant", ["predivide", "groups int", "groups list", "num_groups"])
def test_optimizer_arguments_change_nothing_but_how_it_travels(world2, variant):
    want = world2.run(optimizer_arguments, "plain", timeout=60)[0]
    for params in world2.run(optimizer_arguments, variant, timeout=60):
        for a, b in zip(params, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def optimizer_errors():
    model = nn.Linear(3, 2)
    out = {}
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters())
    model(torch.ones(1, 3)).sum().backward()
    out["two passes"] = _attempt(lambda: model(torch.ones(1, 3)).sum().backward())
    opt.step()  # the first pass's round completes
    model(torch.ones(1, 3)).sum().backward()
    # The reduction finished with backward() (as DDP's): zeroing the gradients races with nothing, and the
    # step then applies no gradient.
    before = [p.detach().clone() for p in model.parameters()]
    out["zero_grad"] = _attempt(opt.zero_grad)
    opt.step()
    out["zero_grad moved"] = any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    model(torch.ones(1, 3)).sum().backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out["warning"] = [str(w.message) for w in caught]
    model(torch.ones(1, 3)).sum().backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with opt.skip_synchronize():
            opt.step()
    out["no warning"] = [str(w.message) for w in caught]
    out["fraction of passes"] = _attempt(lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), backward_passes_per_step=1.5))
    out["predivide with Sum"] = _attempt(lambda: hvd.DistributedOptimizer(
        torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), op=hvd.Sum, gradient_predivide_factor=2.0))
    return out


def test_optimizer_errors_as_horovod(world2):
    for out in world2.run(optimizer_errors, timeout=60):
        kind, message, _ = out["two passes"]
        assert kind == "AssertionError" and "more than backward_passes_per_step times" in message
        assert out["zero_grad"][0] is None and out["zero_grad moved"] is False
        assert any("skip_synchronize() context after optimizer.synchronize()" in w for w in out["warning"])
        assert not any("skip_synchronize" in w for w in out["no warning"])
        assert out["fraction of passes"][0] == "ValueError"
        assert out["predivide with Sum"][0] == "ValueError"


def sparse_gradients(sparse_as_dense):
    r = hvd.rank()
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = (torch.optim.SGD if sparse_as_dense else torch.optim.SparseAdam)(emb.parameters(), lr=0.1)
    opt = hvd.DistributedOptimizer(opt, named_parameters=emb.named_parameters(), sparse_as_dense=sparse_as_dense)
    hvd.broadcast_optimizer_state(opt, root_rank=0, model=emb)
    for i in range(3):
        opt.zero_grad()
        emb(torch.tensor([[r, i, 5]])).sum().backward()
        opt.step()
    return emb.weight.detach().clone()


@pytest.mark.parametrize("sparse_as_dense", [False, True], ids=["sparse", "sparse_as_dense"])
def test_sparse_embedding_gradients(world2, sparse_as_dense):
    w0, w1 = world2.run(sparse_gradients, sparse_as_dense, timeout=60)
    assert torch.equal(w0, w1)
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = (torch.optim.SGD if sparse_as_dense else torch.optim.SparseAdam)(emb.parameters(), lr=0.1)
    emb.weight.grad = torch.zeros_like(emb.weight).to_sparse()  # the state Horovod's broadcast makes: one step
    opt.step()
    for i in range(3):
        opt.zero_grad()
        (emb(torch.tensor([[0, i, 5]])).sum() + emb(torch.tensor([[1, i, 5]])).sum()).backward()
        emb.weight.grad = emb.weight.grad / 2 if not emb.weight.grad.is_sparse else \
            torch.sparse_coo_tensor(emb.weight.grad._indices(), emb.weight.grad._values() / 2, emb.weight.shape,
                                    check_invariants=True)
        opt.step()
    torch.testing.assert_close(w0, emb.weight.detach(), rtol=1e-5, atol=1e-6)


def optimizer_state_before_any_step():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = opt.state_dict()["state"]
    return (sorted(state[0]), float(state[0]["step"]), all(p.grad is not None for p in model.parameters()),
            all(torch.equal(a, b) for a, b in zip(before, model.parameters())))


def test_broadcast_optimizer_state_makes_the_state(world2):
    for keys, step, has_grads, unchanged in world2.run(optimizer_state_before_any_step, timeout=60):
        assert keys == ["exp_avg", "exp_avg_sq", "step"] and step == 1.0 and has_grads and unchanged


# --------------------------------------------------------------------------------------------------------------
# SyncBatchNorm

def sync_batch_norm(dims):
    r, n = hvd.rank(), hvd.size()
    torch.manual_seed(0)
    bn = hvd.SyncBatchNorm(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(k + 2, 4, *dims, generator=torch.Generator().manual_seed(k)) * 3 + 1 for k in range(n)]
    x = xs[r].clone().requires_grad_()
    out = bn(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + r))
    (out * weights).sum().backward()
    bn.eval()
    evaluated = bn(xs[r]).detach()
    return out.detach(), x.grad, bn.weight.grad, bn.running_mean, bn.running_var, evaluated


@pytest.mark.parametrize("dims", [(), (3,), (2, 3)], ids=["1d", "2d", "3d"])
def test_sync_batch_norm_equals_one_process_on_the_whole_batch(world, dims):
    results = world.run(sync_batch_norm, dims, timeout=60)
    n = len(results)
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, momentum=0.3) if len(dims) < 2 else nn.BatchNorm2d(4, momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn = bn.double()
    xs = [torch.randn(k + 2, 4, *dims, generator=torch.Generator().manual_seed(k)) * 3 + 1 for k in range(n)]
    x = torch.cat(xs).double().requires_grad_()
    out = bn(x)
    weights = torch.cat([torch.randn(xs[k].shape, generator=torch.Generator().manual_seed(50 + k)) for k in range(n)])
    (out * weights.double()).sum().backward()
    rows = [0] + [sum(t.shape[0] for t in xs[:k + 1]) for k in range(n)]
    weight_grad = sum(res[2] for res in results)
    for r, (got, grad, _, running_mean, running_var, _) in enumerate(results):
        torch.testing.assert_close(got.double(), out[rows[r]:rows[r + 1]].detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad.double(), x.grad[rows[r]:rows[r + 1]], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(running_mean.double(), bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(running_var.double(), bn.running_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad.double(), bn.weight.grad, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Names, introspection, shutdown after a failure

def test_every_horovod_torch_name_exists():
    names = """init shutdown is_initialized size rank local_size local_rank cross_size cross_rank is_homogeneous
    mpi_threads_supported mpi_enabled mpi_built gloo_enabled gloo_built nccl_built ddl_built ccl_built cuda_built
    rocm_built start_timeline stop_timeline Average Sum Adasum Min Max Product Compression
    allreduce allreduce_ allreduce_async allreduce_async_ grouped_allreduce grouped_allreduce_
    grouped_allreduce_async grouped_allreduce_async_ sparse_allreduce_async allgather allgather_async
    grouped_allgather grouped_allgather_async broadcast broadcast_ broadcast_async broadcast_async_ alltoall
    alltoall_async reducescatter reducescatter_async grouped_reducescatter grouped_reducescatter_async join barrier
    poll synchronize broadcast_parameters broadcast_optimizer_state broadcast_object allgather_object
    DistributedOptimizer SyncBatchNorm ProcessSet add_process_set remove_process_set global_process_set
    HorovodInternalError HostsUpdatedInterrupt run""".split()
    missing = [n for n in names if not hasattr(hvd, n)]
    assert not missing, missing
    assert issubclass(hvd.HorovodInternalError, RuntimeError) and issubclass(hvd.HostsUpdatedInterrupt, RuntimeError)
    assert hvd.HostsUpdatedInterrupt(True).skip_sync is True
    assert isinstance(hvd.nccl_built(), int) and hvd.gloo_built() is True and hvd.ddl_built() is False


def introspection(folder):
    import os
    out = {"mpi_enabled": hvd.mpi_enabled(), "gloo_enabled": hvd.gloo_enabled(), "homogeneous": hvd.is_homogeneous()}
    out["threads"] = _attempt(hvd.mpi_threads_supported)
    out["timeline"] = _attempt(lambda: (hvd.start_timeline(os.path.join(folder, "timeline.json")),
                                        hvd.stop_timeline()))
    out["env"] = (os.environ.get("HOROVOD_RANK"), os.environ.get("HOROVOD_SIZE"))
    return out


def test_introspection_tells_the_truth(world2, tmp_path):
    for r, out in enumerate(world2.run(introspection, str(tmp_path), timeout=60)):
        assert out["mpi_enabled"] is False and out["gloo_enabled"] is True and out["homogeneous"] is True
        assert out["threads"][0] == "ValueError"  # as Horovod, when MPI is not what runs the job
        assert out["timeline"][0] is None  # recorded (tests/test_timeline.py checks what)
        assert out["env"] == (str(r), "2")


def shutdown_after_failure():
    r = hvd.rank()
    first = _attempt(lambda: hvd.allreduce(torch.ones(3 if r else 4), name="sf.bad"))
    from singa_dist import primitives
    primitives.wait_outstanding()  # what shutdown() does first: nothing is left to raise the same error again
    return first[0]


def test_shutdown_does_not_raise_a_reported_failure_again(world2):
    assert world2.run(shutdown_after_failure, timeout=60) == ["CollectiveMismatchError"] * 2


def process_sets_at_init():
    r, n = hvd.rank(), hvd.size()
    first, second = hvd.ProcessSet([0, 1]), hvd.ProcessSet(list(range(n)))
    hvd.init(process_sets=[first, second])  # the job is already joined: this registers the sets
    try:
        out = [s.process_set_id for s in (first, second)]
        if first.included():
            out.append(hvd.allreduce(torch.tensor([1.0]), op=hvd.Sum, process_set=first).item())
        out.append(hvd.allgather(torch.tensor([r]), process_set=second).tolist())
        out.append(_attempt(lambda: hvd.init(process_sets=[first]))[0])  # registered already
        return out
    finally:
        hvd.remove_process_set(first)
        hvd.remove_process_set(second)


def test_process_sets_given_to_init(world3):
    for r, out in enumerate(world3.run(process_sets_at_init, timeout=60)):
        assert out[:2] == [1, 2]
        assert out[2:-1] == ([2.0, [0, 1, 2]] if r < 2 else [[0, 1, 2]])
        assert out[-1] == "ValueError"
