"""`train.sync_batchnorm`: BatchNorm statistics over the global batch instead of each rank's share.

On GPUs this is PyTorch's own SyncBatchNorm. PyTorch's version refuses CPU tensors, so CPU process
groups (gloo: the tests, and CPU clusters) get `AllReduceBatchNorm`, the same computation written
with two autograd-aware all-reduces. Both keep BatchNorm's state-dict keys, so checkpoints load into
a plain single-process model and back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from image_autoencoding.training.distributed import summed_over_ranks


class AllReduceBatchNorm(_BatchNorm):
    """BatchNorm whose training-mode mean and variance are those of the images of all ranks.

    Two passes (sum, then the sum of squared deviations) rather than E[x^2] - E[x]^2, which loses
    digits when the mean is large. The all-reduces carry gradients (their backward is an all-reduce
    of the gradients), so every rank's input gets the gradient through the shared statistics."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1, *([1] * (x.dim() - 2))]
        xf = x.float()
        local_count = torch.full((1,), xf.numel() / xf.shape[1], device=x.device)
        totals = summed_over_ranks(torch.cat([xf.sum(dims), local_count]))
        count = totals[-1].detach()
        mean = totals[:-1] / count
        centred = xf - mean.view(shape)
        var = summed_over_ranks((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # As nn.BatchNorm: the running variance is the unbiased one; momentum None is a plain average.
        self.num_batches_tracked += 1
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        unbiased = var * (count / (count - 1).clamp(min=1))
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def _to_all_reduce(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm):
        replacement = AllReduceBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
            device=module.weight.device if module.affine else None,
        )
        replacement.load_state_dict(module.state_dict())
        replacement.train(module.training)
        return replacement
    for name, child in module.named_children():
        module.add_module(name, _to_all_reduce(child))
    return module


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` (in place) made to normalise over the global batch."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_all_reduce(model)
