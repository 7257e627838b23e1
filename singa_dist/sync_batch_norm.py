"""SyncBatchNorm: batch normalization whose statistics are those of the whole batch, over every worker.

In training, each worker's batch statistics (count, and the sums of the values and of their squares per channel,
in float64) are all-reduced, so that the output, the running statistics and the input gradient equal those of
one process normalizing the concatenation of every worker's batch; a worker that has joined (join()) takes part
with zeros. The
backward pass all-reduces the two per-channel sums the input gradient needs. As in Horovod and torch, the
weight and bias gradients are this worker's own (DistributedOptimizer averages them like any gradient).
In eval mode with running statistics, and in a single process, it is plain batch normalization. Works on CPU
and CUDA tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import runtime
from .collectives import allreduce_async_, global_process_set
from .coordinator import resolve_set
from .collectives import Sum


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_set):
        x = x.contiguous()
        channels = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xd = x.double()
        count = x.numel() // channels
        mine = torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=x.device), xd.sum(dims),
                          (xd * xd).sum(dims)])
        # Sums, not each worker's mean and spread: a rank that has joined takes part in an allreduce with zeros,
        # which count for nothing here (an allgather is refused while ranks have joined, as in Horovod).
        sums = allreduce_async_(mine, name="sync_batch_norm.stats", op=Sum, process_set=process_set).wait()
        total, sum_x, sum_xx = sums[0], sums[1:1 + channels], sums[1 + channels:]
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        global_mean = sum_x / total
        global_m2 = (sum_xx - total * global_mean * global_mean).clamp_min(0.0)
        var = global_m2 / total
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_((global_mean * momentum).to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_((global_m2 / (total - 1) * momentum).to(running_var.dtype))
        invstd = torch.rsqrt(var + eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xhat = (xd - global_mean.view(shape)) * invstd.view(shape)
        out = xhat
        if weight is not None:
            out = out * weight.double().view(shape) + bias.double().view(shape)
        ctx.save_for_backward(x, weight, global_mean, invstd)
        ctx.total, ctx.process_set = float(total), process_set
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        dy = grad.contiguous().double()
        xmu = x.double() - mean.view(shape)
        local = torch.stack([dy.sum(dims), (dy * xmu).sum(dims)])
        grad_weight = grad_bias = None
        if weight is not None:
            grad_weight = (local[1] * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = local[0].to(weight.dtype) if ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            sums = allreduce_async_(local.clone(), name="sync_batch_norm.sums", op=Sum,
                                    process_set=ctx.process_set).wait()
            sum_dy, sum_dy_xmu = sums[0].view(shape), sums[1].view(shape)
            scale = invstd.view(shape) * (weight.double().view(shape) if weight is not None else 1.0)
            grad_x = (dy - sum_dy / ctx.total - xmu * invstd.view(shape) ** 2 * sum_dy_xmu / ctx.total) * scale
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch normalization over the whole batch of every worker (Horovod's and torch's SyncBatchNorm).

    Same arguments and state_dict as torch.nn.BatchNorm1d/2d/3d (any input of 2 or more dimensions, channels in
    dimension 1), plus `process_set` (the workers whose batches are normalized together)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_set=global_process_set, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_set = process_set

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        if not self.training and self.track_running_stats:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        runtime.require_init("a SyncBatchNorm forward pass in training")
        ps = resolve_set(self.process_set)
        alone = not runtime.is_distributed() or (ps.size() or 1) < 2
        if alone:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, True, momentum,
                                self.eps)
        running = self.training and self.track_running_stats
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, self.running_mean if running else None,
                                            self.running_var if running else None, self.eps, momentum,
                                            self.process_set)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_set=global_process_set) -> torch.nn.Module:
        """`module` with every BatchNorm layer replaced by a SyncBatchNorm holding the same parameters and
        statistics (as torch.nn.SyncBatchNorm.convert_sync_batchnorm)."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_set)
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_set))
        return out
