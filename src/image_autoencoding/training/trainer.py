"""The training loop: epochs of steps (the objective's step object, training/steps/), validation,
the monitored metric, stop signals; bf16 autocast where the device has it. The trainer writes no
files: the run folder's checkpoints, metrics.csv, TensorBoard and pictures are callbacks (runs/),
given by whoever runs it."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from image_autoencoding.config import Config
from image_autoencoding.data.batches import Normalizer, steps_per_epoch
from image_autoencoding.data.device_split import training_split
from image_autoencoding.data.image_data import ImageData
from image_autoencoding.errors import UserError
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.models.factory import build_model
from image_autoencoding.runtime import (
    autocast_factory,
    keep_freed_memory,
    resolve_precision,
    use_cuda_graphs,
    use_tf32,
)
from image_autoencoding.training.callbacks import Callback, Callbacks
from image_autoencoding.training.cuda_graph import GraphedStep
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
from image_autoencoding.training.monitor import Monitor
from image_autoencoding.training.rng import rng_state, seed_everything, set_rng_state
from image_autoencoding.training.sharded_evaluation import evaluate_split_across_ranks
from image_autoencoding.training.skipped_steps import SkippedSteps
from image_autoencoding.training.state import TrainingState
from image_autoencoding.training.steps import StepResult, build_training_step
from image_autoencoding.training.sync_batchnorm import convert_batchnorm

logger = logging.getLogger("image_autoencoding")


class TrainingDiverged(UserError):
    """Too many non-finite losses in a row; the message gives the step and the batch."""


class Trainer:
    """`dist` says which of the torchrun processes this is (every rank trains); `resume` a
    checkpoint's state to continue from; `callbacks` run at the named points of `fit`
    (callbacks.py): runs/run_callbacks.py has those that write a run folder.

    What callbacks may read: `config`, `cfg` (its train section), `data`, `dist`, `device`,
    `autocast`, `normalize`, `alpha` (the KL weight after warm-up), `model` (the VAE being trained),
    `training_step` (its networks, optimizers and objective module; `inference_model`: the VAE
    validation scores, the weights' average with train.ema_decay), `epoch` (epochs
    done), `step` (steps done), `progress` and `epoch_steps` (the epoch under way), `metrics` (the
    last epoch's metrics.csv row), `monitor` (train.monitor's marks; `monitor.improved`: the last
    epoch is the best so far), `state()`, `request_stop()`, `plan()` and `is_final_epoch()`."""

    def __init__(
        self, config: Config, data: ImageData, resume: TrainingState | None = None,
        dist: Distributed = SINGLE, callbacks: Sequence[Callback] = (),
    ):
        self.config = config
        self.cfg = config.train
        self.data = data
        self.dist = dist
        self.device = dist.device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.tf32 = use_tf32(self.cfg.tf32, self.device)
        self.cuda_graphs, self._cuda_graphs_why = use_cuda_graphs(self.cfg.cuda_graphs, self.device, self.precision,
                                                                  dist.world_size)
        # Autocast's cache of casted weights does not survive a graph's replay (torch.cuda.graphs).
        self.autocast = autocast_factory(self.device, self.precision, cache=not self.cuda_graphs)
        if self.device.type == "cpu" and self.cfg.reuse_cpu_memory:
            keep_freed_memory()
        self.normalize = Normalizer(config.data, self.device)
        self.train_split = training_split(data.train.images, config.data.on_device, self.device)
        logger.info("training batches: %s", self.train_split.description)
        self.alpha = self.cfg.kl_weight(dist.world_size)

        seed_everything(self.cfg.seed)
        # A resumed run's weights come from its checkpoint: the folder model.init_from names (a
        # diffusers autoencoder a run started from) is not read again, and may have moved.
        self.model = build_model(config.model, config.data.image_size, init_weights=resume is None).to(self.device)
        if dist.enabled and self.cfg.sync_batchnorm:
            self.model = convert_batchnorm(self.model, self.device)
        if self.cfg.channels_last:
            # Batches from `Normalizer` are NHWC in memory already (a permuted uint8 NHWC array).
            self.model = self.model.to(memory_format=torch.channels_last)
        # The objective's networks, optimizers and gradients (model.mode; training/steps/).
        self.training_step = build_training_step(config, self.model, self.device, dist, self.autocast,
                                                 self.precision)
        # The step as the loop calls it: replayed CUDA graphs, captured at the first step of each
        # kind (after _restore below), or the step object itself.
        self._run_step = GraphedStep(self.training_step) if self.cuda_graphs else self.training_step
        # The horizon of train.lr_schedule=cosine: every planned epoch, or plan()'s steps.
        self.planned_steps = self.cfg.epochs * steps_per_epoch(
            len(data.train.images), self.cfg.batch_size, self.cfg.max_steps_per_epoch, dist.world_size)
        self.epoch = 0  # epochs completed
        self.step = 0  # training steps done (batches drawn), skipped ones included
        self.progress = EpochProgress.from_state(None, self.device)
        self.epoch_steps = 0  # steps of the epoch being trained (set by train_epoch)
        # Non-finite steps, counted on the device and read when the running loss is shown.
        self.skipped_steps = SkippedSteps(self.cfg.max_bad_steps, self.device)
        self.metrics: dict[str, float] = {}  # the last epoch's metrics.csv row
        self.monitor = Monitor(self.cfg.monitor, self.cfg.early_stopping_min_delta)
        self.stop = StopRequests()  # installed for the duration of fit()
        self.stop_reason: str | None = None  # set by request_stop: fit ends after the current epoch
        self._max_steps: int | None = None  # plan(): the run ends after this many steps
        # Behaviour the config asks for comes first, so that the run folder's callbacks see its
        # decisions (early stopping's) in the same epoch.
        early_stopping = [EarlyStopping(self.cfg.early_stopping_patience)] if self.cfg.early_stopping_patience else []
        self.callbacks = Callbacks([*early_stopping, *callbacks])
        self._agreed_stop: int | None = None  # under torchrun: the signal all ranks agreed to stop on
        if resume is not None:
            self._restore(resume)

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> TrainingState:
        step = self.training_step.state_dict()
        return TrainingState(
            networks=step["networks"], optimizers=step["optimizers"], scaler=step["scaler"],
            ema_updates=step.get("ema_updates"),
            epoch=self.epoch, step=self.step, epoch_progress=self.progress.state(),
            bad_steps_in_a_row=int(self.skipped_steps.in_a_row),
            # Every rank's RNG state is rank 0's (see steps/noise.py), so one state resumes them all.
            rng=rng_state(), world_size=self.dist.world_size, monitor=self.monitor.state_dict(),
            callbacks=self.callbacks.state_dict(), config=self.config.to_dict(),
        )

    def _restore(self, state: TrainingState) -> None:
        self.training_step.load_state_dict(state.networks, state.optimizers, state.scaler, state.ema_updates)
        self.epoch = state.epoch
        self.step = state.step
        self.progress = EpochProgress.from_state(state.epoch_progress, self.device)
        self.skipped_steps = SkippedSteps(self.cfg.max_bad_steps, self.device, state.bad_steps_in_a_row)
        if state.monitor and not self.monitor.load_state_dict(state.monitor):
            logger.info("train.monitor is %s, the checkpoint's marks are of %s: best.pt and early stopping "
                        "count %s from epoch %d on", self.monitor.name, state.monitor.get("name"),
                        self.monitor.name, self.epoch + 1)
        set_rng_state(state.rng)
        self.callbacks.load_state_dict(state.callbacks)

    # -- one step / one epoch --------------------------------------------------------------------

    def train_step(self, x: Tensor) -> StepResult:
        """One optimisation step of every network (training/steps/), queued without waiting for the
        device. Returns device tensors: the batch sums (recon, kl) and the flag `skipped` (a loss or
        a gradient was not finite: then weights, optimizer state, BatchNorm statistics and the
        weight average are exactly as before)."""
        alpha = self.cfg.kl_weight(self.dist.world_size, self.step)  # ramps up over kl_warmup_steps
        result = self._run_step(x, alpha, self.step, self._stop_flags() if self.dist.enabled else None)
        self.step += 1
        if self.dist.enabled:
            # The one host wait per step under torchrun: every rank must stop at the same step.
            self._agreed_stop = signal_to_stop_on(result.flags.tolist())
        return result

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> dict[str, float]:
        """The rest of `epoch`: all of it, or what follows the checkpoint this run resumed from.
        `max_steps`: end the epoch after this many steps (default train.max_steps_per_epoch)."""
        self.model.train()
        images, world = self.data.train.images, self.dist.world_size
        max_steps = self.cfg.max_steps_per_epoch if max_steps is None else max_steps
        self.epoch_steps = steps_per_epoch(len(images), self.cfg.batch_size, max_steps, world)
        progress = self.progress
        start = time.perf_counter() - progress.seconds
        batches = self.train_split.batches(
            self.cfg.batch_size, self.cfg.seed, epoch, self.normalize,
            max_steps, start_step=progress.steps, rank=self.dist.rank, world_size=world,
            flip=self.config.data.random_flip,
        )
        self.callbacks.on_epoch_start(self, epoch)
        for x in batches:
            self.callbacks.on_step_start(self)
            self.set_learning_rate(epoch)
            result = self.train_step(x)
            # Every rank's share is full (see training_batches).
            progress.add(result.sums, result.skipped, x.shape[0] * world)
            self.skipped_steps.count(result.skipped, self.step, progress.steps)
            progress.seconds = time.perf_counter() - start
            if progress.running_loss_due(self.epoch_steps):
                self._report_skipped_steps(epoch)
            self.callbacks.on_step_end(self, x, result)
            # Under torchrun, the signals the ranks agreed on in this step's packet: a signal that
            # arrives after the packet was sent stops every rank after the next step.
            signum = self._agreed_stop if self.dist.enabled else self.stop.signum
            if signum is not None:
                self._stop_on_signal(signum, epoch)
            if self._max_steps is not None and self.step >= self._max_steps:
                break
        self._report_skipped_steps(epoch)  # waits for the device: the epoch's seconds include its work
        seconds = time.perf_counter() - start
        recon, kl = progress.mean_losses()
        self.progress = EpochProgress.from_state(None, self.device)
        return {  # the training columns of metrics.csv (runs/metrics_log.py)
            "train_loss": progress.running_encoder_loss(self.alpha),
            "train_recon": recon,
            "train_kl": kl,
            "images_per_s": int(progress.images) / seconds,
            "seconds": seconds,
            "lr": self.training_step.learning_rate,
            "skipped_steps": int(progress.skipped),
            **self.training_step.take_stats(),  # the objective's own terms (training/steps/)
        }

    def set_learning_rate(self, epoch: int) -> None:
        """The encoder's and decoder's rate for the next step (training/lr_schedule.py); the
        discriminator's (VAE-GAN) stays train.discriminator_lr."""
        self.training_step.set_learning_rate(learning_rate(self.cfg, self.step, epoch, self.planned_steps))

    def validate(self) -> dict[str, float]:
        """Losses and per-image metrics on the validation split (the first train.eval_images); under
        torchrun each rank scores a contiguous share and the per-image values are gathered, so the
        means are those of one process scoring every image. With train.ema_decay it scores the
        weights' average, the model that best.pt and every reader of a checkpoint take."""
        model = self.training_step.inference_model
        if self.dist.enabled:
            per_image = evaluate_split_across_ranks(
                model, self.data.valid.images, self.normalize, self.device, self.cfg.batch_size,
                self.autocast, self.cfg.eval_images, self.dist,
            )
            return {f"valid_{name}": float(values.mean()) for name, values in per_image.items()}
        evaluation = evaluate_split(
            model, self.data.valid.images, self.normalize, self.device, self.cfg.batch_size, self.autocast,
            self.cfg.eval_images,
        )
        return evaluation.means(prefix="valid_")

    def _report_skipped_steps(self, epoch: int) -> None:
        """Reads the device's count of skipped steps (one host wait, when the running loss is
        shown and at the epoch's end): a warning for those since the last read, and the stop when
        train.max_bad_steps were skipped in a row, naming the step that made them so many."""
        since = self.skipped_steps.read()
        if since.limit_reached_at is not None:
            message = (
                f"training stopped: {self.cfg.max_bad_steps} non-finite losses in a row, the last at "
                f"{self._where(since.limit_reached_at, epoch)}; "
                "weights are those of the last good step; lower train.lr or check the data"
            )
            logger.error(message)
            raise TrainingDiverged(message)
        if since.count == 1:
            logger.warning("non-finite loss or gradient at %s: step skipped, weights unchanged",
                           self._where(since.last, epoch))
        elif since.count > 1:
            logger.warning("non-finite loss or gradient in %d steps, the last at %s: steps skipped, weights unchanged",
                           since.count, self._where(since.last, epoch))

    @staticmethod
    def _where(step: tuple[int, int], epoch: int) -> str:
        """A step as the messages name it; every read is inside the epoch of the steps it names."""
        return f"step {step[0]} (epoch {epoch}, batch {step[1]})"

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

    def fit(self, max_steps: int | None = None) -> None:
        """Train from the epoch after the last one done to train.epochs. `max_steps`: end the run
        once this many steps are done in all (benchmarks train a fixed number of images): the epoch
        under way is cut short there, validated and ended as the run's last, and the learning-rate
        schedule plans for exactly that many steps. Scoring the finished run (report.md) is the
        caller's: it reads a checkpoint, not the trainer."""
        if max_steps is not None:
            self.plan(max_steps)
        self._log_start()
        self.stop.install()
        try:
            self.callbacks.on_fit_start(self)
            for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
                if self.stop_reason is not None or self._steps_spent():
                    break
                values = self.train_epoch(epoch)
                values.update(self.validate())
                self.epoch = epoch
                if self._steps_spent():
                    self.request_stop(f"stopped after step {self.step} of fit(max_steps={self._max_steps})")
                self.metrics = values
                self.monitor.update(epoch, values)
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

    def plan(self, max_steps: int) -> None:
        """End the run once `max_steps` steps are done in all, and plan the learning-rate schedule
        for exactly that many; a callback may re-plan at an epoch's end (a benchmark training for a
        wall-clock budget re-plans from its own pace)."""
        self._max_steps = self.planned_steps = max_steps

    def _steps_spent(self) -> bool:
        return self._max_steps is not None and self.step >= self._max_steps

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
        if self.device.type == "cuda":
            logger.info("fp32 matrix products and convolutions: %s (train.tf32) | CUDA graphs: %s (%s)",
                        "TF32" if self.tf32 else "full fp32", "on" if self.cuda_graphs else "off",
                        self._cuda_graphs_why)
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
