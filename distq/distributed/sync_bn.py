"""Synchronised batch-norm (``dist.sync_bn``): batch statistics over every rank's micro-batch.

Each process of a data-parallel run normalises its micro-batch; plain BatchNorm uses the
statistics of that micro-batch alone, so N processes of B images train a different network
than one process of N x B images, and each rank's running statistics see 1/N of the data.
With synchronised batch-norm every rank normalises with the mean and variance of the global
batch, and the running statistics (updated from them) are the same on every rank.

On CUDA this is PyTorch's ``nn.SyncBatchNorm`` (fused kernels). PyTorch's refuses CPU tensors,
so on the CPU (gloo) it is ``SyncBatchNorm2d`` below: one all-reduce of (sum, sum of squares,
count) per channel in float64 forward, one of (sum dy, sum dy x_hat) backward, the same
formulas as PyTorch's. The weight and bias gradients stay local: the engine's gradient
averaging makes them the global batch's, as it does for every other parameter.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

REDUCED_DIMS = (0, 2, 3)


class _SyncBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        channels = x.shape[1]
        x32 = x.float()
        local = torch.cat([x32.sum(REDUCED_DIMS, dtype=torch.float64), x32.square().sum(REDUCED_DIMS, dtype=torch.float64),
                           torch.tensor([x.numel() // channels], dtype=torch.float64, device=x.device)])  # fmt: skip
        if _distributed(group):
            dist.all_reduce(local, group=group)
        count = local[-1]
        mean = local[:channels] / count
        var = (local[channels : 2 * channels] / count - mean.square()).clamp_min(0)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * count / (count - 1).clamp_min(1)).to(running_var.dtype), alpha=momentum)
        shape = (1, channels, 1, 1)
        invstd = (var + eps).rsqrt().float().view(shape)
        x_hat = (x32 - mean.float().view(shape)) * invstd
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.count, ctx.group = count, group
        return (x_hat * weight.view(shape) + bias.view(shape)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x_hat, weight, invstd = ctx.saved_tensors
        dy = grad_out.float()
        channels = dy.shape[1]
        sum_dy = dy.sum(REDUCED_DIMS)
        sum_dy_xhat = (dy * x_hat).sum(REDUCED_DIMS)
        grad_weight, grad_bias = sum_dy_xhat.clone(), sum_dy.clone()  # this rank's share, averaged by the engine
        sums = torch.cat([sum_dy, sum_dy_xhat]).double()
        if _distributed(ctx.group):
            dist.all_reduce(sums, group=ctx.group)
        shape = (1, channels, 1, 1)
        count = ctx.count.float()
        global_dy, global_dy_xhat = sums[:channels].float().view(shape), sums[channels:].float().view(shape)
        grad_x = (weight.view(shape) * invstd / count) * (count * dy - global_dy - x_hat * global_dy_xhat)
        return grad_x.to(grad_out.dtype), grad_weight, grad_bias, None, None, None, None, None


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's (any device, any backend).

    On one process it computes the same way (float64 sums, no all-reduce), so a run on one
    process and on several agree to the rounding of the convolutions, not just of BatchNorm:
    a low-bit network rounds its activations, and a 1e-7 difference in a BatchNorm output is
    enough to move an activation to the next level."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        stats = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _SyncBatchNorm.apply(x, self.weight, self.bias, *stats, self.eps, momentum, self.process_group)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``module`` made synchronised; returns the module. The new layers take
    over the old ones' Parameter and buffer objects, so an optimizer built before still holds them."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        synced = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        if module.track_running_stats:
            synced.running_mean, synced.running_var, synced.num_batches_tracked = module.running_mean, module.running_var, module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        converted = convert_sync_batchnorm(child, device)
        if converted is not child:
            setattr(module, name, converted)
    return module
