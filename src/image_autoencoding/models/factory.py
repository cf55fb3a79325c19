"""The model a config describes: model.arch picks the encoder and decoder."""

from __future__ import annotations

from image_autoencoding.config import ModelConfig
from image_autoencoding.models.resnet import ResnetDecoder, ResnetEncoder
from image_autoencoding.models.vae import VAE, Decoder, Encoder

ARCHITECTURES = {"seed": (Encoder, Decoder), "resnet": (ResnetEncoder, ResnetDecoder)}


def build_model(cfg: ModelConfig, image_size: int) -> VAE:
    encoder, decoder = ARCHITECTURES[cfg.arch]
    return VAE(cfg, image_size, encoder(cfg, image_size), decoder(cfg, image_size))
