"""A small CNN of native Conv2d/LRN/MaxPool2d/AvgPool2d and dense layers trains on the 8x8 digits."""
import os
import time

import pytest
import torch
import torch.nn as nn

import native_layers
from examples.datasets import digits
from native_layers import LRN, AvgPool2d, Conv2d, MaxPool2d


def _small_cnn(c1: int = 32, c2: int = 64) -> nn.Module:
    # cuda-convnet in miniature: conv, ReLU, LRN, pool, then conv with the fused ReLU, pool, dense classifier.
    return nn.Sequential(
        Conv2d(1, c1, 3, padding=1), nn.ReLU(), LRN(3, alpha=1e-3, beta=0.75, k=2.0), MaxPool2d(2),
        Conv2d(c1, c2, 3, padding="same", activation="relu"), AvgPool2d(2, ceil_mode=True),
        nn.Flatten(), nn.Linear(c2 * 2 * 2, 10),
    )


def test_small_cnn_trains_on_digits():
    torch.manual_seed(0)
    cpu0 = time.process_time()
    x_train, y_train, x_test, y_test = digits(image=True)
    model = native_layers.convert(_small_cnn())
    assert sum(isinstance(m, (Conv2d, LRN, MaxPool2d, AvgPool2d)) for m in model) == 5
    epochs, batch = 15, 32
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, epochs=epochs,
                                                   steps_per_epoch=-(-len(x_train) // batch))
    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            schedule.step()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    assert accuracy >= 0.97, accuracy
    assert time.process_time() - cpu0 < 60


def test_triton_path_trains_like_cpu_path(monkeypatch):
    # Two SGD steps through the Triton kernels (in the interpreter) follow the torch CPU path.
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the kernels on CPU tensors through Triton's interpreter")
    x_train, y_train, _, _ = digits(image=True)
    x, y = x_train[:8], y_train[:8]
    torch.manual_seed(1)
    models = [_small_cnn(8, 16), _small_cnn(8, 16)]
    models[1].load_state_dict(models[0].state_dict())
    losses = []
    for model, force in zip(models, ["0", "1"]):
        monkeypatch.setenv("SINGA_FORCE_TRITON", force)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for _ in range(2):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4, msg=name)
