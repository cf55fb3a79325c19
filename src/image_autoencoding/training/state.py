"""The training state a checkpoint holds, typed: what `Trainer.state()` writes and every reader
(resume, loading, export, the VAE-GAN's discriminator) reads, through `to_dict` / `from_dict`.

On disk it is a flat dict of tensors and plain values (so `torch.load(weights_only=True)` reads it):
each network's state dict under its own key ("model", "discriminator"; "ema", the average of the
VAE's weights, with its "ema_updates", only from runs with train.ema_decay), each optimizer's under
"<network>_optimizer", then the counters, the RNG states, the monitor's marks, the callbacks' state
and the config. Format 1 (before train.monitor) kept the best validation SSIM as "best_ssim" and
early stopping's mark among the callbacks; it is read as a monitor of valid_ssim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from image_autoencoding.training.rng import rng_state_problem

FORMAT_VERSION = 2
# Keys of networks' state dicts, in every format; "ema": the weight average (training/ema.py);
# "ldm_loss": model.mode=ldm's logvar and step count.
NETWORKS = ("model", "discriminator", "ema", "ldm_loss")
OPTIMIZERS = ("encoder", "decoder", "discriminator")  # "<name>_optimizer" keys
# What every checkpoint holds; a file without these is not ours, whatever else it has.
REQUIRED_KEYS = ("format_version", "model", "encoder_optimizer", "decoder_optimizer", "epoch", "step", "rng",
                 "config")


class StateProblem(ValueError):
    """A saved state that is not what the trainer writes; the message says what of "the checkpoint":
    "is not an image-autoencoding checkpoint", "has format ...", "cannot be used: <key> is ..."."""


@dataclass
class TrainingState:
    networks: dict[str, dict[str, torch.Tensor]]  # "model" (the VAE), "discriminator" (vae-gan, ldm), "ema", "ldm_loss"
    optimizers: dict[str, dict[str, Any]]  # "encoder", "decoder", "discriminator"
    epoch: int  # epochs completed
    step: int  # training steps done, skipped ones included
    rng: dict[str, Any]  # training/rng.rng_state(): every rank's, since they are kept equal
    config: dict[str, Any]  # Config.to_dict() of the run that saved it
    scaler: dict[str, Any] | None = None  # GradScaler's (fp16 loss scaling)
    epoch_progress: dict[str, Any] = field(default_factory=dict)  # EpochProgress.state(); {} at an epoch's end
    bad_steps_in_a_row: int = 0
    world_size: int = 1  # processes of the run that saved it
    monitor: dict[str, Any] = field(default_factory=dict)  # Monitor.state_dict()
    callbacks: dict[str, Any] = field(default_factory=dict)  # Callbacks.state_dict()
    ema_updates: int | None = None  # the optimizer steps in networks["ema"] (training/ema.py); None: no average
    format_version: int = FORMAT_VERSION

    @property
    def model(self) -> dict[str, torch.Tensor]:
        """The VAE's weights as trained (what a resume continues)."""
        return self.networks["model"]

    @property
    def inference_weights(self) -> dict[str, torch.Tensor]:
        """The VAE's weights that are the run's model for everything that uses it (evaluate, sample,
        report, export, the Python API): the average of train.ema_decay when the run kept one, as
        validation scored it; else the trained weights."""
        return self.networks.get("ema", self.model)

    @property
    def inside_epoch(self) -> bool:
        """Saved with part of an epoch done (a resume continues that epoch's batches)."""
        return int(self.epoch_progress.get("steps", 0)) > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            **self.networks,
            **{f"{name}_optimizer": state for name, state in self.optimizers.items()},
            "epoch": self.epoch, "step": self.step, "epoch_progress": self.epoch_progress,
            "bad_steps_in_a_row": self.bad_steps_in_a_row, "scaler": self.scaler, "rng": self.rng,
            "world_size": self.world_size, "monitor": self.monitor, "callbacks": self.callbacks,
            "config": self.config,
            # Only with an average: a run without one writes what it always wrote.
            **({"ema_updates": self.ema_updates} if self.ema_updates is not None else {}),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainingState:
        """A state as `to_dict` wrote it (this format or an older one). Raises StateProblem naming
        the first key whose value is not of the kind the trainer writes (model=5, epoch="three"),
        so that such a file is refused in one line instead of failing inside torch or the trainer."""
        problem = _contents_problem(raw)
        if problem:
            raise StateProblem(problem)
        callbacks = dict(raw.get("callbacks") or {})
        monitor = raw.get("monitor")
        if raw["format_version"] < 2:
            monitor, callbacks = _format_1_monitor(raw, callbacks)
        return cls(
            networks={key: raw[key] for key in NETWORKS if key in raw},
            optimizers={name: raw[f"{name}_optimizer"] for name in OPTIMIZERS if f"{name}_optimizer" in raw},
            epoch=raw["epoch"], step=raw["step"], rng=raw["rng"], config=raw["config"], scaler=raw.get("scaler"),
            epoch_progress=raw.get("epoch_progress") or {}, bad_steps_in_a_row=raw.get("bad_steps_in_a_row", 0),
            world_size=raw.get("world_size", 1), monitor=monitor or {}, callbacks=callbacks,
            ema_updates=raw.get("ema_updates"),
            format_version=raw["format_version"],
        )


