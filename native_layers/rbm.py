"""SINGA's restricted Boltzmann machine (its RBMVis and RBMHid layers) and its TrainOneBatch for energy
models, contrastive divergence (CD-k, or persistent CD).

An RBM has visible units v, hidden units h, a weight W (hidden x visible, nn.Linear's layout) and biases
b (visible) and c (hidden). Each layer's units are bernoulli or gaussian of unit variance. RBMHid:
p(h = 1 | v) = sigmoid(v W^T + c), or h | v ~ N(v W^T + c, 1) (SINGA's gaussian hidden units, the linear
code layer of its deep auto-encoder). RBMVis: p(v = 1 | h) = sigmoid(h W + b), or v | h ~ N(h W + b, 1).

The products run through `linear` (the matrix-multiply kernel with bias and sigmoid fused on the GPU) and
samples through `triton_kernels/rbm.py` (Philox(seed, element index)); on CPU tensors both are torch ops,
the samples drawn from a torch.Generator seeded with the same seed (a different stream from the GPU's,
reproducible within each path). Seeds come from torch's default generator unless given, so
torch.manual_seed makes runs repeatable.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import kernels, use_triton_float
from .linear import linear

UNITS = ("bernoulli", "gaussian")
_SEED_RANGE = 2**62  # a chain of k steps uses seeds seed .. seed + 2k - 1, still inside int64


def _draw_seed() -> int:
    return int(torch.randint(0, _SEED_RANGE, ()).item())


def sample_units(p: torch.Tensor, unit: str = "bernoulli", seed: int | None = None) -> torch.Tensor:
    """Samples of units given their probabilities (bernoulli) or means (gaussian, unit variance); no grad."""
    if unit not in UNITS:
        raise ValueError(f"RBM: unit must be one of {UNITS}, got {unit!r}")
    if seed is None:
        seed = _draw_seed()
    p = p.detach()
    if use_triton_float(p):
        return kernels("rbm").sample(p, seed, unit)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = p.dtype if p.dtype == torch.float64 else torch.float32
    if unit == "bernoulli":
        return (torch.rand(p.shape, generator=gen, dtype=dtype).to(p.device) < p).to(p.dtype)
    return p + torch.randn(p.shape, generator=gen, dtype=dtype).to(device=p.device, dtype=p.dtype)


class RBM(nn.Module):
    """A restricted Boltzmann machine: SINGA's RBMVis and RBMHid layers with their shared weight, each of
    "bernoulli" or "gaussian" units. `forward(v)` gives the hidden probabilities (means), so a trained RBM
    stacks like an encoder layer; train it with `contrastive_divergence`."""

    def __init__(self, visible: int, hidden: int, visible_unit: str = "bernoulli", hidden_unit: str = "bernoulli",
                 device=None, dtype=None):
        super().__init__()
        for name, n in (("visible", visible), ("hidden", hidden)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"RBM: {name} must be a positive number of units, got {n!r}")
        for name, unit in (("visible_unit", visible_unit), ("hidden_unit", hidden_unit)):
            if unit not in UNITS:
                raise ValueError(f"RBM: {name} must be one of {UNITS}, got {unit!r}")
        self.visible, self.hidden = visible, hidden
        self.visible_unit, self.hidden_unit = visible_unit, hidden_unit
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(hidden, visible, **factory))
        self.visible_bias = nn.Parameter(torch.empty(visible, **factory))
        self.hidden_bias = nn.Parameter(torch.empty(hidden, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small random weights and zero biases, as SINGA's RBM example and Hinton's practical guide start.
        nn.init.normal_(self.weight, std=0.01)
        nn.init.zeros_(self.visible_bias)
        nn.init.zeros_(self.hidden_bias)

    def _check(self, x: torch.Tensor, units: int, what: str) -> None:
        if x.dim() != 2 or x.shape[1] != units:
            raise ValueError(f"RBM: {what} units must be shaped (batch, {units}), got {tuple(x.shape)}")

    # RBMHid
    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        """E[h | v]: p(h = 1 | v) for bernoulli units, v W^T + c for gaussian ones; differentiable."""
        self._check(v, self.visible, "visible")
        act = "sigmoid" if self.hidden_unit == "bernoulli" else None
        return linear(v, self.weight, self.hidden_bias, activation=act)

    def sample_hidden(self, v: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[h | v], a sample of h: binary, or the mean plus unit-variance noise)."""
        p = self.hidden_probs(v)
        return p, sample_units(p, self.hidden_unit, seed)

    # RBMVis
    def visible_mean(self, h: torch.Tensor) -> torch.Tensor:
        """E[v | h]: p(v = 1 | h) for bernoulli units, h W + b for gaussian ones; differentiable."""
        self._check(h, self.hidden, "hidden")
        act = "sigmoid" if self.visible_unit == "bernoulli" else None
        return linear(h, self.weight.t(), self.visible_bias, activation=act)

    def sample_visible(self, h: torch.Tensor, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[v | h], a sample of v: binary, or the mean plus unit-variance noise)."""
        m = self.visible_mean(h)
        return m, sample_units(m, self.visible_unit, seed)

    def reconstruct(self, v: torch.Tensor) -> torch.Tensor:
        """The mean-field reconstruction E[v | h = E[h | v]], differentiable."""
        return self.visible_mean(self.hidden_probs(v))

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = -log sum_h exp(-E(v, h)) per sample (p(v) is proportional to exp(-F(v))), differentiable.
        With x = v W^T + c: visible term -v.b (bernoulli) or |v - b|^2 / 2 (gaussian), minus the hidden term
        sum_j softplus(x_j) (bernoulli) or sum_j (x_j^2 + log 2 pi) / 2 (gaussian, h integrated out)."""
        self._check(v, self.visible, "visible")
        x = linear(v, self.weight, self.hidden_bias)
        if self.hidden_unit == "bernoulli":
            hidden_term = F.softplus(x).sum(1)
        else:
            hidden_term = 0.5 * (x.pow(2).sum(1) + self.hidden * math.log(2 * math.pi))
        if self.visible_unit == "bernoulli":
            return -(v @ self.visible_bias) - hidden_term
        return 0.5 * (v - self.visible_bias).pow(2).sum(1) - hidden_term

    @torch.no_grad()
    def gibbs(self, v: torch.Tensor, k: int = 1, seed: int | None = None) -> torch.Tensor:
        """v after k steps of block Gibbs sampling (sample h given v, then v given h); step i draws with seeds
        seed + 2i (hidden) and seed + 2i + 1 (visible)."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"RBM: the number of Gibbs steps k must be a positive integer, got {k!r}")
        if seed is None:
            seed = _draw_seed()
        for i in range(k):
            _, h = self.sample_hidden(v, seed + 2 * i)
            _, v = self.sample_visible(h, seed + 2 * i + 1)
        return v

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.hidden_probs(v)

    def extra_repr(self) -> str:
        return (f"visible={self.visible}, hidden={self.hidden}, visible_unit={self.visible_unit!r}, "
                f"hidden_unit={self.hidden_unit!r}")


def _cd_gradients(v, ph0, vk, phk):
    """-(<v h>_data - <v h>_model) for W, c and b, each phase averaged over its own batch."""
    b0, bk = v.shape[0], vk.shape[0]
    if use_triton_float(v):
        # Both phases in one product: [-ph0 / b0 | phk / bk]^T @ [v ; vk]; the row sums of the left operand
        # (the hidden-bias gradient) come out of the same kernel.
        a = torch.cat([ph0 * (-1.0 / b0), phk * (1.0 / bk)]).t()
        grad_w, grad_c = kernels("matmul").matmul(a, torch.cat([v, vk]), bias_grad=True)
        grad_c = grad_c.to(v.dtype)
    else:
        grad_w = phk.t() @ vk / bk - ph0.t() @ v / b0
        grad_c = phk.mean(0) - ph0.mean(0)
    acc = torch.float64 if v.dtype == torch.float64 else torch.float32  # half-precision means lose digits
    grad_b = (vk.mean(0, dtype=acc) - v.mean(0, dtype=acc)).to(v.dtype)
    return grad_w, grad_b, grad_c


def contrastive_divergence(rbm: RBM, v: torch.Tensor, k: int = 1, persistent: torch.Tensor | None = None,
                           seed: int | None = None) -> torch.Tensor:
    """One CD-k step of SINGA's TrainOneBatch for RBMs: adds the gradient of the negative log-likelihood as
    contrastive divergence estimates it to the `.grad` of rbm's weight, visible_bias and hidden_bias (as
    backward() would, gradient hooks included), so that `optimizer.step()` performs the CD update:

        grad W = -(<h v>_data - <h v>_model),  grad b = -(<v>_data - <v>_model),  grad c = -(<h>_data - <h>_model)

    <.>_data averages over the batch v with h at E[h | v]; <.>_model over the chain's end v_k with h at
    E[h | v_k]. The chain starts from v (CD-k) or, with `persistent` (a (particles, visible) tensor of
    fantasy particles), from those particles, which are then replaced in place by the chain's end (PCD).
    Returns v_k (the `persistent` tensor itself for PCD)."""
    if not isinstance(rbm, RBM):
        raise TypeError(f"contrastive_divergence: rbm must be a native_layers.RBM, got {type(rbm).__name__}")
    rbm._check(v, rbm.visible, "visible")
    if v.shape[0] == 0:
        raise ValueError("contrastive_divergence: the batch v is empty")
    if persistent is not None:
        rbm._check(persistent, rbm.visible, "persistent (fantasy particle)")
        if persistent.shape[0] == 0:
            raise ValueError("contrastive_divergence: the persistent chain has no particles")
        if persistent.dtype != v.dtype or persistent.device != v.device:
            raise TypeError(f"contrastive_divergence: persistent is {persistent.dtype} on {persistent.device} but "
                            f"v is {v.dtype} on {v.device}")
    # The statistics in the parameters' dtype: under autocast the two phases' products would not chain.
    with torch.no_grad(), torch.autocast(v.device.type, enabled=False):
        v = v.detach()
        ph0 = rbm.hidden_probs(v)
        vk = rbm.gibbs(v if persistent is None else persistent, k, seed)
        if persistent is not None:
            vk = persistent.copy_(vk)
        phk = rbm.hidden_probs(vk)
        grads = _cd_gradients(v, ph0, vk, phk)
    params = [(p, g) for p, g in zip((rbm.weight, rbm.visible_bias, rbm.hidden_bias), grads) if p.requires_grad]
    if params:
        torch.autograd.backward([p for p, _ in params], [g.to(p.dtype) for p, g in params])
    return vk
