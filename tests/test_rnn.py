"""GRU, LSTM and RNN against torch.nn's layers in float64: outputs, final states and every gradient (input,
initial states, each weight), one and several layers, both directions, batch-first both ways, packed sequences
of unequal lengths, empty batches; gradcheck of the CPU path; conversion and state_dicts both ways."""
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

import native_layers as nl
from tests.layer_checks import assert_close, kernel_launches

CELLS = {"gru": (nl.GRU, nn.GRU, {}), "lstm": (nl.LSTM, nn.LSTM, {}), "rnn_tanh": (nl.RNN, nn.RNN, {}),
         "rnn_relu": (nl.RNN, nn.RNN, {"nonlinearity": "relu"})}
I, H = 5, 7  # odd sizes


def _pair(cell, device, dtype=torch.float32, input_size=I, hidden_size=H, **kwargs):
    """A native layer on `device` and the torch layer in float64 with the same parameters."""
    native_cls, torch_cls, extra = CELLS[cell]
    ref = torch_cls(input_size, hidden_size, **extra, **kwargs).double()
    with torch.no_grad():
        for p in ref.parameters():  # away from torch's small uniform start: larger gates, larger gradients
            p.uniform_(-0.6, 0.6)
    native = native_cls(input_size, hidden_size, **extra, **kwargs)
    native.load_state_dict(ref.state_dict())  # loads converting the dtype
    return native.to(device=device, dtype=dtype), ref


def _states(out):
    return list(out) if isinstance(out, tuple) else [out]


def _compare(native, ref, x, hx, dtype=torch.float32, packed_lengths=None):
    """Runs both layers on x (and hx), backward from random gradients of every output; compares all."""
    device = next(native.parameters()).device
    xs = [x.detach().clone().to(device=device, dtype=dtype).requires_grad_(), x.detach().clone().requires_grad_()]
    hxs = [None, None] if hx is None else \
        [[h.detach().clone().to(device=device, dtype=dtype).requires_grad_() for h in hx],
         [h.detach().clone().requires_grad_() for h in hx]]
    outs = []
    for layer, xi, hi in zip((native, ref), xs, hxs):
        inp = xi if packed_lengths is None else pack_padded_sequence(xi, packed_lengths, batch_first=layer.batch_first,
                                                                     enforce_sorted=False)
        h_arg = None if hi is None else (tuple(hi) if len(hi) == 2 else hi[0])
        y, states = layer(inp, h_arg)
        if packed_lengths is not None:
            assert torch.equal(y.batch_sizes, inp.batch_sizes)
            assert torch.equal(y.unsorted_indices, inp.unsorted_indices)
            y = y.data
        outs.append([y] + _states(states))
    for a, b, what in zip(outs[0], outs[1], ("output", "h_n", "c_n")):
        assert_close(a, b, dtype, what)
    grads = [torch.randn_like(t) for t in outs[1]]
    torch.autograd.backward(outs[0], [g.to(dtype=dtype, device=device) for g in grads])
    torch.autograd.backward(outs[1], grads)
    assert_close(xs[0].grad, xs[1].grad, dtype, "grad input")
    if hx is not None:
        for a, b, what in zip(hxs[0], hxs[1], ("grad h_0", "grad c_0")):
            assert_close(a.grad, b.grad, dtype, what)
    for (name, p), q in zip(native.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, dtype, f"grad {name}")


def _initial(ref, batch):
    D, hidden = 2 if ref.bidirectional else 1, ref.hidden_size
    h = [torch.randn(ref.num_layers * D, batch, ref.proj_size or hidden, dtype=torch.float64)]
    if isinstance(ref, nn.LSTM):
        h.append(torch.randn(ref.num_layers * D, batch, hidden, dtype=torch.float64))
    return h


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("layers,bidirectional,batch_first", [(1, False, False), (2, True, True)],
                         ids=["1-layer", "2-layer-bidirectional-batch-first"])
def test_forward_and_every_gradient_match_torch(layer_device, cell, layers, bidirectional, batch_first):
    torch.manual_seed(60)
    native, ref = _pair(cell, layer_device, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first)
    T, B = 4, 3
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    _compare(native, ref, x, _initial(ref, B))


@pytest.mark.parametrize("layers,bidirectional", [(2, False), (1, True)])
def test_lstm_projection_matches_torch(layer_device, layers, bidirectional):
    torch.manual_seed(61)
    native, ref = _pair("lstm", layer_device, num_layers=layers, bidirectional=bidirectional, proj_size=3)
    assert list(native.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, I, dtype=torch.float64)
    _compare(native, ref, x, _initial(ref, 3))


