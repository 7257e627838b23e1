"""Native RBM: CD-k and PCD gradients against float64 from the same samples, sampling statistics within
statistical bounds, free energy against its formula and against a sum over every hidden configuration."""
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import native_layers as nl
from native_layers.rbm import contrastive_divergence, sample_units
from tests.layer_checks import assert_close


def _rbm(device, visible, hidden, unit="bernoulli", seed=0, dtype=torch.float32, hidden_unit="bernoulli"):
    torch.manual_seed(seed)
    rbm = nl.RBM(visible, hidden, unit, dtype=dtype, hidden_unit=hidden_unit).to(device)
    with torch.no_grad():  # larger than the initial 0.01, so the two phases' statistics differ clearly
        for p in rbm.parameters():
            p.normal_(0.0, 0.5)
    return rbm


def _data(unit, n, visible, device, dtype=torch.float32):
    x = (torch.rand(n, visible) < 0.4).double() if unit == "bernoulli" else torch.randn(n, visible, dtype=torch.float64)
    return x.to(device=device, dtype=dtype)


def _params64(rbm):
    return [p.detach().double().cpu() for p in (rbm.weight, rbm.visible_bias, rbm.hidden_bias)]


def _cd_reference(rbm, v, vk):
    """-(<h v>_data - <h v>_model) for W, b and c in float64, from the given data and chain end."""
    w, b, c = _params64(rbm)
    v, vk = v.detach().double().cpu(), vk.detach().double().cpu()
    act = torch.sigmoid if rbm.hidden_unit == "bernoulli" else (lambda x: x)  # E[h | v]
    ph0, phk = act(v @ w.t() + c), act(vk @ w.t() + c)
    return (-(ph0.t() @ v / len(v) - phk.t() @ vk / len(vk)), -(v.mean(0) - vk.mean(0)),
            -(ph0.mean(0) - phk.mean(0)))


def _assert_grads(rbm, expected, dtype=torch.float32, before=(0.0, 0.0, 0.0)):
    for name, p, e, b in zip(("weight", "visible_bias", "hidden_bias"),
                             (rbm.weight, rbm.visible_bias, rbm.hidden_bias), expected, before):
        assert p.grad is not None and p.grad.dtype == p.dtype, name
        assert_close(p.grad, e + b, dtype, what=f"grad {name}")


@pytest.mark.parametrize("unit,hidden_unit,k", [("bernoulli", "bernoulli", 1), ("gaussian", "bernoulli", 1),
                                                ("bernoulli", "gaussian", 1), ("bernoulli", "bernoulli", 3)])
def test_cd_gradient_matches_float64_reference(layer_device, unit, hidden_unit, k):
    rbm = _rbm(layer_device, 23, 13, unit, seed=1, hidden_unit=hidden_unit)
    v = _data(unit, 37, 23, layer_device)
    vk = contrastive_divergence(rbm, v, k=k, seed=11)
    assert vk.shape == v.shape and vk.dtype == v.dtype and not torch.equal(vk, v)
    if unit == "bernoulli":
        assert set(vk.unique().tolist()) <= {0.0, 1.0}
    _assert_grads(rbm, _cd_reference(rbm, v, vk))
    # The chain is reproducible from the seed: the same seed gives the same negative phase.
    assert torch.equal(rbm.gibbs(v, k, seed=11), vk)


def test_cd_gradient_adds_to_existing_grads_and_reads_any_layout(layer_device):
    rbm = _rbm(layer_device, 19, 11, seed=2)
    v = _data("bernoulli", 19, 31, layer_device).t()[1::2]  # (15, 19), transposed, every other row
    assert not v.is_contiguous()
    before = [torch.randn(p.shape, device=layer_device) for p in rbm.parameters()]
    for p, g in zip(rbm.parameters(), before):
        p.grad = g.clone()
    fired = []
    rbm.weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    vk = contrastive_divergence(rbm, v, seed=3)
    # As backward() does: added to what .grad held, and the gradient hooks (DistributedOptimizer's) run.
    _assert_grads(rbm, _cd_reference(rbm, v, vk), before=[b.double().cpu() for b in before])
    assert len(fired) == 1 and torch.equal(fired[0], rbm.weight.grad)


@pytest.mark.parametrize("unit,hidden_unit", [("bernoulli", "bernoulli"), ("gaussian", "bernoulli"),
                                              ("bernoulli", "gaussian")])
