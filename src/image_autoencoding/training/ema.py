"""An exponential moving average of a model's weights (train.ema_decay), as the autoencoders of
latent diffusion keep one (Rombach et al. 2022; ldm/modules/ema.py's LitEma): after every optimizer
step that was taken,

    decay_n = min(train.ema_decay, (1 + n) / (10 + n))      n: updates before this one
    average = decay_n * average + (1 - decay_n) * weights

The warm-up (LitEma's and diffusers' EMAModel's) is needed because the average starts from the
weights before the first step, which are random: with a fixed 0.999, after 1000 steps 0.999^1000 =
37% of the average would still be that noise, and the first epochs' validation (and best.pt) would
score it. With the warm-up the average spans about the last n / 10 steps until 1 / (1 - decay).

Buffers (BatchNorm's running statistics) are copied, not averaged, as timm's ModelEmaV3 and
diffusers do: they are statistics of the current weights' activations, and an average of integer
counters (num_batches_tracked) means nothing.

torch.optim.swa_utils.AveragedModel does not fit: with use_buffers=False it leaves the copy's
BatchNorm statistics at their initial values (0 and 1: a broken model until update_bn passes the
data through it), with use_buffers=True it averages them, counters included; its decay is fixed
(get_ema_multi_avg_fn); and its state dict is prefixed "module." with an "n_averaged" counter,
not the VAE's, which every reader of a checkpoint loads. The arithmetic is the same foreach lerp."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

WARMUP = 10  # the warm-up's constant, LitEma's and diffusers'


class WeightAverage:
    """The average of `model`'s weights, itself a model of the same kind (`average`): in eval mode,
    without gradients, on the model's device. It starts as a copy of `model`."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.average = copy.deepcopy(model).eval().requires_grad_(False)
        # The optimizer steps averaged so far (the warm-up's n), counted on the device: whether a
        # step was taken is a device flag the host does not read. float64, so that the warm-up's
        # decay is the same double a host computation gives.
        self._updates = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
        self._model = model
        self._mine = [p.detach() for p in self.average.parameters()]
        self._theirs = [p.detach() for p in model.parameters()]
        self._my_buffers = list(self.average.buffers())
        self._their_buffers = list(model.buffers())

    @property
    def updates(self) -> int:
        """The steps averaged so far (reads the device)."""
        return int(self._updates)

    @torch.no_grad()
    def update(self, taken: Tensor | None = None) -> None:
        """After an optimizer step: move the average towards the model's weights, copy its buffers.
        `taken`: a device flag, False for a skipped step, which then leaves the average as it was
        (a lerp by exactly 0; the buffers copied are the ones the skipped step restored)."""
        n = self._updates
        decay = ((1 + n) / (WARMUP + n)).clamp(max=self.decay)
        weight = (1 - decay) if taken is None else (1 - decay) * taken
        weight = weight.float()
        torch._foreach_lerp_(self._mine, self._theirs, [weight] * len(self._mine))
        if self._my_buffers:  # a model without BatchNorm (model.arch=resnet) has none; foreach refuses []
            torch._foreach_copy_(self._my_buffers, self._their_buffers)
        self._updates += 1 if taken is None else taken

    @torch.no_grad()
    def restart(self) -> None:
        """Start again from the model's weights as they are now (a resume that turns the average on)."""
        self.average.load_state_dict(self._model.state_dict())
        self._updates.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's weights: a state dict of the model's kind, which any of its readers loads."""
        return self.average.state_dict()

    def load_state_dict(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        self.average.load_state_dict(weights)
        self._updates.fill_(updates)