def _format_1_monitor(raw: dict[str, Any], callbacks: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Format 1's validation-SSIM marks as the monitor's: the best from "best_ssim" (-inf before any
    epoch), the last gain from early stopping's state when it was on, else the saved epoch (as
    early stopping switched on at a resume counted from there)."""
    best = raw.get("best_ssim", float("-inf"))
    best = None if best == float("-inf") else float(best)
    early = callbacks.pop("early_stopping", None) or {}
    gain, gain_epoch = (early.get("best"), int(early.get("best_epoch", 0))) if early else (best, raw["epoch"])
    return {"name": "valid_ssim", "best": best, "best_epoch": raw["epoch"] if best is not None else 0,
            "gain": gain, "gain_epoch": gain_epoch}, callbacks


def _contents_problem(state: Any) -> str | None:
    """What is wrong, said of the checkpoint: "is not ...", "has format ...", "cannot be used: ..."."""
    if not isinstance(state, dict) or any(key not in state for key in REQUIRED_KEYS):
        return "is not an image-autoencoding checkpoint"
    if _is_whole(state["format_version"], 1) and state["format_version"] > FORMAT_VERSION:
        return f"has format {state['format_version']}; this version reads up to {FORMAT_VERSION}"
    problem = _value_problem(state)
    return f"cannot be used: {problem}" if problem else None


def _value_problem(state: dict[str, Any]) -> str | None:
    if not _is_whole(state["format_version"], 1):
        return _wrong("format_version", state["format_version"], "a whole number >= 1")
    for key in NETWORKS:
        if key in state and (problem := _state_dict_problem(key, state[key])):
            return problem
    for key in (f"{name}_optimizer" for name in OPTIMIZERS):
        if key in state and (problem := _optimizer_problem(key, state[key])):
            return problem
    for key, least in (("epoch", 0), ("step", 0), ("bad_steps_in_a_row", 0), ("world_size", 1), ("ema_updates", 0)):
        if key in state and not _is_whole(state[key], least):
            return _wrong(key, state[key], f"a whole number >= {least}")
    if "ema" in state and "ema_updates" not in state:
        return _wrong("ema_updates", None, "a whole number >= 0 (the steps in the weight average 'ema')")
    for key in ("config", "callbacks", "scaler", "monitor"):
        if key in state and not isinstance(state[key], dict) and not (key == "scaler" and state[key] is None):
            return _wrong(key, state[key], "a dict")
    if "best_ssim" in state and not _is_number(state["best_ssim"]):
        return _wrong("best_ssim", state["best_ssim"], "a number")
    if (problem := _monitor_problem(state.get("monitor") or {})):
        return problem
    if state.get("epoch_progress") is not None and (problem := _progress_problem(state["epoch_progress"])):
        return problem
    return rng_state_problem(state["rng"])


def _monitor_problem(monitor: dict[str, Any]) -> str | None:
    """training/monitor.Monitor.state_dict(); {} before any epoch was validated."""
    if not monitor:
        return None
    if not isinstance(monitor.get("name"), str):
        return _wrong("monitor.name", monitor.get("name"), "a metric name")
    for key in ("best", "gain"):
        if monitor.get(key) is not None and not _is_number(monitor[key]):
            return _wrong(f"monitor.{key}", monitor[key], "a number or None")
    for key in ("best_epoch", "gain_epoch"):
        if not _is_whole(monitor.get(key), 0):
            return _wrong(f"monitor.{key}", monitor.get(key), "a whole number >= 0")
    return None


def _state_dict_problem(key: str, value: Any) -> str | None:
    if not isinstance(value, dict):
        return _wrong(key, value, "a state dict (names -> tensors)")
    for name, tensor in value.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            return _wrong(f"{key}[{name!r}]", tensor, "a tensor")
    return None


def _optimizer_problem(key: str, value: Any) -> str | None:
    if not (isinstance(value, dict) and isinstance(value.get("state"), dict)
            and isinstance(value.get("param_groups"), list)):
        return _wrong(key, value, "an optimizer state dict (state, param_groups)")
    for group in value["param_groups"]:
        if not (isinstance(group, dict) and isinstance(group.get("params"), list)
                and all(_is_whole(index, 0) for index in group["params"])):
            return _wrong(f"{key}.param_groups[]", group, "a dict whose params are parameter numbers")
    for index, entry in value["state"].items():
        if not isinstance(entry, dict):
            return _wrong(f"{key}.state[{index!r}]", entry, "a dict")
    return None


def _progress_problem(progress: Any) -> str | None:
    """training/epoch_progress.EpochProgress.state(); empty before the epoch's first step."""
    if not isinstance(progress, dict):
        return _wrong("epoch_progress", progress, "a dict")
    if not progress:
        return None
    for key in ("steps", "images", "skipped"):
        if not _is_whole(progress.get(key), 0):
            return _wrong(f"epoch_progress.{key}", progress.get(key), "a whole number >= 0")
    sums = progress.get("sums")
    if not (isinstance(sums, torch.Tensor) and sums.is_floating_point() and sums.shape == (2,)):
        return _wrong("epoch_progress.sums", sums, "2 floating-point numbers in a tensor")
    if not _is_number(progress.get("seconds")):
        return _wrong("epoch_progress.seconds", progress.get("seconds"), "a number")
    return None


def _is_whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _wrong(key: str, value: Any, expected: str) -> str:
    """'key is <value>, expected ...': numbers and short strings shown, anything else by its type."""
    if value is None or isinstance(value, bool | int | float | str):
        shown = repr(value if not isinstance(value, str) else value[:40])
    else:
        shown = f"a {type(value).__name__}"
    return f"{key} is {shown}, expected {expected}"
