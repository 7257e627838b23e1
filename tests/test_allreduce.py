"""AllReduce equals one process on the whole batch: 2 and 3 ranks, SGD+momentum and Adam, accumulation,
unused parameters, clipping, closures, GradScaler, op=Sum, partial update.

Each rank trains on its shard of every batch; the reference is plain torch in the test process on the whole
batch (or, for unused parameters, the average of what each rank's shard gives, unused counting as zero).
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd

STEPS = 5


def make_model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 5), nn.Tanh(), nn.Linear(5, 3))


def batches(n=24, steps=STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def make_optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    raise ValueError(name)


def reference(opt_name, *, passes=1, clip=None, closure=False, scale=1.0):
    """One process on the whole batch (`passes` batches per step, summed as accumulation does)."""
    model = make_model()
    opt = make_optimizer(opt_name, model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    data = batches(steps=STEPS * passes)
    for s in range(STEPS):
        def compute():
            opt.zero_grad()
            for x, y in data[s * passes:(s + 1) * passes]:
                (F.cross_entropy(model(x), y) * scale).backward()
            return torch.tensor(0.0)
        if closure:
            opt.step(compute)
        else:
            compute()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
        sched.step()
    return [p.detach() for p in model.parameters()]


def train_distributed(opt_name, *, passes=1, clip=None, closure=False, op="average", scaler=False,
                      bucket_mb=0.0002, set_to_none=True, autocast=False):
    """Each rank on its shard; tiny buckets so that several buckets and their ordering are exercised."""
    torch.set_num_threads(1)
    rank, size = sd.rank(), sd.size()
    model = make_model()
    opt = make_optimizer(opt_name, model.parameters())
    opt = sd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                  strategy=sd.AllReduce(bucket_mb=bucket_mb, first_bucket_mb=bucket_mb),
                                  backward_passes_per_step=passes,
                                  op=sd.Sum if op == "sum" else sd.Average)
    sd.broadcast_parameters(model.state_dict(), root_rank=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaler else None
    # Under Sum the ranks' gradients add up, so each rank's loss is divided by the number of ranks.
    weight = 1.0 / size if op == "sum" else 1.0
    data = batches(steps=STEPS * passes)
    for s in range(STEPS):
        def compute():
            opt.zero_grad(set_to_none=set_to_none)
            for x, y in data[s * passes:(s + 1) * passes]:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    out = model(x[rank::size])
                loss = F.cross_entropy(out.float(), y[rank::size]) * weight
                (grad_scaler.scale(loss) if scaler else loss).backward()
            return loss
        if closure:
            opt.step(compute)
        elif scaler:
            compute()
            grad_scaler.step(opt)  # unscale_ must see the synchronised gradients
            grad_scaler.update()
        else:
            compute()
            if clip:
                opt.synchronize()
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                with opt.skip_synchronize():
                    opt.step()
            else:
                opt.step()
        sched.step()
    assert len(opt.strategy.buckets) > 1
    return [p.detach() for p in model.parameters()]


def assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want):
        rel = ((g - w).norm() / w.norm()).item()
        assert rel < tol, f"relative difference {rel:.2e}"


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_equals_single_process_2_and_3_ranks(world2, world3, opt_name):
    want = reference(opt_name)
    for world in (world2, world3):
        results = world.run(train_distributed, opt_name, timeout=120)
        for got in results:
            assert_close(got, want)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_accumulation_two_passes_equals_double_batch(world2, set_to_none):
    # set_to_none=False: backward accumulates straight into the buckets that hold last step's gradients
    want = reference("sgd", passes=2)
    for got in world2.run(train_distributed, "sgd", passes=2, set_to_none=set_to_none, timeout=120):
        assert_close(got, want)


def test_clipping_between_synchronize_and_step(world2):
    # The clip bound is small enough to change every step: clipping local gradients would differ.
    want = reference("sgd", clip=0.05)
    assert not all(torch.allclose(a, b) for a, b in zip(want, reference("sgd")))
    for got in world2.run(train_distributed, "sgd", clip=0.05, timeout=120):
        assert_close(got, want)


def test_closure_and_op_sum(world3):
    want = reference("adam", closure=True)
    for got in world3.run(train_distributed, "adam", closure=True, timeout=120):
        assert_close(got, want)
    want = reference("sgd")
    for got in world3.run(train_distributed, "sgd", op="sum", timeout=120):
        assert_close(got, want)


def test_grad_scaler_sees_synchronized_gradients(world2):
    # Scaling by a power of two is exact, so GradScaler's result equals the unscaled reference.
    want = reference("sgd")
    for got in world2.run(train_distributed, "sgd", scaler=True, timeout=120):
        assert_close(got, want)


def test_autocast_with_grad_scaler(world2):
    # bf16 matmuls: the ranks must agree exactly; against the fp32 reference only to bf16's precision
    want = reference("sgd")
    got0, got1 = world2.run(train_distributed, "sgd", scaler=True, autocast=True, timeout=120)
    assert all(torch.equal(a, b) for a, b in zip(got0, got1))
    assert_close(got0, want, tol=3e-2)
    assert not all(torch.equal(a, b) for a, b in zip(got0, want))  # bf16 really was used


# ------------------------------------------------------------------------------------------------------------
# Parameters that get no gradient on some ranks

class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 3)
        self.never = nn.Linear(8, 3)  # used by no rank at all

    def forward(self, x, use_b):
        h = torch.tanh(self.body(x))
        out = self.head_a(h)
        return out + self.head_b(h) if use_b else out


def _uses_b(rank, step):
    return rank == 0 or step % 2 == 0  # rank 1 skips head_b every other step


def train_unused():
    rank, size = sd.rank(), sd.size()
    model = TwoHeads()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  named_parameters=model.named_parameters(), strategy=sd.AllReduce(bucket_mb=0.0001))
    for s, (x, y) in enumerate(batches()):
        opt.zero_grad()
        F.cross_entropy(model(x[rank::size], _uses_b(rank, s)), y[rank::size]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


def test_unused_parameters_count_as_zero_and_do_not_deadlock(world2):
    model = TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for s, (x, y) in enumerate(batches()):
        grads = []
        for r in range(2):
            model.zero_grad()
            F.cross_entropy(model(x[r::2], _uses_b(r, s)), y[r::2]).backward()
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    want = [p.detach() for p in model.parameters()]
    for got in world2.run(train_unused, timeout=60):
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Partial update and single-process path

def train_partial(chunks, spelling="alias"):
    rank, size = sd.rank(), sd.size()
    model = make_model()
    strategy = sd.AllReduce(partial_update_chunks=chunks) if spelling == "alias" else sd.PartialUpdate(chunks)
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), strategy=strategy)
    names = [n for n, _ in model.named_parameters()]
    synced_per_step = []
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
        opt.step()
        values = sd.allgather_object([p.detach().clone() for p in model.parameters()])
        synced_per_step.append([n for n, a, b in zip(names, *values) if torch.equal(a, b)])
    return synced_per_step, opt.strategy.bytes_sent_last_step


@pytest.mark.parametrize("spelling", ["alias", "class"])
def test_partial_update_averages_one_chunk_per_step(world2, spelling):
    (steps, sent), _ = world2.run(train_partial, 3, spelling, timeout=60)
    names = [n for n, _ in make_model().named_parameters()]
    assert sorted(steps[0]) == sorted(names)  # the first step averages everything
    # afterwards exactly one chunk is equal across ranks (the others moved by local gradients)
    chunks = [set(s) for s in steps[1:4]]
    assert all(0 < len(c) < len(names) for c in chunks)
    assert set().union(*chunks) == set(names) and sum(len(c) for c in chunks) == len(names)
    assert steps[4] == steps[1]  # cycling
    assert 0 < sent < sum(p.numel() * 4 for p in make_model().parameters())


def test_partial_update_is_its_own_strategy(single_process):
    from singa_dist.strategies import make

    assert isinstance(sd.AllReduce(partial_update_chunks=2), sd.PartialUpdate)
    assert sd.AllReduce(partial_update_chunks=2).partial_update_chunks == 2
    assert isinstance(make("partial_update"), sd.PartialUpdate) and make("partial_update").partial_update_chunks == 4
    assert type(sd.AllReduce()) is sd.AllReduce
    with pytest.raises(ValueError, match="bucket_mb and compression only"):
        sd.AllReduce(partial_update_chunks=2, num_buckets=3)
    with pytest.raises(ValueError, match="positive number of chunks"):
        sd.PartialUpdate(0)
    with pytest.raises(ValueError, match="0 \\(off\\) or positive"):
        sd.AllReduce(partial_update_chunks=-1)


def test_single_process_is_plain_torch(single_process):
    want = reference("adam")
    model = make_model()
    opt = sd.DistributedOptimizer(make_optimizer("adam", model.parameters()),
                                  named_parameters=model.named_parameters(), strategy="allreduce")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    for g, w in zip(model.parameters(), want):
        assert torch.equal(g.detach(), w)


def test_bad_arguments(single_process):
    model = make_model()
    with pytest.raises(ValueError, match="bucket_mb"):
        sd.AllReduce(bucket_mb=-1)
    with pytest.raises(ValueError, match="Average or sd.Sum"):
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy=sd.AllReduce(), op=sd.Max)
    with pytest.raises(ValueError, match="partial update"):
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                strategy=sd.AllReduce(partial_update_chunks=2), compression=sd.Compression.fp16)


# ------------------------------------------------------------------------------------------------------------
# One bucket of many tensors (the default bucket size), gathered in one call and scaled as a whole

def deep_model():
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(10) for m in (nn.Linear(6, 6), nn.Tanh())], nn.Linear(6, 3))


def train_deep(set_to_none):
    rank, size = sd.rank(), sd.size()
    model = deep_model()
    opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                  named_parameters=model.named_parameters())
    assert len(opt.strategy.buckets) == 1 and len(opt.strategy.buckets[0].params) == 22
    for x, y in batches():
        opt.zero_grad(set_to_none=set_to_none)
        F.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("set_to_none", [True, False])
def test_many_tensors_in_one_bucket(world3, set_to_none):
    model = deep_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    want = [p.detach() for p in model.parameters()]
    for got in world3.run(train_deep, set_to_none, timeout=60):
        assert_close(got, want)


def replicas_that_differ():
    """A model built without a common seed: warned at the first step unless broadcast_parameters() came first."""
    import warnings

    out = {}
    for broadcast in (False, True):
        torch.manual_seed(100 + sd.rank())
        model = nn.Linear(6, 3)
        opt = sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                      named_parameters=model.named_parameters())
        if broadcast:
            sd.broadcast_parameters(model.state_dict(), root_rank=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in batches(steps=2):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
        out[broadcast] = [str(w.message) for w in caught if "parameters differ" in str(w.message)]
    return out


def test_ranks_whose_parameters_differ_are_warned(world3):
    for r, out in enumerate(world3.run(replicas_that_differ)):
        assert len(out[False]) == 1 and out[False][0].startswith(f"rank {r}: "), out
        assert "broadcast_parameters" in out[False][0]
        assert out[True] == []
