"""What every training step does, whatever its objective: snapshot the buffers, take the gradients,
agree across ranks, skip a non-finite step, step every optimizer. A step object owns its networks'
optimizers, its objective module and their state in a checkpoint; the trainer holds one and never
asks which kind it is."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from image_autoencoding.config import TrainConfig
from image_autoencoding.models.vae import VAE
from image_autoencoding.training.buffer_snapshot import BufferSnapshot
from image_autoencoding.training.distributed import Distributed
from image_autoencoding.training.ema import WeightAverage
from image_autoencoding.training.optimizers import after_loading, saved, set_rate
from image_autoencoding.training.sync_batchnorm import convert_batchnorm

logger = logging.getLogger("image_autoencoding")


class StepResult(NamedTuple):
    """What a training step gives back: device tensors, read by the host only when it logs."""

    sums: Tensor  # recon, kl summed over the global batch's images (not finite when skipped)
    skipped: Tensor  # bool, 0-d: a loss or gradient was not finite, nothing was updated
    flags: Tensor | None  # under torchrun: the stop requests summed over the ranks; else None


class TermSums:
    """A step's own terms (the ldm loss's pixel, nll, GAN terms...; the VAE-GAN's D(x), D(x~))
    summed on the device, with no host wait per step, twice: since the last `take(EPOCH)` (the
    epoch's means, in metrics.csv) and since the last `take(WINDOW)` (the per-step log's, read when
    the running loss is shown). A step adds to both at once, so the per-step log never changes an
    epoch's means; a skipped step adds nothing (its terms are not finite, or belong to weights it
    never changed, and would turn the means into NaN)."""

    EPOCH, WINDOW = 0, 1

    def __init__(self, names: Sequence[str], device: torch.device):
        self.names = tuple(names)
        self.sums = torch.zeros(2, len(self.names), device=device)

    def add(self, values: Tensor, skipped: Tensor) -> None:
        """One step's terms, in the order of `names`, unless `skipped` (a device flag) is set."""
        self.sums += torch.where(skipped, 0.0, values)

    def take(self, row: int) -> dict[str, float]:
        """The sums of `row` by name (one read of the device), then that row starts again."""
        values = dict(zip(self.names, self.sums[row].tolist(), strict=True))
        self.sums[row].zero_()
        return values


