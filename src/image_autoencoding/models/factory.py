"""The model a config describes: model.arch picks the encoder and decoder."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from image_autoencoding.config import ModelConfig
from image_autoencoding.models import autoencoder_kl
from image_autoencoding.models.resnet import ResnetDecoder, ResnetEncoder
from image_autoencoding.models.vae import VAE, Decoder, Encoder

# model.arch -> (cfg, image_size, init_weights) -> (encoder, decoder)
ARCHITECTURES: dict[str, Callable[[ModelConfig, int, bool], tuple[nn.Module, nn.Module]]] = {
    "seed": lambda cfg, image_size, init_weights: (Encoder(cfg, image_size), Decoder(cfg, image_size)),
    "resnet": lambda cfg, image_size, init_weights: (ResnetEncoder(cfg, image_size), ResnetDecoder(cfg, image_size)),
    "autoencoder-kl": autoencoder_kl.build_networks,
}

# model.arch -> what a new run of the config needs beyond it (an optional package, a folder of
# weights), checked before anything is written; architectures missing here need nothing.
SOURCE_CHECKS: dict[str, Callable[[ModelConfig], None]] = {"autoencoder-kl": autoencoder_kl.check_sources}


def check_model_sources(cfg: ModelConfig) -> None:
    """A one-line UserError when the model of a new run cannot be built (before its run folder is made)."""
    check = SOURCE_CHECKS.get(cfg.arch)
    if check is not None:
        check(cfg)


def build_model(cfg: ModelConfig, image_size: int, *, init_weights: bool = True) -> VAE:
    """The model `cfg` describes. `init_weights`: start from the weights the config names
    (model.init_from), as a new run does; False for a caller that loads every weight itself (a
    checkpoint, an export, shapes on the meta device), so that folder is never read."""
    encoder, decoder = ARCHITECTURES[cfg.arch](cfg, image_size, init_weights)
    return VAE(cfg, image_size, encoder, decoder)
