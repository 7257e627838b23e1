"""A Horovod PyTorch training script runs unchanged with `import singa_dist.horovod as hvd`."""
import torch
import torch.nn as nn
import torch.nn.functional as F


def horovod_script(compression_name):
    # --- from here on, what a horovod.torch user writes (only the import differs) ---
    import singa_dist.horovod as hvd

    hvd.init()
    torch.manual_seed(hvd.rank())  # different initial weights: broadcast_parameters must fix that
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05 * hvd.size(), momentum=0.9)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    compression = getattr(hvd.Compression, compression_name)
    optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                         compression=compression, op=hvd.Average, backward_passes_per_step=1,
                                         gradient_predivide_factor=2.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)

    from examples.datasets import digits, shard
    x_train, y_train, x_test, y_test = digits()
    x, y = shard(x_train, y_train, hvd.rank(), hvd.size())

    def metric_average(value, name):
        return hvd.allreduce(torch.tensor(value), name=name).item()

    losses = []
    for epoch in range(3):
        for i in range(0, len(x) - 31, 32):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            loss.backward()
            optimizer.step()
        scheduler.step()
        losses.append(metric_average(loss.item(), "avg_loss"))
    accuracy = metric_average((model(x_test).argmax(1) == y_test).float().mean().item(), "avg_accuracy")
    handle = hvd.allreduce_async(torch.ones(1), op=hvd.Sum)
    total = hvd.synchronize(handle)
    gathered = hvd.allgather(torch.tensor([hvd.rank()]))
    obj = hvd.broadcast_object({"epoch": 3} if hvd.rank() == 0 else None, root_rank=0)
    # --- end of the Horovod script ---
    info = (hvd.size(), hvd.rank(), hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), hvd.is_initialized())
    return [p.detach() for p in model.parameters()], losses, accuracy, total.item(), gathered.tolist(), obj, info


def test_horovod_script_runs_by_changing_the_import(world2):
    results = world2.run(horovod_script, "fp16", timeout=120)
    (p0, losses0, acc0, total, gathered, obj, info0), (p1, losses1, acc1, *_rest, info1) = results
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))  # the ranks stay identical
    assert losses0 == losses1 and losses0[-1] < losses0[0]
    assert acc0 == acc1 and acc0 > 0.85  # 3 epochs: it learns
    assert total == 2.0 and gathered == [0, 1] and obj == {"epoch": 3}
    assert info0 == (2, 0, 0, 2, 0, True) and info1[:2] == (2, 1)


def test_horovod_names_exist(single_process):
    import singa_dist.horovod as hvd

    for name in ["init", "shutdown", "size", "rank", "local_rank", "local_size", "cross_rank", "cross_size",
                 "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state", "broadcast_object",
                 "allgather_object", "allreduce", "allreduce_", "allreduce_async", "allreduce_async_", "allgather",
                 "allgather_async", "broadcast", "broadcast_", "broadcast_async", "broadcast_async_", "synchronize",
                 "poll", "Compression", "Average", "Sum", "Min", "Max", "Product", "Adasum", "nccl_built",
                 "gloo_enabled", "mpi_threads_supported", "is_initialized", "global_process_set"]:
        assert hasattr(hvd, name), name
    assert hvd.Compression.none is not None and hvd.Compression.fp16 is not None
    model = nn.Linear(2, 2)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), op=hvd.Adasum)
    assert opt.strategy.name == "adasum"  # Horovod's Adasum optimizer (see test_horovod_parity.py)
