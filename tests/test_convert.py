"""convert(model): torch.nn layers swapped for native ones, keeping weights, outputs and state_dict keys."""
import copy

import torch
import torch.nn as nn

import native_layers as nl


class _Custom(nn.Linear):
    """A user's subclass: convert() must leave it alone (it may carry behaviour the native layer lacks)."""


def _mlp():
    return nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 16),
                         nn.Sigmoid(), _Custom(16, 5))


def test_convert_mlp_same_outputs_and_gradients(layer_device):
    torch.manual_seed(20)
    ref = _mlp().to(layer_device)
    native = nl.convert(copy.deepcopy(ref))
    assert isinstance(native[0], nl.Linear) and isinstance(native[1], nl.ReLU)
    assert isinstance(native[3], nl.Tanh) and isinstance(native[5], nl.Sigmoid)
    assert type(native[6]) is _Custom
    x = torch.randn(19, 13, device=layer_device)
    target = torch.randint(0, 5, (19,), device=layer_device)
    loss_ref = nn.CrossEntropyLoss()(ref(x), target)
    loss_native = nl.convert(nn.CrossEntropyLoss())(native(x), target)
    torch.testing.assert_close(loss_native, loss_ref, atol=1e-5, rtol=1e-5)
    loss_ref.backward()
    loss_native.backward()
    for (name, p_ref), p_native in zip(ref.named_parameters(), native.parameters()):
        torch.testing.assert_close(p_native.grad, p_ref.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_convert_keeps_parameters_and_state_dicts_load_both_ways():
    torch.manual_seed(21)
    model = _mlp()
    params = list(model.parameters())
    keys = list(model.state_dict())
    nl.convert(model)
    # The same Parameter objects: an optimizer built before convert() still updates the model.
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert list(model.state_dict()) == keys
    fresh_torch = _mlp()
    fresh_torch.load_state_dict(model.state_dict())
    fresh_native = nl.convert(_mlp())
    fresh_native.load_state_dict(fresh_torch.state_dict())
    x = torch.randn(4, 13)
    torch.testing.assert_close(fresh_native(x), fresh_torch(x))


def test_convert_bare_module_and_training_mode():
    lin = nn.Linear(3, 2).eval()
    native = nl.convert(lin)
    assert isinstance(native, nl.Linear) and not native.training
    assert native.weight is lin.weight
    loss = nl.convert(nn.CrossEntropyLoss(weight=torch.ones(3), ignore_index=1, label_smoothing=0.25))
    assert isinstance(loss, nl.SoftmaxCrossEntropy)
    assert loss.ignore_index == 1 and loss.label_smoothing == 0.25 and torch.equal(loss.weight, torch.ones(3))
    relu = nl.convert(nn.ReLU(inplace=True))
    assert isinstance(relu, nl.ReLU) and relu.inplace
    drop = nl.convert(nn.Dropout(0.3).eval())
    assert isinstance(drop, nl.Dropout) and drop.p == 0.3 and not drop.training
    assert isinstance(nl.convert(nn.Softmax(dim=0)), nl.Softmax) and nl.convert(nn.Softmax(dim=0)).dim == 0
    untouched = nn.GELU()
    assert nl.convert(untouched) is untouched


def test_fuse_linear_activations_after_convert(layer_device):
    torch.manual_seed(22)
    ref = nn.Sequential(nn.Linear(7, 9), nn.ReLU(), nn.Sequential(nn.Linear(9, 9), nn.Tanh()), nn.Linear(9, 3),
                        nn.Sigmoid()).to(layer_device)
    fused = nl.fuse_linear_activations(nl.convert(copy.deepcopy(ref)))
    assert [m.activation for m in fused.modules() if isinstance(m, nl.Linear)] == ["relu", "tanh", "sigmoid"]
    assert isinstance(fused[1], nn.Identity) and list(fused.state_dict()) == list(ref.state_dict())
    x = torch.randn(5, 7, device=layer_device)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
