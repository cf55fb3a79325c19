"""The training loop: one backward pass per step, separate encoder and decoder optimizers, bf16
autocast where the device has it. The trainer writes no files: the run folder's checkpoints,
metrics.csv, TensorBoard and pictures are callbacks (runs/), given by whoever runs it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from image_autoencoding.config import Config
from image_autoencoding.data.batches import Normalizer, steps_per_epoch, training_batches
from image_autoencoding.data.image_data import ImageData
from image_autoencoding.errors import UserError
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.models.factory import build_model
from image_autoencoding.runtime import autocast_factory, keep_freed_memory, resolve_precision
from image_autoencoding.training.buffer_snapshot import BufferSnapshot
from image_autoencoding.training.callbacks import Callback, Callbacks
from image_autoencoding.training.distributed import SINGLE, Distributed
from image_autoencoding.training.early_stopping import EarlyStopping
from image_autoencoding.training.epoch_progress import EpochProgress
from image_autoencoding.training.interrupts import (
    HANDLED,
    StopRequests,
    TrainingInterrupted,
    signal_name,
    signal_to_stop_on,
)
from image_autoencoding.training.lr_schedule import learning_rate
from image_autoencoding.training.objective import VAEObjective, not_finite
from image_autoencoding.training.optimizers import build_optimizers
from image_autoencoding.training.rng import rng_state, seed_everything, set_rng_state
from image_autoencoding.training.sharded_evaluation import evaluate_split_across_ranks
from image_autoencoding.training.sync_batchnorm import convert_batchnorm
from image_autoencoding.training.vae_gan import VaeGan

logger = logging.getLogger("image_autoencoding")


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row; the message gives the step and the batch."""


