"""The optimizers: one per network (each steps on its own objective), of the kind train.optimizer names.

Every optimizer made here skips its update on the device: set `optimizer.found_inf` (a 0-d float
tensor on the parameters' device, 1 = skip), then `step()`; a skipped step leaves weights and state
(the step count included) exactly as before, and the host never reads the flag. This is the
attribute GradScaler sets on optimizers that support it, so no host wait decides a step, and a step
can be captured in a CUDA graph. The learning rate of every parameter group is a 0-d tensor on that
device, changed in place (`set_rate`): a Python float would be copied from host memory at every
step, or baked into a captured graph."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from image_autoencoding.config import TrainConfig


class MaskedRMSprop(torch.optim.RMSprop):
    """torch.optim.RMSprop (no momentum, not centred: the original's) whose step is skipped on the
    device when `found_inf` is 1. PyTorch's RMSprop has no fused kernel and ignores found_inf
    (GradScaler waits on the host for it). The arithmetic is the single-tensor RMSprop's, operation
    for operation, so a taken step gives the same bits (tests/test_train.py checks it); on a skipped
    one the gradient is zeroed after weight decay, the running average multiplied by 1 instead of
    alpha and the step count increased by 0, so x * 1 + 0 and w + 0 / avg leave every value as it was.
    State dicts are RMSprop's, so checkpoints of either load into the other."""

    def __init__(self, params: Iterable[nn.Parameter], lr: Tensor, alpha: float, eps: float, weight_decay: float):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, capturable=True)

    @torch.no_grad()
    def step(self, closure=None):
        skip = getattr(self, "found_inf", None)
        taken = skip.eq(0) if skip is not None else None
        skipped = skip.ne(0) if skip is not None else None
        for group in self.param_groups:
            lr, alpha, eps, weight_decay = group["lr"], group["alpha"], group["eps"], group["weight_decay"]
            if group["momentum"] or group["centered"] or group["maximize"]:
                raise ValueError("MaskedRMSprop implements RMSprop without momentum, centring or maximize")
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                square_avg, step = state["square_avg"], state["step"]
                # A temporary the update may overwrite (the gradient itself stays as backward left it).
                grad = param.grad.add(param, alpha=weight_decay) if weight_decay != 0 else param.grad.clone()
                if taken is None:
                    step.add_(1)
                    square_avg.mul_(alpha)
                else:
                    step.add_(taken.to(step.dtype))
                    # Zero, not NaN: a NaN gradient times 0 would still be NaN.
                    grad.masked_fill_(skipped, 0.0)
                    square_avg.mul_(torch.where(taken, alpha, 1.0).to(square_avg.dtype))
                square_avg.addcmul_(grad, grad, value=1 - alpha)
                avg = square_avg.sqrt().add_(eps)
                # addcdiv's value * g / avg, with the rate a tensor: (-lr * g) / avg, the same bits.
                param.addcdiv_(grad.mul_(-lr), avg)
        return None


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float | None = None) -> Optimizer:
    """Adam, or the original's RMSprop (alpha 0.9, eps 1e-8); `lr` defaults to train.lr. Adam is
    PyTorch's fused kernel (on the CPU too), which honours found_inf and a tensor rate itself; its
    updates differ from the for-loop Adam's in the last bits (a few 1e-9 after three steps)."""
    params = list(params)
    rate = torch.full((), cfg.lr if lr is None else lr, dtype=torch.float32, device=params[0].device)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=rate, weight_decay=cfg.weight_decay, fused=True,
                                capturable=_capturable(params[0].device))
    return MaskedRMSprop(params, lr=rate, alpha=0.9, eps=1e-8, weight_decay=cfg.weight_decay)


def _capturable(device: torch.device) -> bool:
    """Whether an optimizer step may be captured in a CUDA graph (PyTorch refuses the flag on the CPU)."""
    return device.type == "cuda"


def set_rate(optimizer: Optimizer, lr: float) -> None:
    """Every group's rate, filled in place (no copy from host memory)."""
    for group in optimizer.param_groups:
        group["lr"].fill_(lr)


def after_loading(optimizer: Optimizer, device: torch.device, weight_decay: float | None = None) -> None:
    """After load_state_dict of a checkpoint: the saved rate (a float in every checkpoint) becomes
    this optimizer's device tensor again, the saved flags (fused, capturable) are this optimizer's,
    and step counts live on the parameters' device, as the fused and capturable kernels read them."""
    for group in optimizer.param_groups:
        group["lr"] = torch.full((), float(group["lr"]), dtype=torch.float32, device=device)
        if isinstance(optimizer, MaskedRMSprop):
            group["capturable"] = True
        else:
            group["fused"], group["foreach"], group["capturable"] = True, None, _capturable(device)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay
        for param in group["params"]:
            state = optimizer.state.get(param)
            if state and "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(param.device)


def saved(state: dict) -> dict:
    """An optimizer's state dict for a checkpoint: rates as plain floats, as checkpoints always held."""
    for group in state["param_groups"]:
        if isinstance(group["lr"], Tensor):
            group["lr"] = float(group["lr"])
    return state
