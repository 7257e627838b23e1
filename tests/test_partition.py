"""Hybrid partitioning (singa_dist.partition) equals one process: the connection layers' forward and backward
against tensors cut by hand on 2 and 3 ranks (uneven sizes), partitioned MLPs and a CNN trained with
AllReduce against one process on the whole batch, and the full state_dict round trip.

Connection layers follow SINGA's gradient semantics: a tensor every worker holds whole carries the same
(whole) gradient on every worker; Split sums the partitions' gradients into it.
"""
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import singa_dist as sd
from singa_dist.partition import (BridgeDst, BridgeSrc, Concate, Slice, Split, _BatchSizes, full_state_dict,
                                  is_feature_split, partition, split_sizes)
from tests.conftest import get_world

STEPS = 5


def _full(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _part(t, dim, sizes, r):
    return t.narrow(dim, sum(sizes[:r]), sizes[r])


def connection_layers(rows, cols):
    """Each connection layer on this rank against the whole tensors every rank can build; returns the
    names of the checks that ran."""
    torch.set_num_threads(1)
    r, n = sd.rank(), sd.size()
    X, G = _full(rows, cols, 3, seed=1), _full(rows, cols, 3, seed=2)
    Gs = [_full(rows, cols, 3, seed=10 + q) for q in range(n)]  # rank q's own upstream gradient
    rsz, csz = split_sizes(rows, n), split_sizes(cols, n)
    done = []

    # Concate: the parts gathered; backward keeps this rank's part of the (whole, shared) gradient.
    for dim, sizes in ((0, rsz), (1, csz)):
        x = _part(X, dim, sizes, r).clone().requires_grad_()
        y = Concate(dim)(x)
        torch.testing.assert_close(y, X, rtol=0, atol=0)
        y.backward(G)
        torch.testing.assert_close(x.grad, _part(G, dim, sizes, r), rtol=0, atol=0)
        done.append(f"concate{dim}")

    # Split: identity forward, the ranks' gradients summed backward.
    x = X.clone().requires_grad_()
    y = Split()(x)
    torch.testing.assert_close(y, X, rtol=0, atol=0)
    y.backward(Gs[r])
    torch.testing.assert_close(x.grad, sum(Gs), rtol=1e-12, atol=1e-12)
    done.append("split")

    # Concate then Split (what partition() puts before a feature-split layer): a reduce-scatter backward.
    x = _part(X, 0, rsz, r).clone().requires_grad_()
    Split()(Concate(0)(x)).backward(Gs[r])
    torch.testing.assert_close(x.grad, _part(sum(Gs), 0, rsz, r), rtol=1e-12, atol=1e-12)
    done.append("concate+split")

    # Slice: this rank's part; backward gathers the whole gradient on every rank.
    for dim, sizes in ((0, rsz), (1, csz)):
        x = X.clone().requires_grad_()
        y = Slice(dim)(x)
        torch.testing.assert_close(y, _part(X, dim, sizes, r), rtol=0, atol=0)
        y.backward(_part(G, dim, sizes, r))
        torch.testing.assert_close(x.grad, G, rtol=0, atol=0)
        done.append(f"slice{dim}")

    # Bridges with the batch split unlike torch.tensor_split's (the last rank gets the most rows).
    odd_rows = list(reversed(rsz))
    batch = _BatchSizes()
    x = _part(X, 0, odd_rows, r).clone().requires_grad_()
    y = BridgeSrc(batch=batch)(x)
    assert batch.sizes == odd_rows
    torch.testing.assert_close(y, _part(X, 1, csz, r), rtol=0, atol=0)
    y.backward(_part(G, 1, csz, r))
    torch.testing.assert_close(x.grad, _part(G, 0, odd_rows, r), rtol=0, atol=0)
    done.append("bridge_src")

    x = _part(X, 1, csz, r).clone().requires_grad_()
    y = BridgeDst(batch)(x)
    torch.testing.assert_close(y, _part(X, 0, odd_rows, r), rtol=0, atol=0)
    y.backward(_part(G, 0, odd_rows, r))
    torch.testing.assert_close(x.grad, _part(G, 1, csz, r), rtol=0, atol=0)
    done.append("bridge_dst")

    # Round trip through both bridges on a convolution's activations (N, C, H, W): channels split.
    x = _part(X.reshape(rows, cols, 3, 1), 0, rsz, r).clone().requires_grad_()
    mid = BridgeSrc()(x)
    assert mid.shape == (rows, csz[r], 3, 1)
    back = BridgeDst()(mid)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    back.backward(_part(G.reshape(rows, cols, 3, 1), 0, rsz, r))
    torch.testing.assert_close(x.grad, _part(G.reshape(rows, cols, 3, 1), 0, rsz, r), rtol=0, atol=0)
    done.append("bridge_round_trip")
    return done


@pytest.mark.timeout(120)
@pytest.mark.parametrize("nprocs,rows,cols", [(2, 7, 5), (3, 8, 7), (3, 4, 4)])
def test_connection_layers_match_the_whole_tensors(nprocs, rows, cols):
    results = get_world(nprocs).run(connection_layers, rows, cols, timeout=60)
    assert all(len(done) == 9 for done in results), results


# ------------------------------------------------------------------------------------------------- training

def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def make_cnn():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten())
    classifier = nn.Sequential(nn.Linear(5 * 3 * 3, 7), nn.ReLU(), nn.Linear(7, 3))
    return nn.Sequential(features, classifier)


