"""The training loop: one backward pass per step, separate encoder and decoder optimizers, bf16
autocast where the device has it, and everything a run writes into its run folder."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ExponentialLR
from tqdm import tqdm

from image_autoencoding.config import Config, TrainConfig, save_config
from image_autoencoding.data.batches import Normalizer, steps_per_epoch, training_batches
from image_autoencoding.data.image_data import ImageData
from image_autoencoding.evaluation.evaluate import evaluate_split
from image_autoencoding.models.vae import VAE, build_model, loss_terms, training_objective
from image_autoencoding.training.checkpoint import prune_epoch_checkpoints, publish_as, save_checkpoint
from image_autoencoding.training.device import autocast_factory, resolve_device, resolve_precision
from image_autoencoding.training.metrics_log import MetricsLog
from image_autoencoding.visualization.grids import save_reconstruction_grid, save_sample_grid

logger = logging.getLogger("image_autoencoding")

LOG_EVERY = 10  # steps between progress-bar / TensorBoard updates (each one waits for the device)


def build_optimizers(model: VAE, cfg: TrainConfig) -> tuple[Optimizer, Optimizer]:
    """One optimizer per network, as in the original (RMSprop alpha 0.9, eps 1e-8)."""

    def make(params) -> Optimizer:
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, eps=1e-8, weight_decay=cfg.weight_decay)

    return make(model.encoder.parameters()), make(model.decoder.parameters())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain values (never pickled numpy objects), for weights_only loading."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, config: Config, run_dir: Path, data: ImageData, resume: dict[str, Any] | None = None):
        self.config = config
        self.cfg = config.train
        self.run_dir = run_dir
        self.data = data
        self.device = resolve_device(self.cfg.device)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.autocast = autocast_factory(self.device, self.precision)
        self.normalize = Normalizer(config.data, self.device)
        self.alpha = self.cfg.kl_weight

        seed_everything(self.cfg.seed)
        self.model = build_model(config.model, config.data.image_size).to(self.device)
        if self.cfg.channels_last:
            # Batches from `Normalizer` are NHWC in memory already (a permuted uint8 NHWC array).
            self.model = self.model.to(memory_format=torch.channels_last)
        # The module that runs training steps; self.model stays the one whose weights are saved.
        self.forward = torch.compile(self.model) if self.cfg.compile else self.model
        self.encoder_optimizer, self.decoder_optimizer = build_optimizers(self.model, self.cfg)
        self.encoder_scheduler = ExponentialLR(self.encoder_optimizer, gamma=self.cfg.decay_lr)
        self.decoder_scheduler = ExponentialLR(self.decoder_optimizer, gamma=self.cfg.decay_lr)
        self.epoch = 0  # epochs completed
        self.step = 0  # optimizer steps completed
        self.metrics = MetricsLog(run_dir / "metrics.csv")
        self.best_ssim = float("-inf")
        if resume is not None:
            self._restore(resume)

        # Fixed images and latent vectors, so pictures from different epochs compare.
        self.picture_generator_seed = self.cfg.seed + 7
        self.fixed_train = np.array(data.train.images[: self.cfg.grid_images])
        self.fixed_valid = np.array(data.valid.images[: self.cfg.grid_images])
        generator = torch.Generator().manual_seed(self.picture_generator_seed)
        self.fixed_latents = torch.randn(self.cfg.sample_images, config.model.latent_dim, generator=generator)

    # -- state -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "encoder_optimizer": self.encoder_optimizer.state_dict(),
            "decoder_optimizer": self.decoder_optimizer.state_dict(),
            "encoder_scheduler": self.encoder_scheduler.state_dict(),
            "decoder_scheduler": self.decoder_scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": rng_state(),
            "best_ssim": self.best_ssim,
            "config": self.config.to_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        self.decoder_optimizer.load_state_dict(state["decoder_optimizer"])
        self.encoder_scheduler.load_state_dict(state["encoder_scheduler"])
        self.decoder_scheduler.load_state_dict(state["decoder_scheduler"])
        # The scheduler state carries the old gamma; a resumed run uses the configured one.
        self.encoder_scheduler.gamma = self.decoder_scheduler.gamma = self.cfg.decay_lr
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.best_ssim = float(state.get("best_ssim", float("-inf")))
        set_rng_state(state["rng"])
        self.metrics.keep_epochs_up_to(self.epoch)

    # -- one step / one epoch --------------------------------------------------------------------

    def train_step(self, x: Tensor) -> Tensor:
        """One optimisation step; returns detached per-batch sums (recon, kl) without syncing."""
        with self.autocast():
            x_hat, posterior = self.forward(x)
        recon, kl = loss_terms(x, x_hat, posterior)
        loss = training_objective(recon, kl, self.alpha)
        self.encoder_optimizer.zero_grad(set_to_none=True)
        self.decoder_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.encoder_optimizer.step()
        self.decoder_optimizer.step()
        self.step += 1
        return torch.stack([recon.sum(), kl.sum()]).detach()

    def train_epoch(self, epoch: int, writer) -> dict[str, float]:
        self.model.train()
        images = self.data.train.images
        total_steps = steps_per_epoch(len(images), self.cfg.batch_size, self.cfg.max_steps_per_epoch)
        sums = torch.zeros(2, device=self.device)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            total=total_steps, desc=f"epoch {epoch}/{self.cfg.epochs}", unit="step",
            disable=not self.cfg.progress, leave=False, dynamic_ncols=True,
        )
        batches = training_batches(
            images, self.cfg.batch_size, self.cfg.seed, epoch, self.device, self.normalize,
            self.cfg.max_steps_per_epoch,
        )
        for step_in_epoch, x in enumerate(batches, start=1):
            sums += self.train_step(x)
            seen += x.shape[0]
            bar.update(1)
            if step_in_epoch % LOG_EVERY == 0 or step_in_epoch == total_steps:
                recon, kl = (sums / seen).tolist()
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{recon + self.alpha * kl:.1f}", img_s=f"{rate:.0f}")
                writer.add_scalar("train/step_encoder_loss", recon + self.alpha * kl, self.step)
        bar.close()
        seconds = time.perf_counter() - start
        recon, kl = (sums / max(seen, 1)).tolist()
        return {
            "encoder_loss": recon + self.alpha * kl,
            "decoder_loss": recon,
            "recon": recon,
            "kl": kl,
            "images_per_s": seen / seconds,
            "seconds": seconds,
            "lr": self.encoder_optimizer.param_groups[0]["lr"],
        }

    def validate(self) -> dict[str, float]:
        """Losses and per-image metrics on the validation split (the first train.eval_images)."""
        evaluation = evaluate_split(
            self.model, self.data.valid.images, self.normalize, self.device, self.cfg.batch_size, self.autocast,
            self.cfg.eval_images,
        )
        return evaluation.means(prefix="valid_")

    @torch.no_grad()
    def save_pictures(self, epoch: int) -> None:
        self.model.eval()
        images_dir = self.run_dir / "images"
        for split, pixels in (("train", self.fixed_train), ("valid", self.fixed_valid)):
            x = self.normalize(torch.from_numpy(pixels).to(self.device))
            with self.autocast():
                x_hat = self.model.reconstruct(x)
            save_reconstruction_grid(
                self.normalize.to_unit(x), self.normalize.to_unit(x_hat),
                images_dir / split / f"reconstruction_epoch_{epoch:03d}.png",
            )
        with self.autocast():
            samples = self.model.decoder(self.fixed_latents.to(self.device))
        save_sample_grid(self.normalize.to_unit(samples), images_dir / "samples" / f"samples_epoch_{epoch:03d}.png")

    # -- the run ---------------------------------------------------------------------------------

    def save_epoch_checkpoint(self) -> Path:
        """epoch_N.pt, with last.pt as a second name for the same file (no second write)."""
        folder = self.run_dir / "checkpoints"
        path = folder / f"epoch_{self.epoch}.pt"
        save_checkpoint(self.state(), path)
        publish_as(path, folder / "last.pt")
        prune_epoch_checkpoints(folder, self.cfg.keep_checkpoints)
        return path

    def fit(self) -> Path:
        from torch.utils.tensorboard import SummaryWriter

        save_config(self.config, self.run_dir / "config.yaml")
        logger.info(
            "run folder %s | device %s | precision %s | %d train / %d valid images | alpha %g | %.1fM parameters",
            self.run_dir, self.device, self.precision, len(self.data.train.images),
            len(self.data.valid.images), self.alpha, sum(p.numel() for p in self.model.parameters()) / 1e6,
        )
        if self.epoch >= self.cfg.epochs:
            logger.info("nothing to do: %d of %d epochs already done", self.epoch, self.cfg.epochs)
        writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        try:
            for epoch in range(self.epoch + 1, self.cfg.epochs + 1):
                values = self.train_epoch(epoch, writer)
                self.encoder_scheduler.step()
                self.decoder_scheduler.step()
                values.update(self.validate())
                self.epoch = epoch
                self.metrics.append({"epoch": epoch, "step": self.step, **values})
                for key, value in values.items():
                    writer.add_scalar(f"epoch/{key}", value, epoch)
                writer.flush()
                self.save_pictures(epoch)
                logger.info(
                    "epoch %d/%d  encoder loss %.2f  recon %.2f  kl %.2f  valid recon %.2f  %.0f img/s",
                    epoch, self.cfg.epochs, values["encoder_loss"], values["recon"], values["kl"],
                    values["valid_recon"], values["images_per_s"],
                )
                improved = values["valid_ssim"] > self.best_ssim
                self.best_ssim = max(self.best_ssim, values["valid_ssim"])
                saved = None
                if epoch % self.cfg.checkpoint_every == 0 or epoch == self.cfg.epochs:
                    saved = self.save_epoch_checkpoint()
                if improved:
                    self.save_best(saved)
        finally:
            writer.close()
        if self.epoch >= self.cfg.epochs:
            self.final_report()
        return self.run_dir

    def save_best(self, saved: Path | None) -> None:
        """checkpoints/best.pt: the epoch with the highest validation SSIM so far."""
        best = self.run_dir / "checkpoints" / "best.pt"
        if saved is not None:
            publish_as(saved, best)  # the same bytes under a second name; pruning epoch_N.pt keeps them
        else:
            save_checkpoint(self.state(), best)

    def final_report(self) -> None:
        from image_autoencoding.evaluation.run_report import evaluate_run, metrics_table

        document = evaluate_run(self.run_dir, "best", data=self.data, device=str(self.device))
        logger.info(
            "validation metrics of %s (epoch %d, %d images), written to metrics.json and report.md:\n%s",
            Path(document["checkpoint"]).name, document["epoch"], document["images"], metrics_table(document),
        )
