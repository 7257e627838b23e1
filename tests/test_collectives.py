"""Tensor and object collectives (values and autograd), broadcast_parameters and broadcast_optimizer_state."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd


def tensor_collectives():
    r = sd.rank()
    out = {}
    x = torch.tensor([r + 1.0, 2.0 * (r + 1)], requires_grad=True)
    y = sd.allreduce(x, op=sd.Average, name="x")
    (y * (r + 1)).sum().backward()
    out["avg"], out["avg_grad"] = y.detach(), x.grad.clone()
    out["sum"] = sd.allreduce(x.detach(), op=sd.Sum)
    out["max"] = sd.allreduce(x.detach(), op=sd.Max)
    out["min"] = sd.allreduce(x.detach(), op=sd.Min)
    with pytest.warns(DeprecationWarning, match="`average` has been replaced with `op`"):  # as Horovod warns
        out["int_avg"] = sd.allreduce(torch.tensor([r * 3 + 1]), average=True)
    out["fp16"] = sd.allreduce(torch.full((4,), 0.1 * (r + 1)), compression=sd.Compression.fp16)
    out["scaled"] = sd.allreduce(torch.ones(2), op=sd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    t = torch.full((3,), float(r))
    assert sd.allreduce_(t, op=sd.Sum) is t
    out["inplace"] = t
    h = sd.allreduce_async(torch.full((2,), float(r)), op=sd.Sum)
    out["async"] = sd.synchronize(h)
    assert sd.poll(h)

    # allgather: rank r contributes r+1 rows; the gradient is averaged, then sliced
    g = torch.full((r + 1, 2), float(r), requires_grad=True)
    gathered = sd.allgather(g, name="g")
    (gathered * (r + 1)).sum().backward()
    out["gathered"], out["gather_grad"] = gathered.detach(), g.grad.clone()

    # broadcast from rank 1: the root's value; the gradient averaged and kept on the root
    b = torch.full((2,), float(r) + 10, requires_grad=True)
    got = sd.broadcast(b, root_rank=1)
    (got * (r + 1)).sum().backward()
    out["bcast"], out["bcast_grad"] = got.detach(), b.grad.clone()
    inplace = torch.full((2,), float(r))
    sd.broadcast_(inplace, root_rank=0)
    out["bcast_"] = inplace

    out["object"] = sd.broadcast_object({"from": r, "list": [r] * 2}, root_rank=1)
    out["objects"] = sd.allgather_object(("rank", r))
    sd.barrier()
    return out


def test_tensor_collectives(world3):
    n = 3
    mean = (n + 1) / 2
    results = world3.run(tensor_collectives, timeout=60)
    for r, out in enumerate(results):
        assert torch.equal(out["avg"], torch.tensor([mean, 2 * mean]))
        assert torch.equal(out["avg_grad"], torch.tensor([mean, mean]))  # allreduce of the gradients (1, 2, 3)
        assert torch.equal(out["sum"], torch.tensor([6.0, 12.0]))
        assert torch.equal(out["max"], torch.tensor([3.0, 6.0]))
        assert torch.equal(out["min"], torch.tensor([1.0, 2.0]))
        assert torch.equal(out["int_avg"], torch.tensor([(1 + 4 + 7) // 3]))
        assert torch.allclose(out["fp16"], torch.full((4,), 0.2), rtol=2**-10)
        assert torch.equal(out["scaled"], torch.full((2,), 3.0))
        assert torch.equal(out["inplace"], torch.full((3,), 3.0))
        assert torch.equal(out["async"], torch.full((2,), 3.0))
        want = torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)])
        assert torch.equal(out["gathered"], want)
        assert torch.equal(out["gather_grad"], torch.full((r + 1, 2), mean))
        assert torch.equal(out["bcast"], torch.full((2,), 11.0))
        assert torch.equal(out["bcast_grad"], torch.full((2,), mean if r == 1 else 0.0))
        assert torch.equal(out["bcast_"], torch.zeros(2))
        assert out["object"] == {"from": 1, "list": [1, 1]}
        assert out["objects"] == [("rank", k) for k in range(n)]


def test_single_process_collectives_are_identities(single_process):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = sd.allreduce(x)
    y.sum().backward()
    assert torch.equal(y, x.detach()) and torch.equal(x.grad, torch.ones(2))
    assert torch.equal(sd.allgather(torch.ones(2, 3)), torch.ones(2, 3))
    assert torch.equal(sd.broadcast(torch.ones(2), 0), torch.ones(2))
    assert sd.broadcast_object("a") == "a" and sd.allgather_object(5) == [5]
    with pytest.raises(ValueError, match="root_rank"):
        sd.broadcast(torch.ones(2), 1)


# ------------------------------------------------------------------------------------------------------------
# broadcast_parameters

def _model():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def broadcast_params():
    torch.manual_seed(100 + sd.rank())  # different on every rank
    model = _model()
    model[0].weight.data = model[0].weight.data.t().contiguous().t()  # a non-contiguous parameter
    sd.broadcast_parameters(model.state_dict(), root_rank=1)
    first = [t.clone() for t in model.state_dict().values()]
    torch.manual_seed(200 + sd.rank())
    other = _model()
    sd.broadcast_parameters(other.named_parameters(), root_rank=0)
    return first, [p.detach().clone() for p in other.parameters()]


def test_broadcast_parameters(world2):
    torch.manual_seed(101)
    root1 = list(_model().state_dict().values())
    torch.manual_seed(200)
    root0 = list(_model().parameters())
    for first, second in world2.run(broadcast_params, timeout=60):
        assert all(torch.equal(a, b) for a, b in zip(first, root1))
        assert all(torch.equal(a, b.detach()) for a, b in zip(second, root0))


# ------------------------------------------------------------------------------------------------------------
# broadcast_optimizer_state: every torch.optim optimizer but LBFGS

OPTIMIZERS = {
    "SGD": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True),
    "Adam": lambda p, lr: torch.optim.Adam(p, lr=lr, amsgrad=True),
    "AdamW": lambda p, lr: torch.optim.AdamW(p, lr=lr),
    "RMSprop": lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.5, centered=True),
    "Adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
    "Adadelta": lambda p, lr: torch.optim.Adadelta(p, lr=lr),
    "Adamax": lambda p, lr: torch.optim.Adamax(p, lr=lr),
    "NAdam": lambda p, lr: torch.optim.NAdam(p, lr=lr),
    "RAdam": lambda p, lr: torch.optim.RAdam(p, lr=lr),
    "ASGD": lambda p, lr: torch.optim.ASGD(p, lr=lr),
    "Rprop": lambda p, lr: torch.optim.Rprop(p, lr=lr),
}


def _snapshot(opt):
    sd_ = opt.state_dict()
    state = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for i, s in sd_["state"].items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd_["param_groups"]]
    return state, groups


def broadcast_states(steps_by_rank):
    """Each rank steps its optimizer a rank-dependent number of times with its own data and lr, then takes
    rank 0's state; afterwards one more step on common data must agree on every rank too."""
    r = sd.rank()
    out = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        model = _model()
        opt = make(model.parameters(), 0.01 * (r + 1))
        g = torch.Generator().manual_seed(r)
        for _ in range(steps_by_rank[r]):
            opt.zero_grad()
            F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 3, generator=g)).backward()
            opt.step()
        sd.broadcast_parameters(model.state_dict(), root_rank=0)
        sd.broadcast_optimizer_state(opt, root_rank=0)
        after = _snapshot(opt)
        g = torch.Generator().manual_seed(99)
        opt.zero_grad()
        F.mse_loss(model(torch.randn(4, 5, generator=g)), torch.randn(4, 3, generator=g)).backward()
        opt.step()
        out[name] = (after, [p.detach().clone() for p in model.parameters()])
    return out