def test_cd_gradient_is_the_free_energy_difference_gradient(unit, hidden_unit):
    """The CD update is the gradient of mean F(v_data) - mean F(v_model) with the model sample held fixed."""
    rbm = _rbm("cpu", 9, 7, unit, seed=4, dtype=torch.float64, hidden_unit=hidden_unit)
    v = _data(unit, 12, 9, "cpu", torch.float64)
    vk = contrastive_divergence(rbm, v, k=2, seed=5)
    cd = [p.grad.clone() for p in rbm.parameters()]
    rbm.zero_grad()
    (rbm.free_energy(v).mean() - rbm.free_energy(vk).mean()).backward()
    for got, want in zip(cd, (p.grad for p in rbm.parameters())):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_persistent_chain_is_updated_in_place(layer_device):
    rbm = _rbm(layer_device, 17, 10, seed=6)
    v = _data("bernoulli", 21, 17, layer_device)
    particles = _data("bernoulli", 8, 17, layer_device)  # fewer particles than samples in the batch
    start = particles.clone()
    out = contrastive_divergence(rbm, v, k=2, persistent=particles, seed=7)
    assert out is particles and not torch.equal(particles, start)
    # The chain ran from the particles (not from the data) with the given seed.
    assert torch.equal(particles, rbm.gibbs(start, 2, seed=7))
    _assert_grads(rbm, _cd_reference(rbm, v, particles))


@pytest.mark.parametrize("unit", ["bernoulli", "gaussian"])
def test_sampling_statistics_and_seeds(layer_device, unit):
    n = 1200
    means = torch.linspace(0.05, 0.95, 9) if unit == "bernoulli" else torch.linspace(-2.0, 2.0, 9)
    p = means.repeat(n, 1).to(layer_device)
    s = sample_units(p, unit, seed=21).double().cpu()
    if unit == "bernoulli":
        assert set(s.unique().tolist()) <= {0.0, 1.0}
        freq, m = s.mean(0), means.double()
        bound = 5 * torch.sqrt(m * (1 - m) / n)
        assert torch.all((freq - m).abs() < bound), f"frequencies {freq} for probabilities {m}"
    else:
        noise = s - means.double()
        assert torch.all(noise.mean(0).abs() < 5 / math.sqrt(n)), noise.mean(0)
        assert torch.all((noise.var(0) - 1).abs() < 5 * math.sqrt(2 / n)), noise.var(0)
        # normal, not uniform: about 68.3% within one standard deviation
        inside = (noise.abs() < 1).double().mean().item()
        assert abs(inside - 0.6827) < 5 * math.sqrt(0.6827 * 0.3173 / s.numel())
    # Columns are not copies of each other, and the stream is a function of the seed alone.
    assert not torch.equal(s[:, 3], s[:, 4]) and not torch.equal(s[:100, 0], s[100:200, 0])
    few = p[:40]
    again = sample_units(few, unit, seed=21)
    assert torch.equal(sample_units(few, unit, seed=21), again)
    assert not torch.equal(sample_units(few, unit, seed=22), again)
    torch.manual_seed(5)
    a = sample_units(few, unit)
    torch.manual_seed(5)
    assert torch.equal(sample_units(few, unit), a)


def test_hidden_probs_reconstruction_and_their_gradients(layer_device):
    rbm = _rbm(layer_device, 14, 9, seed=8)
    v = _data("bernoulli", 10, 14, layer_device)
    w, b, c = [p.requires_grad_() for p in _params64(rbm)]
    ph = torch.sigmoid(v.double().cpu() @ w.t() + c)
    assert_close(rbm(v), ph, what="hidden probabilities")
    recon = torch.sigmoid(ph @ w + b)
    out = rbm.reconstruct(v)
    assert_close(out, recon, what="reconstruction")
    # Differentiable, as the auto-encoder built from the RBM needs.
    F.mse_loss(out, v, reduction="sum").backward()
    F.mse_loss(recon, v.double().cpu(), reduction="sum").backward()
    for p, ref in zip((rbm.weight, rbm.visible_bias, rbm.hidden_bias), (w, b, c)):
        assert_close(p.grad, ref.grad, what="reconstruction gradient")
    probs, h = rbm.sample_hidden(v, seed=1)
    assert h.shape == (10, 9) and set(h.unique().tolist()) <= {0.0, 1.0}
    gauss = _rbm(layer_device, 14, 9, "gaussian", seed=8)
    mean, sample = gauss.sample_visible(h, seed=2)
    assert_close(mean, h.double().cpu() @ w.detach() + b.detach(), what="gaussian visible mean")
    assert sample.shape == mean.shape and not torch.equal(sample, mean)


@pytest.mark.parametrize("unit", ["bernoulli", "gaussian"])
def test_free_energy_against_formula_and_sum_over_hidden_states(layer_device, unit):
    visible, hidden = 7, 6
    rbm = _rbm(layer_device, visible, hidden, unit, seed=9)
    v = _data(unit, 5, visible, layer_device)
    w, b, c = _params64(rbm)
    v64 = v.double().cpu()
    visible_term = -(v64 @ b) if unit == "bernoulli" else 0.5 * ((v64 - b) ** 2).sum(1)
    formula = visible_term - torch.log1p(torch.exp(v64 @ w.t() + c)).sum(1)
    got = rbm.free_energy(v)
    assert got.shape == (5,)
    assert_close(got, formula, what="free energy")
    # F(v) = -log sum_h exp(-E(v, h)), E(v, h) = visible term - h.c - h W v, over all 2^hidden states.
    states = torch.tensor(list(itertools.product((0.0, 1.0), repeat=hidden)), dtype=torch.float64)
    energies = visible_term[:, None] - (states @ c)[None, :] - v64 @ w.t() @ states.t()
    assert_close(got, -torch.logsumexp(-energies, dim=1), what="free energy by enumeration")


