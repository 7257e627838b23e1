"""Parameter-server strategies: a lone process, bad settings, and a job started without servers."""
import pytest
import torch

import singa_dist as sd


def _steps(opt, model):
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5, generator=g)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("strategy", ["sandblaster", "downpour", "hybrid", "hogwild"])
def test_lone_process_trains_like_its_optimizer(strategy, single_process):
    torch.manual_seed(0)
    reference = torch.nn.Linear(5, 3)
    model = torch.nn.Linear(5, 3)
    model.load_state_dict(reference.state_dict())
    _steps(torch.optim.Adam(reference.parameters(), lr=0.1), reference)
    opt = sd.DistributedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model.named_parameters(),
                                  strategy=strategy)
    _steps(opt, model)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_bad_settings(single_process):
    with pytest.raises(ValueError, match="staleness"):
        sd.Downpour(staleness=0)
    with pytest.raises(ValueError, match="pull_freq"):
        sd.Downpour(pull_freq=0)
    with pytest.raises(ValueError, match="sync_freq"):
        sd.Hogwild(sync_freq=-1)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="compression must be"):
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                strategy="downpour", compression=object())


def _without_servers():
    model = torch.nn.Linear(3, 2)
    try:
        sd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
                                strategy="sandblaster")
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def test_job_without_servers_says_how_to_start_them(world2):
    for message in world2.run(_without_servers, timeout=30):
        assert "needs separate parameter-server processes" in message and "--servers" in message


@pytest.mark.gpu
def test_cuda_slices_are_staged_through_pinned_memory():
    from singa_dist.ps.client import read_slice, write_slice

    param = torch.randn(4, 6, device="cuda")
    part = read_slice(param, param, 5, 17)
    assert part.device.type == "cpu" and part.is_pinned()
    torch.testing.assert_close(part, param.reshape(-1)[5:17].cpu())
    write_slice(param, 5, 17, torch.zeros(12))
    assert param.reshape(-1)[5:17].abs().sum().item() == 0


def test_staleness_log_keeps_a_bounded_tail(monkeypatch):
    """A long run's staleness log counts every update but keeps only the last KEEP entries."""
    from singa_dist.ps.client import StalenessLog
    monkeypatch.setattr(StalenessLog, "KEEP", 4)
    log = StalenessLog()
    for stale in range(10):
        log.append(stale)
    assert len(log) == 10 and list(log) == [6, 7, 8, 9]
    assert log[7:] == [7, 8, 9] and log[0:] == [6, 7, 8, 9] and log[-2:] == [8, 9] and log[9] == 9
    with pytest.raises(IndexError, match="update 2 is not kept"):
        log[2]
