"""model.arch=autoencoder-kl: diffusers' AutoencoderKL (the autoencoder of latent diffusion, Rombach
et al. 2022: Stable Diffusion's VAE) as this package's encoder and decoder.

diffusers' model is split into the two networks the rest of the package trains and saves:

    AutoencoderKLEncoder: diffusers' `encoder`, then `quant_conv` -> mean and log-variance, each
                          (N, latent_channels, side, side), flattened to (N, latent floats)
    AutoencoderKLDecoder: (N, latent floats) -> (N, latent_channels, side, side), `post_quant_conv`,
                          then diffusers' `decoder` -> image (the [-1, 1] range, not clamped: as diffusers')

Each network's state dict keys are diffusers' own (`encoder.conv_in.weight`, `quant_conv.weight`;
`post_quant_conv.weight`, `decoder.conv_out.weight`), so the two together are an AutoencoderKL's
state dict (`to_diffusers`). The log-variance is clamped by DiagonalGaussian to model.logvar_min /
logvar_max, [-30, 20] by default, as diffusers' DiagonalGaussianDistribution clamps it.

diffusers is an optional dependency, imported when one of these models is built.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from image_autoencoding.config import AutoencoderKLModelConfig
from image_autoencoding.errors import UserError
from image_autoencoding.models.vae import DiagonalGaussian

DIFFUSERS_CONFIG = "config.json"
# The model keys that are diffusers' AutoencoderKL arguments of the same name.
SHARED_KEYS = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
               "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv")


def diffusers_autoencoder_kl() -> type:
    """diffusers' AutoencoderKL class; a one-line UserError naming the extra when diffusers is missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("model.arch autoencoder-kl needs diffusers: "
                        "pip install 'image-autoencoding[diffusers]'") from None
    return AutoencoderKL


def diffusers_arguments(cfg: AutoencoderKLModelConfig) -> dict[str, Any]:
    """The AutoencoderKL arguments that build the model `cfg` describes."""
    levels = len(cfg.block_out_channels)
    return {
        "in_channels": 3, "out_channels": 3, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        **{key: getattr(cfg, key) for key in SHARED_KEYS},
    }


class AutoencoderKLEncoder(nn.Module):
    """Image in [-1, 1] -> the posterior q(z|x) over (N, latent_channels * side * side)."""

    def __init__(self, autoencoder: nn.Module, cfg: AutoencoderKLModelConfig):
        super().__init__()
        self.encoder = autoencoder.encoder
        self.quant_conv = autoencoder.quant_conv  # None without use_quant_conv, as in diffusers
        self.logvar_range = (cfg.logvar_min, cfg.logvar_max)

    def forward(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        # As diffusers' DiagonalGaussianDistribution: channels [0, C) the mean, [C, 2C) the log-variance.
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean.flatten(1), logvar.flatten(1), *self.logvar_range)


class AutoencoderKLDecoder(nn.Module):
    """(N, latent_channels * side * side) -> image, the [-1, 1] range."""

    def __init__(self, autoencoder: nn.Module, cfg: AutoencoderKLModelConfig, image_size: int):
        super().__init__()
        self.post_quant_conv = autoencoder.post_quant_conv  # None without use_post_quant_conv
        self.decoder = autoencoder.decoder
        self.latent_shape = (cfg.latent_channels, cfg.feature_side(image_size), cfg.feature_side(image_size))

    def forward(self, z: Tensor) -> Tensor:
        z = z.reshape(-1, *self.latent_shape)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    @property
    def last_layer(self) -> Tensor:
        """The weight of the layer that makes the pixels (the adaptive GAN weight's reference)."""
        return self.decoder.conv_out.weight


def build_networks(cfg: AutoencoderKLModelConfig, image_size: int, init_weights: bool = True,
                   ) -> tuple[AutoencoderKLEncoder, AutoencoderKLDecoder]:
    """The encoder and decoder `cfg` describes: with `init_weights` and model.init_from, that folder's
    weights; else diffusers' initialisation."""
    if init_weights and cfg.init_from is not None:
        autoencoder = load_diffusers_folder(cfg.init_from, "model.init_from", cfg)
    else:
        autoencoder = diffusers_autoencoder_kl()(**diffusers_arguments(cfg))
    return AutoencoderKLEncoder(autoencoder, cfg), AutoencoderKLDecoder(autoencoder, cfg, image_size)