def test_free_energy_of_gaussian_hidden_units_by_quadrature(layer_device):
    """Gaussian hidden units integrated out numerically: F(v) = -v.b - sum_j log integral exp(x_j h - h^2/2) dh."""
    rbm = _rbm(layer_device, 8, 5, seed=13, hidden_unit="gaussian")
    v = _data("bernoulli", 6, 8, layer_device)
    w, b, c = _params64(rbm)
    v64 = v.double().cpu()
    x = v64 @ w.t() + c
    h = torch.linspace(-40.0, 40.0, 200_001, dtype=torch.float64)
    log_integrals = torch.logsumexp(x[..., None] * h - 0.5 * h**2, dim=-1) + math.log(h[1] - h[0])
    assert_close(rbm.free_energy(v), -(v64 @ b) - log_integrals.sum(1), what="free energy, gaussian hidden")
    mean, sample = rbm.sample_hidden(v, seed=3)
    assert_close(mean, x, what="gaussian hidden mean")
    assert not torch.equal(sample, mean)


def test_cd_training_lowers_reconstruction_error():
    torch.manual_seed(10)
    prototypes = (torch.rand(4, 30) < 0.5).float()
    data = prototypes[torch.randint(0, 4, (256,))]
    data = torch.where(torch.rand_like(data) < 0.05, 1 - data, data)  # 5% of the pixels flipped
    rbm = nl.RBM(30, 12)
    opt = torch.optim.SGD(rbm.parameters(), lr=0.5, momentum=0.5)

    def error():
        with torch.no_grad():
            return F.mse_loss(rbm.reconstruct(data), data).item()

    first = error()
    for step in range(60):
        opt.zero_grad()
        contrastive_divergence(rbm, data[(step % 8) * 32:][:32])
        opt.step()
    assert error() < 0.5 * first, (first, error())


def test_bad_input_is_named():
    rbm = nl.RBM(6, 4)
    with pytest.raises(ValueError, match="visible_unit"):
        nl.RBM(6, 4, visible_unit="softmax")
    with pytest.raises(ValueError, match="hidden_unit"):
        nl.RBM(6, 4, hidden_unit="relu")
    with pytest.raises(ValueError, match="hidden must be a positive"):
        nl.RBM(6, 0)
    with pytest.raises(ValueError, match=r"visible units must be shaped \(batch, 6\), got \(3, 5\)"):
        contrastive_divergence(rbm, torch.rand(3, 5))
    with pytest.raises(ValueError, match="hidden units must be shaped"):
        rbm.visible_mean(torch.rand(3, 6))
    with pytest.raises(ValueError, match="k must be a positive integer"):
        contrastive_divergence(rbm, torch.rand(3, 6), k=0)
    with pytest.raises(ValueError, match="empty"):
        contrastive_divergence(rbm, torch.rand(0, 6))
    with pytest.raises(ValueError, match="persistent"):
        contrastive_divergence(rbm, torch.rand(3, 6), persistent=torch.rand(3, 7))
    with pytest.raises(TypeError, match="persistent is torch.float64"):
        contrastive_divergence(rbm, torch.rand(3, 6), persistent=torch.rand(3, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="unit must be one of"):
        sample_units(torch.rand(3), "poisson")
    assert rbm.weight.grad is None  # nothing was written by the refused calls


@pytest.mark.kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_kernels(layer_device, dtype):
    rbm = _rbm(layer_device, 16, 8, seed=12, dtype=dtype)
    v = _data("bernoulli", 24, 16, layer_device, dtype)
    vk = contrastive_divergence(rbm, v, seed=13)
    assert vk.dtype == dtype and set(vk.unique().tolist()) <= {0.0, 1.0}
    _assert_grads(rbm, _cd_reference(rbm, v, vk), dtype)
    s = sample_units(torch.full((4000,), 0.25, device=layer_device, dtype=dtype), seed=14)
    assert s.dtype == dtype and abs(s.double().mean().item() - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 4000)


_COMPILE_SM90 = """
from tests.test_kernels_compile import compile_sm90
from triton_kernels import rbm
sizes = {a: "i64" for a in ("n", "size1", "size2", "size3", *(f"s{t}{d}" for t in "po" for d in range(4)))}
for ndim in (0, 4):
    for unit in rbm.UNITS.values():
        compile_sm90(rbm._rbm_sample_kernel, dict(p_ptr="*bf16", out_ptr="*bf16", seed="i64", **sizes),
                     dict(UNIT=unit, NDIM=ndim, BLOCK=rbm.BLOCK), [], 4, 3)
print("compiled")
"""


@pytest.mark.slow
def test_sampling_kernel_compiles_for_sm90():
    """The GPU compiler (unlike the interpreter) sees the kernel's types; run outside the interpreter."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    env.pop("SINGA_FORCE_TRITON", None)
    result = subprocess.run([sys.executable, "-c", _COMPILE_SM90], cwd=root, env=env, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stdout + result.stderr
