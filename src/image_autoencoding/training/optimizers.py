"""The optimizers: one per network (each steps on its own objective), of the kind train.optimizer names."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim import Optimizer

from image_autoencoding.config import TrainConfig


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, lr: float | None = None) -> Optimizer:
    """Adam, or the original's RMSprop (alpha 0.9, eps 1e-8); `lr` defaults to train.lr."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-8, weight_decay=cfg.weight_decay)