class Trainer:
    """`dist` says which of the torchrun processes this is (every rank trains); `resume` a
    checkpoint's state to continue from; `callbacks` run at the named points of `fit`
    (callbacks.py): runs/run_callbacks.py has those that write a run folder."""

    def __init__(
        self, config: Config, data: ImageData, resume: dict[str, Any] | None = None,
        dist: Distributed = SINGLE, callbacks: Sequence[Callback] = (),
    ):
        self.config = config
        self.cfg = config.train
        self.data = data
        self.dist = dist
        self.device = dist.device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.autocast = autocast_factory(self.device, self.precision)
        if self.device.type == "cpu" and self.cfg.reuse_cpu_memory:
            keep_freed_memory()
        self.normalize = Normalizer(config.data, self.device)
        self.alpha = self.cfg.kl_weight(dist.world_size)

        seed_everything(self.cfg.seed)
        self.model = build_model(config.model, config.data.image_size).to(self.device)
        if dist.enabled and self.cfg.sync_batchnorm:
            self.model = convert_batchnorm(self.model, self.device)
        if self.cfg.channels_last:
            # Batches from `Normalizer` are NHWC in memory already (a permuted uint8 NHWC array).
            self.model = self.model.to(memory_format=torch.channels_last)
        # model.mode=vae-gan: the discriminator, its optimizer and its gradients (training/vae_gan.py).
        self.gan = VaeGan(config, self.model, self.device, dist) if config.model.mode == "vae-gan" else None
        # self.objective computes a step's losses in one forward, compiled as a whole; the VAE's
        # is wrapped in DDP under torchrun (the VAE-GAN syncs its gradients itself). self.model
        # stays the plain VAE whose weights are saved (the same parameters).
        if self.gan is None:
            objective = VAEObjective(self.model, self.autocast, dist.rank, dist.world_size,
                                     free_bits=self.cfg.free_bits)
        else:
            objective = self.gan.objective(self.model, self.autocast)
        # Static shapes: the last partial batch of an epoch gets a graph of its own. By default
        # a second batch size makes torch.compile build a dynamic-shape graph (41 s against 21 s
        # for a static one, measured on CPU with a cold cache), which every full batch then runs.
        self.objective = torch.compile(objective, dynamic=False) if self.cfg.compile else objective
        if dist.enabled and self.gan is None:
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.encoder_optimizer, self.decoder_optimizer = build_optimizers(self.model, self.cfg)
        self.optimizers = [self.encoder_optimizer, self.decoder_optimizer, *([self.gan.optimizer] if self.gan else [])]
        # Loss scaling for fp16 only; disabled, it passes the loss and the steps through unchanged,
        # so bf16 / fp32 and CPU tests run the same code as a GPU fp16 run.
        # Our losses are sums over pixels and images (the original's), so gradients are already far
        # from fp16's underflow; the usual initial scale of 2^16 would overflow for dozens of steps.
        # The VAE-GAN's gradients come from autograd.grad, unscaled: no loss scaling there.
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0,
                                           enabled=self.precision == "fp16" and self.gan is None)
        # The horizon of train.lr_schedule=cosine; a caller that stops the run early (a benchmark
        # training a fixed number of images) sets it to the steps it will take.
        self.planned_steps = self.cfg.epochs * steps_per_epoch(
            len(data.train.images), self.cfg.batch_size, self.cfg.max_steps_per_epoch, dist.world_size)
        self.epoch = 0  # epochs completed
        self.step = 0  # training steps done (batches drawn), skipped ones included
        self.progress = EpochProgress.from_state(None, self.device)
        self.epoch_steps = 0  # steps of the epoch being trained (set by train_epoch)
        self.bad_steps_in_a_row = 0
        self.best_ssim = float("-inf")
        self.improved = False  # whether the last epoch validated set a new best_ssim
        self.stop = StopRequests()  # installed for the duration of fit()
        self.stop_reason: str | None = None  # set by request_stop: fit ends after the current epoch
        # Behaviour the config asks for comes first, so that the run folder's callbacks see its
        # decisions (early stopping's) in the same epoch.
        early_stopping = ([EarlyStopping(self.cfg.early_stopping_patience, self.cfg.early_stopping_min_delta)]
                          if self.cfg.early_stopping_patience else [])
        self.callbacks = Callbacks([*early_stopping, *callbacks])
        self._buffers = BufferSnapshot(self.model, *([self.gan.discriminator] if self.gan else []))
        # This step's KL weight, filled in place: torch.tensor(alpha, device=...) would be a copy
        # from pageable host memory, which on a GPU waits for all queued work before every step.
        self._alpha = torch.zeros((), device=self.device)
        self._agreed_stop: int | None = None  # under torchrun: the signal all ranks agreed to stop on
        if resume is not None:
            self._restore(resume)

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "encoder_optimizer": self.encoder_optimizer.state_dict(),
            "decoder_optimizer": self.decoder_optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "epoch_progress": self.progress.state(),
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
            "scaler": self.scaler.state_dict(),
            # Every rank's RNG state is rank 0's (see VAEObjective), so one state resumes them all.
            "rng": rng_state(),
            "world_size": self.dist.world_size,
            "best_ssim": self.best_ssim,
            "callbacks": self.callbacks.state_dict(),
            "config": self.config.to_dict(),
            **(self.gan.state() if self.gan is not None else {}),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.decoder_optimizer.load_state_dict(state["decoder_optimizer"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_ssim = float(state.get("best_ssim", float("-inf")))
        self.progress = EpochProgress.from_state(state.get("epoch_progress"), self.device)
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        # Optimizer state dicts carry the weight decay they were saved with; a resume that changes it
        # continues with the new value (the learning rate is set before every step).
        for optimizer in (self.encoder_optimizer, self.decoder_optimizer):
            for group in optimizer.param_groups:
                group["weight_decay"] = self.cfg.weight_decay
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.callbacks.load_state_dict(state.get("callbacks", {}))
        if self.gan is not None:
            self.gan.load_state(state)

    # -- one step / one epoch --------------------------------------------------------------------

    def train_step(self, x: Tensor) -> Tensor | None:
        """One optimisation step of every network. Returns detached per-batch sums (recon, kl), or
        None when a loss or a gradient is not finite: then no optimizer steps, and weights,
        optimizer state and BatchNorm statistics are exactly as before."""
        alpha = self.cfg.kl_weight(self.dist.world_size, self.step)  # ramps up over kl_warmup_steps
        self._buffers.take()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.gan is None:
            sums, bad = self._vae_gradients(x, self._alpha.fill_(alpha))
        else:
            sums, bad = self.gan.gradients(self.objective, x, self._alpha.fill_(alpha))
        self.step += 1
        if self.dist.enabled:
            bad, sums = self._agree_across_ranks(bad, sums)
        # The one host sync per step (under torchrun, inside _agree_across_ranks): skipping an
        # optimizer step is a host decision, so it waits for the device here (GradScaler does the
        # same for optimizers without a fused kernel, such as RMSprop). Everything before it only
        # queues work. On CPU the sync costs nothing.
        if bool(bad):
            self._buffers.restore()
            return None
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        return sums

    def _vae_gradients(self, x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """One backward pass of sum(recon) + alpha * sum(kl) gives the encoder and the decoder
        each the gradient of its own objective (the KL does not depend on the decoder)."""
        loss, recon, kl = self.objective(x, alpha)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():
            # fp16: overflowing gradients are expected while the loss scale settles; GradScaler skips
            # those steps itself and lowers the scale, so only a non-finite loss counts as bad here.
            bad = ~torch.isfinite(loss.detach())
        else:
            bad = not_finite([loss], [p.grad for p in self.model.parameters() if p.grad is not None])
        return torch.stack([recon, kl]).detach(), bad

    def _agree_across_ranks(self, bad: Tensor, sums: Tensor) -> tuple[bool, Tensor]:
        """One all-reduce and one host wait per step for everything the ranks must agree on: the
        loss sums of the global batch, whether any rank saw a non-finite loss (gradients are equal
        on all ranks after DDP's all-reduce, but losses are per rank; a step skipped on one rank and
        taken on another would split the replicas for good), and which stop signals have reached
        any rank so far (a second collective for them cost a second host wait per step)."""
        packet = torch.cat([sums.float(), bad.float().view(1), self._stop_flags()])
        self.dist.all_reduce_sum(packet)
        agreed = packet[2:].tolist()
        self._agreed_stop = signal_to_stop_on(agreed[1:])
        return agreed[0] > 0, packet[:2]

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> dict[str, float]:
        """The rest of `epoch`: all of it, or what follows the checkpoint this run resumed from.
        `max_steps`: end the epoch after this many steps (default train.max_steps_per_epoch)."""
        self.model.train()
        images, world = self.data.train.images, self.dist.world_size
        max_steps = self.cfg.max_steps_per_epoch if max_steps is None else max_steps
        self.epoch_steps = steps_per_epoch(len(images), self.cfg.batch_size, max_steps, world)
        progress = self.progress
        start = time.perf_counter() - progress.seconds
        batches = training_batches(
            images, self.cfg.batch_size, self.cfg.seed, epoch, self.device, self.normalize,
            max_steps, start_step=progress.steps, rank=self.dist.rank, world_size=world,
            flip=self.config.data.random_flip,
        )
        self.callbacks.on_epoch_start(self, epoch)
        for x in batches:
            self.callbacks.on_step_start(self)
            self.set_learning_rate(epoch)
            sums = self.train_step(x)
            progress.steps += 1
            if sums is None:
                self._count_bad_step(epoch)
            else:
                self.bad_steps_in_a_row = 0
                progress.sums += sums
                progress.images += x.shape[0] * world  # every rank's share is full (see training_batches)
            progress.seconds = time.perf_counter() - start
            self.callbacks.on_step_end(self, x, sums)
            # Under torchrun, the signals the ranks agreed on in this step's packet: a signal that
            # arrives after the packet was sent stops every rank after the next step.
            signum = self._agreed_stop if self.dist.enabled else self.stop.signum
            if signum is not None:
                self._stop_on_signal(signum, epoch)
        seconds = time.perf_counter() - start
        recon, kl = progress.mean_losses()
        self.progress = EpochProgress.from_state(None, self.device)
        return {
            "encoder_loss": progress.running_encoder_loss(self.alpha),
            "decoder_loss": recon,
            "recon": recon,
            "kl": kl,
            "images_per_s": progress.images / seconds,
            "seconds": seconds,
            "lr": self.encoder_optimizer.param_groups[0]["lr"],
            "skipped_steps": progress.skipped,
        }

    def set_learning_rate(self, epoch: int) -> None:
        """The encoder's and decoder's rate for the next step (training/lr_schedule.py); the
        discriminator's (VAE-GAN) stays train.discriminator_lr."""
        lr = learning_rate(self.cfg, self.step, epoch, self.planned_steps)
        for optimizer in (self.encoder_optimizer, self.decoder_optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr

    def validate(self) -> dict[str, float]:
        """Losses and per-image metrics on the validation split (the first train.eval_images); under
        torchrun each rank scores a contiguous share and the per-image values are gathered, so the
        means are those of one process scoring every image."""
        if self.dist.enabled:
            per_image = evaluate_split_across_ranks(
                self.model, self.data.valid.images, self.normalize, self.device, self.cfg.batch_size,
                self.autocast, self.cfg.eval_images, self.dist,
            )
            return {f"valid_{name}": float(values.mean()) for name, values in per_image.items()}
        evaluation = evaluate_split(
            self.model, self.data.valid.images, self.normalize, self.device, self.cfg.batch_size, self.autocast,
            self.cfg.eval_images,
        )
        return evaluation.means(prefix="valid_")

    def _count_bad_step(self, epoch: int) -> None:
        self.progress.skipped += 1
        self.bad_steps_in_a_row += 1
        where = f"step {self.step} (epoch {epoch}, batch {self.progress.steps})"
        if self.bad_steps_in_a_row >= self.cfg.max_bad_steps:
            message = (
                f"training stopped: {self.bad_steps_in_a_row} non-finite losses in a row, the last at {where}; "
                "weights are those of the last good step; lower train.lr or check the data"
            )
            logger.error(message)
            raise TrainingDiverged(message)
        logger.warning("non-finite loss or gradient at %s: step skipped, weights unchanged", where)

    def _stop_signal(self) -> int | None:
        """The signal to stop on between epochs, agreed by all ranks: a SIGTERM that reached one
        rank first (or only) stops every rank at the same point, so no rank waits forever in a
        collective."""
        if not self.dist.enabled:
            return self.stop.signum
        flags = self.dist.all_reduce_sum(self._stop_flags())
        return signal_to_stop_on(flags.tolist())

    def _stop_flags(self) -> Tensor:
        """This rank's stop request, one device flag per HANDLED signal (set by a fill kernel: no
        copy from host memory, which on a GPU would wait for the queued work)."""
        flags = torch.zeros(len(HANDLED), device=self.device)
        if self.stop.signum is not None:
            flags[HANDLED.index(self.stop.signum)] = 1
        return flags

    def _stop_on_signal(self, signum: int, epoch: int) -> None:
        self.callbacks.on_interrupt(self, signum)
        raise TrainingInterrupted(signum, f"stopped on {signal_name(signum)} after step {self.step} (epoch {epoch})",
                                  after_callbacks=True)

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from the epoch after the last one done to train.epochs. Scoring the finished run
        (report.md) is the caller's: it reads a checkpoint, not the trainer."""
        self._log_start()
        self.stop.install()
        try:
            self.callbacks.on_fit_start(self)
            for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
                if self.stop_reason is not None:
                    break
                values = self.train_epoch(epoch)
                values.update(self.validate())
                self.epoch = epoch
                self.improved = values["valid_ssim"] > self.best_ssim
                self.best_ssim = max(self.best_ssim, values["valid_ssim"])
                self.callbacks.on_epoch_end(self, epoch, values)
                # After the last epoch too: its checkpoints are written, but the caller's final
                # report would still take minutes, and a stop request must not wait for that.
                signum = self._stop_signal()
                if signum is not None:
                    self._stop_on_signal(signum, epoch)
            if self.stop_reason is not None:
                logger.info("%s", self.stop_reason)
            self.callbacks.on_fit_end(self)
            if self.stop.signum is not None:  # arrived after the last check: nothing is left to agree on
                self._stop_on_signal(self.stop.signum, self.epoch)
        finally:
            self.stop.restore()
            self.callbacks.teardown(self)

    def request_stop(self, reason: str) -> None:
        """End `fit` normally after the current epoch (before the first, from on_fit_start), as if
        it were the last one planned; `reason` is logged."""
        self.stop_reason = reason

    def is_final_epoch(self, epoch: int) -> bool:
        """Whether `epoch`, once trained, ends the run: the last planned, or a stop was requested."""
        return epoch >= self.cfg.epochs or self.stop_reason is not None

    @property
    def finished(self) -> bool:
        """Whether the run is complete (all its epochs, or stopped early): time for its report."""
        return self.is_final_epoch(self.epoch)

    def _log_start(self) -> None:
        logger.info(
            "device %s | precision %s | %d train / %d valid images | alpha %g | %.2fM parameters",
            self.device, self.precision, len(self.data.train.images), len(self.data.valid.images), self.alpha,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
        )
        if self.dist.enabled:
            logger.info(
                "%d processes, global batch %d (%d per process), BatchNorm %s", self.dist.world_size,
                self.cfg.batch_size * self.dist.world_size, self.cfg.batch_size,
                "synchronised" if self.cfg.sync_batchnorm else "per process",
            )
        if self.epoch >= self.cfg.epochs:
            logger.info("nothing to do: %d of %d epochs already done", self.epoch, self.cfg.epochs)
        if self.cfg.warmup_steps >= self.planned_steps > self.step:
            logger.warning("train.warmup_steps (%d) is not shorter than the %d steps this run plans "
                           "(train.epochs x steps per epoch): the learning rate rises over the whole run, from "
                           "train.lr / %d, instead of training at train.lr", self.cfg.warmup_steps,
                           self.planned_steps, self.cfg.warmup_steps)
