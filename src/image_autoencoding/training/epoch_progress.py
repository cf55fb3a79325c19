"""How far the current epoch has got, saved in every checkpoint for an exact resume inside an epoch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

REPORT_EVERY = 10  # steps between showings of the running loss


@dataclass
class EpochProgress:
    """How far the current epoch has got. Saved in every checkpoint, so a run resumed inside an
    epoch skips the batches already done and ends the epoch with the loss sums (and metrics.csv
    row) an uninterrupted run would have had."""

    # Global batches (batch_size x processes) of this epoch done, skipped ones included: the same
    # count whatever the number of processes, so a resume with another number continues right.
    steps: int = 0
    # Counted on the device, read only when shown (a host read per step would wait for the GPU).
    sums: Tensor = field(default_factory=lambda: torch.zeros(2))  # recon, kl summed over images, all ranks
    images: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # in steps taken
    skipped: Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))  # non-finite steps
    seconds: float = 0.0

    def add(self, sums: Tensor, skipped: Tensor, images: int) -> None:
        """A step's result (device tensors): its sums and `images` count unless it was skipped."""
        self.steps += 1
        self.sums += torch.where(skipped, 0.0, sums)  # a skipped step's sums may be NaN: NaN x 0 is NaN
        self.images += (~skipped).long() * images
        self.skipped += skipped.long()

    def mean_losses(self) -> tuple[float, float]:
        """(recon, kl) per image so far (0, 0 before any step was taken); reads the device's sums."""
        recon, kl = (self.sums / self.images.clamp(min=1)).tolist()
        return recon, kl

    def images_per_second(self) -> float:
        return int(self.images) / max(self.seconds, 1e-9)

    def running_loss_due(self, epoch_steps: int) -> bool:
        """Whether the running loss is shown now (progress bar, TensorBoard): every REPORT_EVERY
        steps and at the epoch's last. Each showing waits for the device; the host decides it from
        its own count."""
        return self.steps % REPORT_EVERY == 0 or self.steps == epoch_steps

    def running_encoder_loss(self, alpha: float) -> float:
        recon, kl = self.mean_losses()
        return recon + alpha * kl

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps, "sums": self.sums.detach().cpu().clone(), "images": int(self.images),
                "skipped": int(self.skipped), "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> EpochProgress:
        state = state or {}

        def count(key: str) -> Tensor:
            return torch.full((), int(state.get(key, 0)), dtype=torch.int64, device=device)

        sums = state["sums"].to(device) if "sums" in state else torch.zeros(2, device=device)
        return cls(int(state.get("steps", 0)), sums, count("images"), count("skipped"),
                   float(state.get("seconds", 0.0)))
