"""The learning rate of every training step, as a function of where the step is in the run.

A pure function of (step, epoch) and the config, not a stateful scheduler: a run resumed from any
checkpoint, or resumed with a changed train.lr, has exactly the rate an uninterrupted run with that
config would have at that step, with nothing to save or to patch up on restore.

- exponential: the original's ExponentialLR, lr x decay_lr^(epoch - 1) in epoch 1, 2, ... With the
  original's 0.75 the rate is 3e-6 of its start after 20 epochs: a 100-epoch run stops learning long
  before it ends.
- cosine: from lr down to 0 over the run's planned steps (Loshchilov & Hutter 2017, SGDR without
  restarts), after the warm-up.
- constant: lr throughout, after the warm-up.

Warm-up (every schedule): the rate rises linearly over the first train.warmup_steps steps (Goyal et
al. 2017). The optimizers' first updates are as large for every weight whatever its gradient: torch's
RMSprop starts its average of squared gradients at 0, so with alpha 0.9 the first update is
lr g / sqrt(0.1 g^2), about 3.2 lr; Adam's (bias-corrected) is lr. A smaller lr for those steps keeps
them from throwing the encoder's output far out before the averages settle.
"""

from __future__ import annotations

import math

from image_autoencoding.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int, epoch: int, planned_steps: int) -> float:
    """The rate of the optimizer step that follows `step` steps done, in (1-based) `epoch`, of a
    run planned to take `planned_steps` steps."""
    warmup = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "exponential":
        return cfg.lr * warmup * cfg.decay_lr ** (epoch - 1)
    if cfg.lr_schedule == "cosine":
        span = max(1, planned_steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        return cfg.lr * warmup * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * warmup


def describe(cfg: TrainConfig) -> str:
    """The schedule in words, for reports: "lr 0.001, cosine to 0 over the run, warm-up 100 steps"."""
    shape = {"exponential": f"x{cfg.decay_lr:g} per epoch", "cosine": "cosine to 0 over the run",
             "constant": "constant"}[cfg.lr_schedule]
    warmup = f", warm-up {cfg.warmup_steps} steps" if cfg.warmup_steps else ""
    return f"lr {cfg.lr:g}, {shape}{warmup}"