@pytest.mark.parametrize("cell,kwargs", [
    ("gru", {"num_layers": 2, "bidirectional": True}), ("lstm", {"bidirectional": True}),
    ("lstm", {"bidirectional": True, "proj_size": 4, "batch_first": True}), ("rnn_relu", {}), ("gru", {"bias": False}),
], ids=["gru-2-layer-bidirectional", "lstm-bidirectional", "lstm-proj-bidirectional-batch-first", "rnn-relu",
        "gru-no-bias"])
def test_packed_sequences_of_unequal_lengths_match_torch(layer_device, cell, kwargs):
    torch.manual_seed(62)
    native, ref = _pair(cell, layer_device, **kwargs)
    lengths = torch.tensor([3, 5, 1, 4])  # unsorted: the layers sort and unsort as torch does
    x = pad_sequence([torch.randn(n, I, dtype=torch.float64) for n in lengths], batch_first=ref.batch_first)
    _compare(native, ref, x, _initial(ref, 4), packed_lengths=lengths)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_empty_batch_and_unbatched_input(layer_device, cell):
    torch.manual_seed(63)
    native, ref = _pair(cell, layer_device, bidirectional=True)
    x = torch.randn(3, 0, I, device=layer_device, requires_grad=True)
    y, states = native(x)
    assert y.shape == (3, 0, 2 * H) and _states(states)[0].shape == (2, 0, H)
    y.sum().backward()
    assert x.grad.shape == x.shape and native.weight_ih_l0.grad.abs().sum() == 0
    # An unbatched (T, I) input with 2-d initial states
    x = torch.randn(4, I, dtype=torch.float64)
    hx = [h[:, 0] for h in _initial(ref, 1)]
    _compare(native, ref, x, hx)


@pytest.mark.kernels
@pytest.mark.parametrize("cell,dtype", [("gru", torch.bfloat16), ("lstm", torch.float16)])
def test_half_precision_kernels(layer_device, cell, dtype):
    torch.manual_seed(64)
    native, ref = _pair(cell, layer_device, dtype=dtype)
    x = torch.randn(3, 2, I, dtype=torch.float64)
    _compare(native, ref, x, _initial(ref, 2), dtype=dtype)


@pytest.mark.kernels
def test_kernels_one_launch_per_step_and_weight_gradients_in_one_product(layer_device, monkeypatch):
    from triton_kernels import matmul as mm
    from triton_kernels import rnn as k

    torch.manual_seed(65)
    native, _ = _pair("gru", layer_device)
    x = torch.randn(6, 3, I, device=layer_device, requires_grad=True)
    forward = kernel_launches(monkeypatch, k, "_step_forward_kernel")
    backward = kernel_launches(monkeypatch, k, "_step_backward_kernel")
    products = kernel_launches(monkeypatch, mm, "_matmul_kernel")
    y, h = native(x)
    assert len(forward) == 6 and len(products) == 1  # the input projection of every step in one product
    (y.sum() + h.sum()).backward()
    # dh_0 through W_hh, dx, dW_ih (with db_ih), dW_hh (with db_hh): one product each, after the steps
    assert len(backward) == 6 and len(products) == 5
    grads = [p.grad.clone() for p in native.parameters()]
    for p in native.parameters():
        p.grad = None
    y, h = native(x)
    (y.sum() + h.sum()).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, native.parameters()))  # deterministic


@pytest.mark.parametrize("cell,kwargs", [("gru", {"num_layers": 2, "bidirectional": True}),
                                         ("lstm", {"proj_size": 2}), ("rnn_tanh", {})])
def test_gradcheck_cpu_path(cell, kwargs):
    torch.manual_seed(66)
    # Small sizes: gradcheck perturbs every parameter element
    native, ref = _pair(cell, "cpu", dtype=torch.float64, input_size=2, hidden_size=3, **kwargs)
    lengths = torch.tensor([3, 1])
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = [h.requires_grad_() for h in _initial(ref, 2)]
    params = list(native.parameters())

    def run(x, *tensors):
        hx, weights = tensors[:len(h0)], tensors[len(h0):]
        with torch.nn.utils.stateless._reparametrize_module(
                native, dict(zip([n for n, _ in native.named_parameters()], weights))):
            y, states = native(pack_padded_sequence(x, lengths), hx if len(hx) == 2 else hx[0])
        return (y.data, *_states(states))

    assert torch.autograd.gradcheck(run, (x, *h0, *params), fast_mode=True)