def _assert_same(a, b, where):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype, f"{where}: dtype {a.dtype} vs {getattr(b, 'dtype', b)}"
        assert torch.equal(a, b), f"{where}: values differ"
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("steps_by_rank", [(2, 1), (2, 0), (0, 3)], ids=["both", "root_only", "other_only"])
def test_broadcast_optimizer_state(world2, steps_by_rank):
    root, other = world2.run(broadcast_states, steps_by_rank, timeout=120)
    for name in OPTIMIZERS:
        (state0, groups0), params0 = root[name]
        (state1, groups1), params1 = other[name]
        assert groups0 == groups1, name
        assert state0.keys() == state1.keys(), name
        if steps_by_rank[0] == 0:
            # As in Horovod, the root's state is made by one step on zero gradients before it travels.
            assert state1, f"{name}: the root's state must have been made"
            if "step" in state1[0] and name != "Adagrad":  # Adagrad makes its state (step 0) in __init__
                assert float(state1[0]["step"]) == 1.0, name
        for i in state0:
            assert state0[i].keys() == state1[i].keys(), name
            for k in state0[i]:
                _assert_same(state0[i][k], state1[i][k], f"{name} state[{i}][{k}]")
        for a, b in zip(params0, params1):
            assert torch.equal(a, b), f"{name}: parameters differ after the next step"


def test_broadcast_optimizer_state_rejects_lbfgs(single_process):
    with pytest.raises(ValueError, match="LBFGS"):
        sd.broadcast_optimizer_state(torch.optim.LBFGS(_model().parameters()))
