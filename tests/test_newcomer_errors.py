"""What a newcomer hits first: each mistake gets a clear error, or just works."""
import pytest
import torch

import singa_dist as sd
import singa_dist.horovod as hvd


# 1. named_parameters=model.parameters() (no names) says what is expected, as Horovod does.
@pytest.mark.parametrize("make", [sd.DistributedOptimizer, hvd.DistributedOptimizer], ids=["sd", "horovod"])
@pytest.mark.parametrize("given", ["parameters", "list", "model"])
def test_named_parameters_without_names(single_process, make, given):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    named = {"parameters": model.parameters(), "list": list(model.parameters()), "model": model}[given]
    with pytest.raises(ValueError, match=r"named_parameters should be a sequence of tuples \(name, parameter\)"):
        make(opt, named_parameters=named)
    assert type(opt) is torch.optim.SGD  # left as it was
    make(opt, named_parameters=model.named_parameters()).remove_hooks()
