"""What a model costs: its parameters and the arithmetic of one training step per image."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def step_gflop_per_image(trainer, x: torch.Tensor) -> float:
    """GFLOP per image of one training step of `trainer` on batch `x` (the convolutions and matrix
    products, forward and backward, as torch.utils.flop_counter counts them). The step is taken:
    the weights change."""
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(x)
    return counter.get_total_flops() / x.shape[0] / 1e9
