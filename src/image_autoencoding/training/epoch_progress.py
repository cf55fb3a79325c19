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
    sums: Tensor = field(default_factory=lambda: torch.zeros(2))  # recon, kl summed over images, all ranks
    images: int = 0  # images (of all ranks) in the steps that were not skipped
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    seconds: float = 0.0

    def mean_losses(self) -> tuple[float, float]:
        """(recon, kl) per image so far (0, 0 before any step was taken); reads the device's sums."""
        recon, kl = (self.sums / max(self.images, 1)).tolist()
        return recon, kl

    def running_loss_due(self, epoch_steps: int) -> bool:
        """Whether the running loss is shown now (progress bar, TensorBoard): every REPORT_EVERY
        steps and at the epoch's last, once a step was taken. Each showing waits for the device."""
        return self.images > 0 and (self.steps % REPORT_EVERY == 0 or self.steps == epoch_steps)

    def running_encoder_loss(self, alpha: float) -> float:
        recon, kl = self.mean_losses()
        return recon + alpha * kl

    def state(self) -> dict[str, Any]:
        return {"steps": self.steps, "sums": self.sums.detach().cpu().clone(), "images": self.images,
                "skipped": self.skipped, "seconds": self.seconds}

    @classmethod
    def from_state(cls, state: dict[str, Any] | None, device: torch.device) -> EpochProgress:
        if not state:
            return cls(sums=torch.zeros(2, device=device))
        return cls(int(state["steps"]), state["sums"].to(device), int(state["images"]),
                   int(state["skipped"]), float(state["seconds"]))