def test_convert_state_dict_and_dropout():
    torch.manual_seed(67)
    model = nn.Sequential(nn.GRU(I, H, num_layers=2, dropout=0.5), nn.LSTM(I, H), nn.RNN(I, H, nonlinearity="relu"))
    original = model[0]
    native = nl.convert(model)
    assert [type(m) for m in native] == [nl.GRU, nl.LSTM, nl.RNN] and native[2].nonlinearity == "relu"
    gru = native[0]
    assert gru.weight_hh_l1 is original.weight_hh_l1 and gru.dropout == 0.5
    ref = nn.GRU(I, H, num_layers=2, dropout=0.5)
    ref.load_state_dict(gru.state_dict())  # native -> torch, and torch -> native
    gru2 = nl.GRU(I, H, num_layers=2, dropout=0.5)
    gru2.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, I)
    gru.eval(), ref.eval(), gru2.eval()
    torch.testing.assert_close(gru(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gru2(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)
    # Dropout between the layers in training only, repeatable from torch's seed
    gru.train()
    torch.manual_seed(1)
    y1 = gru(x)[0]
    torch.manual_seed(1)
    assert torch.equal(gru(x)[0], y1) and not torch.allclose(y1, ref(x)[0])


def test_converted_layer_shares_the_torch_parameters():
    ref = nn.LSTM(I, H, proj_size=3, bidirectional=True)
    native = nl.convert(ref)
    assert type(native) is nl.LSTM and native.proj_size == 3
    assert all(a is b for a, b in zip(native.parameters(), ref.parameters()))
    assert list(native.state_dict()) == list(ref.state_dict())


def test_bad_inputs_are_named():
    gru, lstm = nl.GRU(I, H), nl.LSTM(I, H)
    with pytest.raises(ValueError, match="input_size=5"):
        gru(torch.randn(4, 3, I + 1))
    with pytest.raises(ValueError, match="h_0 has shape"):
        gru(torch.randn(4, 3, I), torch.randn(1, 2, H))
    with pytest.raises(TypeError, match="tuple"):
        lstm(torch.randn(4, 3, I), torch.randn(1, 3, H))
    with pytest.raises(TypeError, match="dtype"):
        gru(torch.randn(4, 3, I, dtype=torch.float64))
    with pytest.raises(ValueError, match="3-d"):
        gru(torch.randn(4, 3, 2, I))


def _compile_variants(every: bool):
    """(kernel, signature, constexprs, launch options) of the step kernels as a GPU launches them: the GRU in
    float32 (TF32) with 64-row tiles, or with `every` each cell in float32 and bfloat16 with each row tile."""
    from triton_kernels import rnn

    out = []
    for dt in ("fp32", "bf16") if every else ("fp32",):
        p, f = "*" + dt, "*fp32"
        for mode in sorted(set(rnn.MODES.values())) if every else [rnn.MODES["gru"]]:
            for block_b in (64, 32, 16) if every else (64,):
                tiles = rnn.gpu_tiles(block_b)
                launch = {k: tiles.pop(k) for k in ("num_warps", "num_stages")}
                tiles.update(PRECISION="tf32", DOT_FP32=False, MODE=mode, MASKED=True)
                out.append((rnn._step_forward_kernel, dict(xw_ptr=p, hp_ptr=p, w_ptr=p, bhn_ptr=p, h_ptr=p,
                            cp_ptr=f, c_ptr=f, save_ptr=f, len_ptr="*i32"), dict(tiles, PROJ=False, HAS_BHN=True),
                            launch))
                out.append((rnn._step_backward_kernel, dict(dy_ptr=p, carry_ptr=f, dgn_ptr=p, w_ptr=p, save_ptr=f,
                            hp_ptr=p, h_ptr=p, cp_ptr=f, c_ptr=f, dc_ptr=f, dcp_ptr=f, dgx_ptr=p, dgh_ptr=p,
                            carry_out_ptr=f, len_ptr="*i32"),
                            dict(tiles, HAS_DY=True, HAS_CARRY=True, REC=True, HAS_DC=True), launch))
    return out


def main(argv) -> int:
    """Compile the step kernels for sm_90 with the GPU's launch options; fail on an error or a register spill."""
    from tests.test_kernels_compile import _ptxas_report, compile_sm90

    failures = []
    for fn, signature, constexprs, launch in _compile_variants("--every" in argv):
        compiled = compile_sm90(fn, signature, constexprs, [], launch["num_warps"], launch["num_stages"])
        registers, spilled = _ptxas_report(compiled.asm["ptx"])
        if spilled:
            failures.append(f"{fn.__name__} {constexprs}: {registers} registers, {spilled} bytes spilled")
    print("\n".join(failures) or "step kernels compiled")
    return 1 if failures else 0


def test_step_kernels_compile_for_sm90_without_spills():
    from tests.test_kernels_compile import _compile_in_subprocess

    _compile_in_subprocess(timeout=300, module="tests.test_rnn")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_every_step_kernel_compiles_for_sm90_without_spills():
    from tests.test_kernels_compile import _compile_in_subprocess

    _compile_in_subprocess("--every", timeout=1200, module="tests.test_rnn")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