MODELS = {"mlp": (make_mlp, (6,)), "cnn": (make_cnn, (2, 6, 6))}


def batches(shape, n=24):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(STEPS)]


def make_optimizer(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3)


def reference(kind):
    make, shape = MODELS[kind]
    model = make()
    opt = make_optimizer(model.parameters())
    for x, y in batches(shape):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.state_dict()


def train_partitioned(kind, dims):
    torch.set_num_threads(1)
    rank, size = sd.rank(), sd.size()
    make, shape = MODELS[kind]
    model = partition(make(), dims)
    opt = sd.DistributedOptimizer(make_optimizer(model.parameters()), named_parameters=model.named_parameters(),
                                  strategy=sd.AllReduce(bucket_mb=0.0002, first_bucket_mb=0.0002))
    sd.broadcast_parameters(model.state_dict(), root_rank=0)  # leaves every rank's own shards alone
    split = sorted(n for n, p in model.named_parameters() if is_feature_split(p))
    for x, y in batches(shape):
        opt.zero_grad()
        F.cross_entropy(model(x[rank::size]), y[rank::size]).backward()
        opt.step()
    return full_state_dict(model), split


MLP_DIMS = {"all_model_parallel": {}, "mixed": {"0": 0, "2": 1, "4": 0}, "first_split": {"0": 1, "2": 0, "4": 0}}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nprocs", [2, 3])
@pytest.mark.parametrize("dims", list(MLP_DIMS))
def test_partitioned_mlp_trains_as_one_process(nprocs, dims):
    expected = reference("mlp")
    for got, split in get_world(nprocs).run(train_partitioned, "mlp", MLP_DIMS[dims], timeout=120):
        assert split == sorted(f"{k}.{w}" for k, d in {"0": 1, "2": 1, "4": 1, **MLP_DIMS[dims]}.items() if d
                               for w in ("weight", "bias"))
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


CNN_DIMS = {
    # Convolutions data parallel (the default), fully-connected layers model parallel: "one weird trick".
    "conv_data_dense_model": ({}, ["1.0.bias", "1.0.weight", "1.2.bias", "1.2.weight"]),
    # The second convolution splits its output channels; its ReLU follows, Flatten returns to the batch split.
    "conv_channels_split": ({"0.3": 1, "1.2": 0}, ["0.3.bias", "0.3.weight", "1.0.bias", "1.0.weight"]),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("nprocs", [2, 3])
@pytest.mark.parametrize("dims", list(CNN_DIMS))
def test_partitioned_cnn_trains_as_one_process(nprocs, dims):
    expected = reference("cnn")
    dims, expected_split = CNN_DIMS[dims]
    for got, split in get_world(nprocs).run(train_partitioned, "cnn", dims, timeout=120):
        assert split == expected_split
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------ state_dict

def state_round_trip():
    torch.set_num_threads(1)
    original = make_cnn()
    model = partition(original)
    whole = full_state_dict(model)
    for key, value in original.state_dict().items():
        torch.testing.assert_close(whole[key], value, rtol=0, atol=0)
    # Another initialisation, then the whole model's state loaded: each rank keeps its shard of it.
    torch.manual_seed(123)
    other = partition(_reinit(make_cnn()))
    assert any(not torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    other.load_state_dict(whole)
    for (key, a), b in zip(other.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
    # Its own shards load back as they are.
    other.load_state_dict(model.state_dict())
    x = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(sd.rank()))
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
    return [tuple(v.shape) for v in model.state_dict().values()]


def _reinit(model):
    for p in model.parameters():
        nn.init.normal_(p)
    return model


@pytest.mark.timeout(120)
def test_full_state_dict_round_trip(single_process):
    shapes = get_world(3).run(state_round_trip, timeout=60)
    # 7 output features over 3 ranks: 3, 2, 2; 3 classes: one each.
    assert [s[-4][0] for s in shapes] == [3, 2, 2]
    assert [s[-2][0] for s in shapes] == [1, 1, 1]


def test_single_process_partition_is_the_model(single_process):
    model = make_cnn()
    x = torch.randn(4, 2, 6, 6)
    parted = partition(model)
    torch.testing.assert_close(parted(x), model(x))
    assert list(parted.state_dict()) == list(model.state_dict())
    assert not any(is_feature_split(p) for p in parted.parameters())


def test_partition_rejects_what_it_cannot_split(single_process):
    with pytest.raises(ValueError, match="cannot split its features"):
        partition(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), {"1": 1})
    with pytest.raises(ValueError, match="does not have"):
        partition(make_mlp(), {"7": 1})
    with pytest.raises(ValueError, match="must be 0 or 1"):
        partition(make_mlp(), {"0": 2})


def reject_in_parameter_server():
    model = partition(make_mlp())
    try:
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
                                strategy="sandblaster")
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.timeout(60)
def test_parameter_server_strategies_refuse_feature_split_parameters(single_process):
    for message in get_world(2).run(reject_in_parameter_server, timeout=30):
        assert message is not None and "feature-split parameters (0.weight, 0.bias, 2.weight" in message


def missing_in_bridge():
    if sd.rank() == 1:
        time.sleep(3600)
    BridgeSrc()(torch.ones(2, 4))


@pytest.mark.timeout(120)
def test_missing_worker_is_named_in_a_connection_layer():
    message, seconds = get_world(2, SINGA_TIMEOUT="3").run_failing(missing_in_bridge)
    assert "rank 0: rank 1 did not reach BridgeSrc of (2, 4)" in message
    assert seconds < 30
