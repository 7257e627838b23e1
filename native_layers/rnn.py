"""SINGA's recurrent layers: `GRU` (SINGA's char-RNN cell), `LSTM` and vanilla `RNN` (tanh or relu).

Each module subclasses its torch.nn counterpart (same arguments, parameters, state_dict keys and gate order),
and takes the same inputs: (T, B, I), batch-first, unbatched (T, I), or a PackedSequence, with optional
initial states. Every layer and direction is one RecurrentFunction: on the Triton path its kernels
(triton_kernels/rnn.py: input projection as one product, one fused kernel per step each way, weight gradients
as one product each); on CPU tensors the same math in torch ops, differentiated by autograd. A
PackedSequence runs in padded form, each row stopping at its own length; the reverse direction reads each
sequence back from its own last step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .convert import register_conversion
from .dispatch import kernels, use_triton_float
from .dropout import dropout

_GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def _layer_torch(mode, x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
    """One layer and direction in torch ops (time-major x): (outputs, h_n, c_n)."""
    H = w_hh.shape[0] // _GATES[mode]
    # Biases that add to the gates as b_ih does go into the input projection (GRU's b_hn stays inside r * (.)).
    if b_ih is not None and mode == "gru":
        b_ih, b_hh = torch.cat([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:]]), b_hh[2 * H:]
    elif b_ih is not None:
        b_ih, b_hh = b_ih + b_hh, None
    # Every step's input projection in one product; unbind, not indexing, so that the backward stacks the
    # steps' gradients once instead of scattering each into a zero tensor of all steps.
    xw = F.linear(x, w_ih, b_ih).unbind(0)
    h, c, hs = h0, c0, []
    for t in range(x.shape[0]):
        if mode == "gru":
            xrz, xn = xw[t].split([2 * H, H], 1)
            hrz, hn = F.linear(h, w_hh).split([2 * H, H], 1)
            r, z = torch.sigmoid(xrz + hrz).chunk(2, 1)
            n = torch.tanh(xn + r * (hn + b_hh if b_hh is not None else hn))
            h_new, c_new = torch.lerp(n, h, z), None  # (1 - z) n + z h
        elif mode == "lstm":
            gates = torch.addmm(xw[t], h, w_hh.t())
            i_f, g, o = gates.split([2 * H, H, H], 1)
            i, f = torch.sigmoid(i_f).chunk(2, 1)
            c_new = torch.addcmul(f * c, i, torch.tanh(g))
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if w_hr is not None:
                h_new = F.linear(h_new, w_hr)
        else:
            pre = torch.addmm(xw[t], h, w_hh.t())
            h_new, c_new = (torch.tanh(pre) if mode == "rnn_tanh" else torch.relu(pre)), None
        if lengths is not None:  # rows whose sequence has ended keep their state
            valid = (lengths > t)[:, None]
            h_new = torch.where(valid, h_new, h)
            c_new = torch.where(valid, c_new, c) if c_new is not None else None
        h, c = h_new, c_new
        hs.append(h)
    y = torch.stack(hs) if hs else x.new_empty((0, x.shape[1], h0.shape[1]))
    return y, h, c


class RecurrentFunction(torch.autograd.Function):
    """One layer and direction on the Triton kernels: (x, h0, c0, weights) -> (outputs, h_n[, c_n])."""

    @staticmethod
    def forward(ctx, mode, x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        rnn = kernels("rnn")
        x = x.contiguous()
        hs, cs, saved, hu = rnn.rnn_forward(mode, x, lengths, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
        ctx.mode, ctx.lengths, ctx.has_bias = mode, lengths, b_ih is not None
        ctx.save_for_backward(x, hs, cs, saved, hu, w_ih, w_hh, w_hr)
        outs = (hs[1:], hs[-1].clone())
        if mode == "lstm":
            outs += (cs[-1].to(x.dtype),)
        return outs

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n=None):
        x, hs, cs, saved, hu, w_ih, w_hh, w_hr = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr = kernels("rnn").rnn_backward(
            ctx.mode, x, ctx.lengths, hs, cs, saved, hu, w_ih, w_hh, w_hr, dy, dh_n, dc_n,
            need_x=need[1], need_w=any(need[5:7]) or need[9], need_b=ctx.has_bias and any(need[7:9]))
        if not ctx.has_bias:
            db_ih = db_hh = None
        return None, dx, None, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr


def _run_layer(mode, x, lengths, h0, c0, weights):
    if use_triton_float(x):
        if lengths is not None:
            lengths = lengths.to(device=x.device, dtype=torch.int32)
        outs = RecurrentFunction.apply(mode, x, lengths, h0, c0, *weights)
        return outs if mode == "lstm" else (*outs, None)
    if lengths is not None:
        lengths = lengths.to(x.device)
    return _layer_torch(mode, x, lengths, h0, c0, *weights)


def _reverse(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Each sequence in reverse time order within its own length (padding stays where it is)."""
    if lengths is None:
        return x.flip(0)
    t = torch.arange(x.shape[0], device=x.device)[:, None]
    lens = lengths.to(x.device)[None, :]
    index = torch.where(t < lens, lens - 1 - t, t)
    return x.gather(0, index[:, :, None].expand_as(x))