class TrainingStep:
    """One optimisation step of every network an objective trains.

    Subclasses build `objective` (the module whose forward computes the step's losses: compiled, and
    under torchrun the thing DDP wraps; hooks on it see every step) and implement `gradients`.
    `networks` maps each checkpoint key to a module whose weights are saved ("model": the VAE);
    `optimizers` maps each network name to its optimizer ("encoder", "decoder" follow train.lr's
    schedule; any other keeps its own rate). With train.ema_decay the step also keeps `ema`, the
    average of the VAE's weights (training/ema.py), saved as the network "ema"; `inference_model`
    is the VAE that validation scores."""

    SCHEDULED = ("encoder", "decoder")

    def __init__(self, cfg: TrainConfig, model: VAE, device: torch.device, dist: Distributed,
                 networks: dict[str, nn.Module], optimizers: dict[str, Optimizer], objective: nn.Module,
                 loss_scaling: bool = False):
        self.cfg, self.model, self.device, self.dist = cfg, model, device, dist
        self.networks, self.optimizers, self.objective = networks, optimizers, objective
        # Loss scaling for fp16 only; disabled, it passes the loss and the steps through unchanged,
        # so bf16 / fp32 and CPU tests run the same code as a GPU fp16 run. Our losses are sums over
        # pixels and images (the original's), so gradients are already far from fp16's underflow;
        # the usual initial scale of 2^16 would overflow for dozens of steps.
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0, enabled=loss_scaling)
        self._buffers = BufferSnapshot(*networks.values())
        # This step's KL weight, filled in place: torch.tensor(alpha, device=...) would be a copy
        # from pageable host memory, which on a GPU waits for all queued work before every step.
        self._alpha = torch.zeros((), device=device)
        # Owned here, not by a callback: only the step knows that its optimizers stepped, and its
        # state is a network of the checkpoint. Under torchrun every rank holds the same weights
        # after a step, so each rank's average is the same without a collective.
        self.ema = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.terms: TermSums | None = None  # the objective's own terms, where it has any

    # -- the step --------------------------------------------------------------------------------

    def __call__(self, x: Tensor, alpha: float, step: int, flags: Tensor | None = None) -> StepResult:
        """Train every network on batch `x` with KL weight `alpha`; `step`: the trainer's steps done
        before this one (an objective may change with it: ldm's disc_start). Returns device tensors
        only, and nothing waits for the device: the batch sums (recon, kl) over the global batch and
        the flag `skipped` (a loss or gradient was not finite): then every optimizer's update, the
        BatchNorm statistics and the weight average are masked on the device, so weights, optimizer
        state (step counts included), statistics and average are exactly as before. Under torchrun
        `flags` (the trainer's stop requests) travel in the step's one all-reduce and come back in
        `flags`, summed over the ranks."""
        self.prepare(alpha, step)
        return self.run(x, flags)

    def prepare(self, alpha: float, step: int) -> Hashable:
        """Before `run`: the KL weight filled into its device tensor, and the host's decisions for
        the step (`phase`), which this returns."""
        self._alpha.fill_(alpha)
        return self.phase(step)

    def phase(self, step: int) -> Hashable:
        """What the trainer's steps done (`step`) make of the next step's work, decided on the host;
        a CUDA graph (training/cuda_graph.py) is captured for each value and batch shape. None
        here: every step is the same."""
        return None

    def run(self, x: Tensor, flags: Tensor | None = None) -> StepResult:
        """The step itself, after `prepare`, with the KL weight and the learning rates already in
        their device tensors: only device work, nothing read on the host, so that it can be
        captured in a CUDA graph (fp16's loss scaling aside)."""
        self._buffers.take()
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        sums, skipped = self.gradients(x, self._alpha)
        agreed = None
        if self.dist.enabled:
            skipped, sums, agreed = self._agree_across_ranks(skipped, sums, flags)
        if self.scaler.is_enabled():
            self._scaled_update(skipped)
            return StepResult(sums, skipped, agreed)
        self._buffers.restore_if(skipped)
        found_inf = skipped.float()
        for optimizer in self.optimizers.values():
            optimizer.found_inf = found_inf  # optimizers.py: the update is skipped on the device
            optimizer.step()
        if self.ema is not None:
            self.ema.update(~skipped)
        return StepResult(sums, skipped, agreed)

    def _scaled_update(self, skipped: Tensor) -> None:
        """fp16 with loss scaling waits for the device once per step, here, as GradScaler itself
        does for an optimizer without a fused kernel (RMSprop): it is the path for GPUs without bf16,
        and it is never captured in a CUDA graph. GradScaler may skip an optimizer for an
        overflowing gradient: the average then moves towards unchanged weights; knowing it would
        cost one more host wait per step."""
        if bool(skipped):
            self._buffers.restore()
            return
        for optimizer in self.optimizers.values():
            optimizer.found_inf = None  # GradScaler decides (and sets it on fused optimizers itself)
            self.scaler.step(optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update()

    def gradients(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """Fill each network's .grad with the gradient of its own loss; returns the detached batch
        sums (recon, kl) of this rank and a device flag: a loss or gradient not finite."""
        raise NotImplementedError

    def _agree_across_ranks(self, skipped: Tensor, sums: Tensor, flags: Tensor | None
                            ) -> tuple[Tensor, Tensor, Tensor]:
        """One all-reduce per step for everything the ranks must agree on: the loss sums of the
        global batch, whether any rank saw a non-finite loss (gradients are equal on all ranks after
        the all-reduce, but losses are per rank; a step skipped on one rank and taken on another
        would split the replicas for good), and the caller's flags (a second collective for them
        would be a second launch and wait per step). Device tensors in and out."""
        extra = flags if flags is not None else torch.zeros(0, device=self.device)
        packet = torch.cat([sums.float(), skipped.float().view(1), extra.float()])
        self.dist.all_reduce_sum(packet)
        return packet[2] > 0, packet[:2], packet[3:]

    @property
    def inference_model(self) -> VAE:
        """The VAE that is the model for validation and pictures: the average when there is one."""
        return self.ema.average if self.ema is not None else self.model

    # -- learning rate and statistics ------------------------------------------------------------

    def set_learning_rate(self, lr: float) -> None:
        """The encoder's and decoder's rate for the next step, filled into their device tensors;
        other networks keep their own."""
        for name in self.SCHEDULED:
            set_rate(self.optimizers[name], lr)

    @property
    def learning_rate(self) -> float:
        """The encoder's rate (reads the device)."""
        return float(self.optimizers["encoder"].param_groups[0]["lr"])

    def take_stats(self) -> dict[str, float]:
        """Statistics of this objective since the last call (then reset): the epoch's, in its
        metrics.csv row; benchmarks read them too."""
        return self.term_means(self.terms.take(TermSums.EPOCH)) if self.terms is not None else {}

    def take_window_stats(self) -> dict[str, float]:
        """The same terms over the steps since this method's last call (then reset), kept apart
        from take_stats's: the per-step log (TensorBoard train/step_<term>) reads them every few
        steps, when the running loss is shown, without changing the epoch's means."""
        return self.term_means(self.terms.take(TermSums.WINDOW)) if self.terms is not None else {}

    def term_means(self, sums: dict[str, float]) -> dict[str, float]:
        """The logged values from `terms`' sums over some steps (an objective with terms defines it)."""
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """{"networks": {key: state_dict}, "optimizers": {name: state_dict}, "scaler": ...}; with
        train.ema_decay, the average as the network "ema" and its "ema_updates"."""
        state = {"networks": {key: module.state_dict() for key, module in self.networks.items()},
                 "optimizers": {name: saved(optimizer.state_dict()) for name, optimizer in self.optimizers.items()},
                 "scaler": self.scaler.state_dict()}
        if self.ema is not None:
            state["networks"]["ema"] = self.ema.state_dict()
            state["ema_updates"] = self.ema.updates
        return state

    def load_state_dict(self, networks: dict[str, Any], optimizers: dict[str, Any], scaler: dict | None,
                        ema_updates: int | None = None) -> None:
        for key, module in self.networks.items():
            module.load_state_dict(networks[key])
        self._load_average(networks.get("ema"), ema_updates)
        # Optimizer state dicts carry the weight decay they were saved with; a resume that changes it
        # continues with the new value (the learning rate is set before every step).
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(optimizers[name])
            after_loading(optimizer, self.device, self.cfg.weight_decay if name in self.SCHEDULED else None)
        if scaler:
            self.scaler.load_state_dict(scaler)

    def _load_average(self, weights: dict[str, Any] | None, updates: int | None) -> None:
        """train.ema_decay may change on resume: a new decay continues the saved average; turned on,
        the average starts from the checkpoint's weights; turned off, the saved one is dropped."""
        if self.ema is not None and weights is not None:
            self.ema.load_state_dict(weights, updates or 0)
        elif self.ema is not None:
            self.ema.restart()
            logger.info("train.ema_decay is on and the checkpoint has no weight average: it starts from the "
                        "checkpoint's weights; validation and best.pt now score the average")
        elif weights is not None:
            logger.info("train.ema_decay is null: the checkpoint's weight average is dropped; validation and "
                        "checkpoints now hold the trained weights")


def placed_discriminator(discriminator: nn.Module, cfg: TrainConfig, device: torch.device,
                         dist: Distributed) -> nn.Module:
    """A discriminator on the training device, with synchronised BatchNorm under torchrun when
    train.sync_batchnorm asks for it, and channels_last when the VAE is."""
    discriminator = discriminator.to(device)
    if dist.enabled and cfg.sync_batchnorm:
        discriminator = convert_batchnorm(discriminator, device)
    if cfg.channels_last:
        discriminator = discriminator.to(memory_format=torch.channels_last)
    return discriminator


def not_finite(losses: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A device flag: some loss or gradient of a step holds NaN or Inf. Checked after the gradients
    exist, so a finite loss with an overflowing gradient is caught too; one fused norm over all
    gradients keeps it to a few kernels."""
    total_norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
    return ~(torch.isfinite(torch.stack([loss.detach() for loss in losses])).all() & torch.isfinite(total_norm))