def check_sources(cfg: AutoencoderKLModelConfig) -> None:
    """What a new run of `cfg` needs beyond the config, checked before its run folder is made:
    diffusers, and model.init_from a folder that fits the config."""
    diffusers_autoencoder_kl()
    if cfg.init_from is not None:
        check_folder_fits(cfg, cfg.init_from, "model.init_from")


def model_keys_of_folder(folder: str | Path, what: str) -> dict[str, Any]:
    """The model section (model.arch autoencoder-kl, its keys, model.init_from the folder) that a
    diffusers AutoencoderKL folder's config.json describes. `what` names the folder in errors (the
    key or option that gave it). An AutoencoderKL this package cannot train (other block types,
    activation, channel counts) is refused in one line naming the config.json key."""
    path = Path(folder) / DIFFUSERS_CONFIG
    if not path.is_file():
        raise UserError(f"{what} '{folder}': no {DIFFUSERS_CONFIG} there (expected a diffusers AutoencoderKL folder: "
                        f"{DIFFUSERS_CONFIG} and diffusion_pytorch_model.safetensors, as save_pretrained writes it)")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}: '{path}' cannot be read as JSON: {exc}") from None
    if not isinstance(saved, dict) or saved.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        found = saved.get("_class_name") if isinstance(saved, dict) else type(saved).__name__
        raise UserError(f"{what}: '{path}' does not describe an AutoencoderKL (its _class_name is {found!r})")
    # Keys an older config.json lacks take diffusers' defaults, as from_pretrained does.
    defaults = {name: parameter.default
                for name, parameter in inspect.signature(diffusers_autoencoder_kl().__init__).parameters.items()}
    values = {key: saved.get(key, defaults.get(key)) for key in ("in_channels", "out_channels", "act_fn",
                                                                   "down_block_types", "up_block_types", *SHARED_KEYS)}
    levels = len(values["block_out_channels"] or [])
    supported = {"in_channels": 3, "out_channels": 3, "act_fn": "silu",
                 "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    for key, wanted in supported.items():
        if _plain(values[key]) != wanted:
            raise UserError(f"{what}: '{path}' has {key} {_plain(values[key])!r}; model.arch autoencoder-kl "
                            f"builds {wanted!r}")
    return {"arch": "autoencoder-kl", **{key: _plain(values[key]) for key in SHARED_KEYS}, "init_from": str(folder)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def check_folder_fits(cfg: AutoencoderKLModelConfig, folder: str | Path, what: str) -> None:
    """A one-line UserError when the folder's config.json describes another model than `cfg`,
    naming the overrides that would describe it."""
    found = model_keys_of_folder(folder, what)
    differ = [key for key in SHARED_KEYS if found[key] != getattr(cfg, key)]
    if differ:
        fix = " ".join(f"model.{key}={json.dumps(found[key]).replace(' ', '')}" for key in differ)
        mine = ", ".join(f"model.{key} {json.dumps(getattr(cfg, key))}" for key in differ)
        raise UserError(f"{what} '{folder}' holds another AutoencoderKL than the config's ({mine}); to start "
                        f"from it, set: {fix}")


def load_diffusers_folder(folder: str | Path, what: str, cfg: AutoencoderKLModelConfig) -> nn.Module:
    """The AutoencoderKL saved in `folder` (diffusers' from_pretrained, local files only: nothing is
    downloaded), in fp32, after its config.json was checked against `cfg`."""
    check_folder_fits(cfg, folder, what)
    autoencoder_kl = diffusers_autoencoder_kl()
    try:
        autoencoder = autoencoder_kl.from_pretrained(str(folder), local_files_only=True,
                                                     # without accelerate, diffusers warns, then does this
                                                     low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{what} '{folder}': diffusers cannot load it: {reason}") from None
    return autoencoder.float()


def to_diffusers(encoder: AutoencoderKLEncoder, decoder: AutoencoderKLDecoder, cfg: AutoencoderKLModelConfig,
                 image_size: int, **config: Any) -> nn.Module:
    """A diffusers AutoencoderKL holding these networks' weights (copies), on the CPU; `config`: more
    of its config (scaling_factor, shift_factor)."""
    autoencoder = diffusers_autoencoder_kl()(**diffusers_arguments(cfg), sample_size=image_size, **config)
    weights = {**encoder.state_dict(), **decoder.state_dict()}
    autoencoder.load_state_dict({name: tensor.detach().cpu().float() for name, tensor in weights.items()})
    return autoencoder.eval()