class _Recurrent:
    """The forward shared by GRU, LSTM and RNN; `self` is also a torch.nn.RNNBase."""

    def _cell(self) -> str:
        raise NotImplementedError

    def forward(self, input, hx=None):
        mode = self._cell()
        name = type(self).__name__
        packed = isinstance(input, PackedSequence)
        lengths = sorted_idx = unsorted_idx = None
        if packed:
            sorted_idx, unsorted_idx = input.sorted_indices, input.unsorted_indices
            x, lengths = pad_packed_sequence(PackedSequence(input.data, input.batch_sizes))
            batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{name}: expected a 2-d (unbatched) or 3-d input, got shape {tuple(input.shape)}")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        if x.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input has {x.shape[-1]} features, the layer expects input_size="
                             f"{self.input_size}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: the input sequence is empty (length 0)")
        T, B = x.shape[:2]
        D = 2 if self.bidirectional else 1
        H = self.hidden_size
        P = self.proj_size or H
        h0, c0 = self._initial_states(hx, x, batched, sorted_idx, (self.num_layers * D, B, P),
                                      (self.num_layers * D, B, H))
        for w in self._flat_weights:
            if w is not None and w.dtype != x.dtype:
                raise TypeError(f"{name}: input has dtype {x.dtype} but the weights have {w.dtype}")

        layer_input, h_n, c_n = x, [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(D):
                k = layer * D + d
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                weights = [getattr(self, f"weight_ih{suffix}"), getattr(self, f"weight_hh{suffix}"),
                           getattr(self, f"bias_ih{suffix}", None) if self.bias else None,
                           getattr(self, f"bias_hh{suffix}", None) if self.bias else None,
                           getattr(self, f"weight_hr{suffix}", None) if self.proj_size else None]
                inp = _reverse(layer_input, lengths) if d else layer_input
                y, h, c = _run_layer(mode, inp, lengths, h0[k], c0[k] if c0 is not None else None, weights)
                outs.append(_reverse(y, lengths) if d else y)
                h_n.append(h)
                c_n.append(c)
            layer_input = outs[0] if D == 1 else torch.cat(outs, 2)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = dropout(layer_input, self.dropout)
        out, h_n = layer_input, torch.stack(h_n)
        c_n = torch.stack(c_n) if mode == "lstm" else None
        if packed:
            data = pack_padded_sequence(out, lengths).data
            out = PackedSequence(data, input.batch_sizes, sorted_idx, unsorted_idx)
            if unsorted_idx is not None:
                h_n = h_n.index_select(1, unsorted_idx)
                c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
        elif not batched:
            out, h_n = out.squeeze(1), h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, ((h_n, c_n) if mode == "lstm" else h_n)

    def _initial_states(self, hx, x, batched, sorted_idx, h_shape, c_shape):
        name = type(self).__name__
        lstm = self._cell() == "lstm"
        if hx is None:
            h0 = x.new_zeros(h_shape)
            return h0, (x.new_zeros(c_shape) if lstm else None)
        if lstm:
            if not (isinstance(hx, tuple) and len(hx) == 2):
                raise TypeError(f"{name}: hx must be a tuple (h_0, c_0)")
            h0, c0 = hx
        elif isinstance(hx, torch.Tensor):
            h0, c0 = hx, None
        else:
            raise TypeError(f"{name}: hx must be a tensor, got {type(hx).__name__}")
        states = [(h0, h_shape, "h_0")] + ([(c0, c_shape, "c_0")] if lstm else [])
        out = []
        for s, shape, what in states:
            if not batched:
                if s.dim() != 2:
                    raise ValueError(f"{name}: for an unbatched input {what} must be 2-d, got shape {tuple(s.shape)}")
                s = s.unsqueeze(1)
            elif sorted_idx is not None:
                s = s.index_select(1, sorted_idx)
            if tuple(s.shape) != shape:
                raise ValueError(f"{name}: {what} has shape {tuple(s.shape)}, expected {shape}")
            if s.dtype != x.dtype:
                raise TypeError(f"{name}: {what} has dtype {s.dtype} but the input has {x.dtype}")
            out.append(s)
        return out[0], (out[1] if lstm else None)

    @classmethod
    def from_torch(cls, module: nn.RNNBase):
        """A native layer sharing `module`'s parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for registry in ("_parameters", "_buffers", "_modules"):
            setattr(new, registry, dict(getattr(module, registry)))
        new._init_flat_weights()
        return new


class GRU(_Recurrent, nn.GRU):
    """nn.GRU (same arguments, parameters and state_dict keys) on the native kernels."""

    def _cell(self) -> str:
        return "gru"


class LSTM(_Recurrent, nn.LSTM):
    """nn.LSTM (same arguments, including proj_size) on the native kernels."""

    def _cell(self) -> str:
        return "lstm"


class RNN(_Recurrent, nn.RNN):
    """nn.RNN (nonlinearity "tanh" or "relu") on the native kernels."""

    def _cell(self) -> str:
        return "rnn_" + self.nonlinearity


register_conversion(nn.GRU, GRU.from_torch)
register_conversion(nn.LSTM, LSTM.from_torch)
register_conversion(nn.RNN, RNN.from_torch)
