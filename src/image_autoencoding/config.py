"""Run configuration: the original's `data_config.py`, `models_config.py` and `train_config.py` as
three typed sections, filled from a YAML file and `section.key=value` overrides.

Every problem a user can cause (missing file, unknown key, wrong type, impossible value) raises
`ConfigError` with one line that names the key and what was expected; the CLI turns it into exit
status 2.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from image_autoencoding.errors import UserError


class ConfigError(UserError):
    """A user-facing configuration problem; the message is one line and names the key."""


class _Section(BaseModel):
    # extra="forbid": a typo such as `train.bach_size` must fail, not be silently ignored.
    # allow_inf_nan=False: `train.lr=inf` or `nan` passes every `gt=0` bound and trains garbage.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# SSIM's Gaussian window side (Wang et al. 2004; evaluation/metrics.py): every validation scores
# SSIM, so a smaller image could train an epoch and then fail to be scored.
SSIM_WINDOW = 11
# LPIPS's VGG16 halves the image four times before its last layer (evaluation/lpips.py): a smaller
# image leaves that layer no pixel.
LPIPS_MIN_SIZE = 16
# model.mode=ldm's KL weight when train.alpha is not given: Stable Diffusion's autoencoders'
# (Rombach et al. 2022, kl_weight 1e-6 in their configs): a KL-regularised autoencoder whose latent
# a diffusion model learns, not a sampler of the prior.
LDM_KL_WEIGHT = 1e-6

# data.on_device=auto keeps the training split on a GPU when it takes at most this share of the
# device's memory (data/device_split.py): the other three quarters stay for the model, its activations
# at the largest batch a GPU preset trains (1024 images) and the allocator's caches. COCO at 64 px
# (1.45 GB) takes about 1% of an H200's 139 GB and 6% of a 24 GB card; at 128 px (5.8 GB) it still
# fits a 24 GB card.
RESIDENT_SHARE = 0.25

# data.mean = data.std = this maps pixels in [0, 1] to [-1, 1].
UNIT_RANGE = (0.5, 0.5, 0.5)

DatasetName = Literal["digits", "fashion-mnist", "coco", "food-101", "folder"]


class DataConfig(_Section):
    dataset: DatasetName = Field(
        "digits",
        description="what to train on: digits (bundled), fashion-mnist, coco, food-101, or folder (any image tree)",
    )
    data_root: str = Field("datasets", description="where datasets live; for folder: the image tree itself")
    image_crop: int = Field(
        375, ge=1, description="side in pixels of the centre crop (at most the image's short side), before resizing"
    )
    image_size: int = Field(
        64, ge=SSIM_WINDOW,
        description="side in pixels images are resized to, at least 11 (SSIM's window); a multiple of the encoder's "
        "downsampling, 8 by default",
    )
    mean: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5),
        description="per-channel (RGB) mean; the model sees (pixel / 255 - mean) / std, [-1, 1] by default",
    )
    std: tuple[float, float, float] = Field(
        (0.5, 0.5, 0.5), description="per-channel (RGB) standard deviation, each > 0 (see data.mean)"
    )
    valid_fraction: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="fraction held out for validation where a dataset has no validation split (digits, folder)",
    )
    split_seed: int = Field(0, description="seed of that validation split")
    # The original's RandomHorizontalFlip (configs/seed.yaml keeps it); a key so that whether it helps
    # each dataset can be measured.
    random_flip: bool = Field(True, description="flip each training image left-right with probability 1/2")
    # auto: the airbench recipe's data path on a GPU (the whole split on the device, shuffled and
    # flipped there), which removes the per-step host work and copy; on the CPU the memory map is
    # already the device's memory.
    on_device: Literal["auto"] | bool = Field(
        "auto",
        description="copy the training split's uint8 pixels to the training device once and draw batches there: "
        "true, false (read each batch from the memory-mapped cache), or auto: true on a GPU when the split "
        f"takes at most {RESIDENT_SHARE:.0%} of its memory (and that much is free), false on the CPU",
    )
    num_workers: int = Field(
        2, ge=0, description="processes decoding images into the cache (the original's -nw); 0 decodes in-process"
    )
    # Sub-paths as in the original's data_config.py.
    # COCO's train and test images both train (the VAE needs no labels); val2017 evaluates.
    coco_train_data: str = Field(
        "coco_train2017/train2017", description="COCO training images, under `<data_root>/coco`"
    )
    coco_test_data: str = Field(
        "coco_test2017/test2017", description="COCO test images, under `<data_root>/coco`; they train too"
    )
    coco_valid_data: str = Field(
        "coco_valid2017/val2017", description="COCO validation images, under `<data_root>/coco`"
    )
    images_data: str = Field("images", description="Food-101's image folder, under `<data_root>/food-101`")
    meta_data: str = Field(
        "meta", description="Food-101's meta folder (train.txt, test.txt), under `<data_root>/food-101`"
    )
    cache_dir: str | None = Field(
        None,
        description="where the decoded uint8 cache lives; null: `$XDG_CACHE_HOME/image-autoencoding` "
        "(`~/.cache/image-autoencoding`)",
    )
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="stop when more than this fraction of a split's files cannot be read (they are listed either way)",
    )
    # Pillow's own default limit.
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="images with more pixels than this are refused as decompression bombs"
    )

    @field_validator("on_device", mode="before")
    @classmethod
    def _auto_or_bool(cls, value: Any) -> Any:
        # Before pydantic's own parsing, which takes 'yes', 'on' or 1 for true and words its refusal
        # of anything else as "Input should be 'auto'".
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError("expected auto, true or false")

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError("every std value must be > 0")
        return value


class _ModelSection(_Section):
    """The keys every architecture has. Each architecture's own keys live in its own class below, so a
    key of one given to another is an error that names both (`_format_error`), and each class
    states its own image-size rule. Another architecture is one more class here, one more entry in
    ModelConfig and MODEL_CONFIGS, and its networks in models/factory.ARCHITECTURES."""

    # vae-gan: Larsen et al. 2016, the same VAE plus a discriminator whose hidden layer measures the
    # reconstruction error (training/steps/vae_gan.py). ldm: the objective of latent diffusion's
    # autoencoders (Esser et al. 2021, Rombach et al. 2022; training/steps/ldm.py).
    mode: Literal["vae", "vae-gan", "ldm"] = Field(
        "vae", description="vae (the original's); vae-gan: the same VAE plus a discriminator (Larsen et al. 2016); "
        "ldm: latent diffusion's autoencoder loss, pixel + LPIPS + a small KL + a PatchGAN (Rombach et al. 2022)"
    )
    arch: str = Field(description="the architecture: the key of MODEL_CONFIGS that picks the class")
    # The original passed 0.9, TensorFlow's convention for the same setting, so its running statistics
    # followed the last batch; 0.1 is what it meant. Shared: the discriminator (model.mode=vae-gan)
    # of every architecture has BatchNorm too.
    bn_momentum: float = Field(
        0.1, gt=0.0, le=1.0,
        description="BatchNorm momentum, PyTorch's convention: the weight of the new batch (the seed encoder and "
        "decoder, the discriminator)",
    )
    # exp(logvar) overflows or underflows in fp32 / bf16 outside this range (diffusers clamps the same).
    logvar_min: float = Field(-30.0, description="the encoder's log-variance is clamped to at least this before exp")
    logvar_max: float = Field(20.0, description="the encoder's log-variance is clamped to at most this (> logvar_min)")
    # As the original's models config. Strides adapt to the image size (models/discriminator.py).
    discriminator_channels: list[int] = Field(
        default_factory=lambda: [32, 128, 256, 256, 512], min_length=3,
        description="model.mode=vae-gan: the discriminator's conv widths, then its fully connected width",
    )

    # Taming Transformers' NLayerDiscriminator defaults (Esser et al. 2021): 64 wide, 3 halvings.
    patch_discriminator_width: int = Field(
        64, ge=1, description="model.mode=ldm: the PatchGAN discriminator's first conv width (doubling per layer, "
        "at most x8)",
    )
    patch_discriminator_layers: int = Field(
        3, ge=1, description="model.mode=ldm: the PatchGAN discriminator's downsampling convs (each halves the "
        "image while it stays at least 4 px)",
    )

    @field_validator("discriminator_channels")
    @classmethod
    def _discriminator_channels_positive(cls, value: list[int]) -> list[int]:
        return _positive_channels(value)

    @model_validator(mode="after")
    def _logvar_range(self) -> Self:
        if self.logvar_min >= self.logvar_max:
            raise ValueError("logvar_min must be < logvar_max")
        return self

    @property
    @abstractmethod
    def downsampling(self) -> int:
        """How many times smaller the encoder's last feature map is than the image, per side."""

    @abstractmethod
    def image_size_rule(self) -> str:
        """Why data.image_size must be a multiple of `downsampling`, in this architecture's words."""

    def feature_side(self, image_size: int) -> int:
        """The side of the encoder's last feature map (and of a spatial latent)."""
        return image_size // self.downsampling

    @abstractmethod
    def latent_size(self, image_size: int) -> int:
        """Floats in one image's latent: the length of the vectors the encoder gives and the decoder takes."""

    def data_problem(self, data: DataConfig) -> str | None:
        """Why this architecture cannot take images normalised as `data` says, in one line; None when it can."""
        return None


def _positive_channels(value: list[int]) -> list[int]:
    if min(value) < 1:
        raise ValueError("every channel count must be >= 1")
    return value


class SeedModelConfig(_ModelSection):
    """model.arch=seed: the original's DCGAN-style strided convolutions, a fully connected layer and
    a latent vector (models/vae.py)."""

    arch: Literal["seed"] = Field("seed", description="the original's DCGAN-style encoder and decoder")
    kernel_size: int = Field(5, ge=1, description="kernel side of every conv and transposed-conv block")
    stride: int = Field(2, ge=1, description="stride of every conv block: each divides the image side by it")
    padding: int = Field(2, ge=0, description="padding of every conv block; (kernel_size - 1) // 2 keeps sizes exact")
    encoder_channels: list[int] = Field(
        default_factory=lambda: [64, 128, 256], min_length=1,
        description="widths of the encoder's strided conv blocks, one per block",
    )
    decoder_channels: list[int] = Field(
        default_factory=lambda: [256, 128, 32, 3], min_length=2,
        description="widths of the decoder's transposed-conv blocks (one per encoder block), then the output image's "
        "channels (3, RGB)",
    )
    fc_dim: int = Field(1024, ge=1, description="width of the encoder's fully connected layer")
    latent_dim: int = Field(128, ge=1, description="dimension of the latent vector")

    @field_validator("encoder_channels", "decoder_channels")
    @classmethod
    def _channels_positive(cls, value: list[int]) -> list[int]:
        return _positive_channels(value)

    @model_validator(mode="after")
    def _shapes_fit(self) -> SeedModelConfig:
        # A stride-s conv with this kernel and padding must divide the size by s exactly, and the
        # transposed conv must multiply it back (output_padding = s - k + 2p in [0, s)).
        if not 0 <= self.output_padding < self.stride:
            raise ValueError(
                f"kernel_size {self.kernel_size}, stride {self.stride}, padding {self.padding} do not "
                "halve and restore image sizes exactly; use padding = (kernel_size - 1) // 2"
            )
        if len(self.decoder_channels) != len(self.encoder_channels) + 1:
            raise ValueError(
                "decoder_channels must list one width per encoder block, then the output channels "
                f"({len(self.encoder_channels) + 1} entries)"
            )
        return self

    @property
    def output_padding(self) -> int:
        return self.stride - self.kernel_size + 2 * self.padding

    @property
    def downsampling(self) -> int:
        return self.stride ** len(self.encoder_channels)

    def image_size_rule(self) -> str:
        return (f"the encoder divides it by model.stride ({self.stride}) {len(self.encoder_channels)} "
                "times, once per model.encoder_channels entry")

    def latent_size(self, image_size: int) -> int:
        return self.latent_dim


class ResnetModelConfig(_ModelSection):
    """model.arch=resnet: residual blocks with GroupNorm, resize + conv upsampling (Esser et al. 2021,
    Rombach et al. 2022; models/resnet.py), and a latent vector or a spatial latent."""

    arch: Literal["resnet"] = Field(
        "resnet", description="residual blocks with GroupNorm, upsampling by resize + conv (as Stable Diffusion's "
        "autoencoder)",
    )
    resnet_channels: list[int] = Field(
        default_factory=lambda: [32, 64, 128], min_length=1,
        description="width of each level; every level after the first halves the image side",
    )
    resnet_blocks: int = Field(1, ge=1, description="residual blocks per level")
    latent_channels: int | None = Field(
        None, ge=1, description="a spatial latent of this many channels at the last level's side "
        "(image_size / 2^(levels - 1)) instead of a vector of latent_dim; null: the vector",
    )
    latent_dim: int = Field(128, ge=1, description="dimension of the latent vector")

    @field_validator("resnet_channels")
    @classmethod
    def _channels_positive(cls, value: list[int]) -> list[int]:
        return _positive_channels(value)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.resnet_channels) - 1)

    def image_size_rule(self) -> str:
        return (f"the resnet encoder halves it {len(self.resnet_channels) - 1} times, once per "
                "model.resnet_channels level after the first")

    def latent_size(self, image_size: int) -> int:
        """latent_dim, or a spatial latent's channels x side x side."""
        if self.latent_channels is None:
            return self.latent_dim
        return self.latent_channels * self.feature_side(image_size) ** 2


class AutoencoderKLModelConfig(_ModelSection):
    """model.arch=autoencoder-kl: diffusers' AutoencoderKL, the autoencoder of latent diffusion (Rombach
    et al. 2022; models/autoencoder_kl.py), with its keys under diffusers' names. The defaults are
    Stable Diffusion's VAE (stabilityai/sd-vae-ft-mse), so model.init_from such a folder needs no
    other key; images go in and come out in [-1, 1] (data.mean = data.std = 0.5)."""

    arch: Literal["autoencoder-kl"] = Field(
        "autoencoder-kl", description="diffusers' AutoencoderKL (Stable Diffusion's VAE), pip install "
        "'image-autoencoding[diffusers]'",
    )
    block_out_channels: list[int] = Field(
        default_factory=lambda: [128, 256, 512, 512], min_length=1,
        description="width of each level of the encoder (the decoder mirrors it); every level after the first "
        "halves the image side",
    )
    layers_per_block: int = Field(2, ge=1, description="residual blocks per encoder level (the decoder has one more)")
    latent_channels: int = Field(4, ge=1, description="channels of the spatial latent, at image_size / "
                                 "2^(levels - 1) per side")
    norm_num_groups: int = Field(32, ge=1, description="GroupNorm groups; divides every block_out_channels entry")
    mid_block_add_attention: bool = Field(
        True, description="a self-attention layer in the middle block of the encoder and of the decoder"
    )
    use_quant_conv: bool = Field(
        True, description="a 1x1 convolution on the encoder's mean and log-variance (false in SD3's and FLUX's VAE)"
    )
    use_post_quant_conv: bool = Field(
        True, description="a 1x1 convolution on the latent before the decoder (false in SD3's and FLUX's VAE)"
    )
    init_from: str | None = Field(
        None,
        description="a diffusers AutoencoderKL folder (config.json and weights, read with local files only) whose "
        "weights a new run starts from; its config.json must agree with these keys; null: random weights",
    )

    @field_validator("block_out_channels")
    @classmethod
    def _channels_positive(cls, value: list[int]) -> list[int]:
        return _positive_channels(value)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> AutoencoderKLModelConfig:
        if any(width % self.norm_num_groups for width in self.block_out_channels):
            raise ValueError(f"model.norm_num_groups {self.norm_num_groups} must divide every "
                             f"model.block_out_channels entry {self.block_out_channels} (GroupNorm)")
        return self

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def image_size_rule(self) -> str:
        return (f"the encoder halves it {len(self.block_out_channels) - 1} times, once per "
                "model.block_out_channels level after the first")

    def latent_size(self, image_size: int) -> int:
        return self.latent_channels * self.feature_side(image_size) ** 2

    def data_problem(self, data: DataConfig) -> str | None:
        if data.mean != UNIT_RANGE or data.std != UNIT_RANGE:
            return (f"model.arch autoencoder-kl takes images in [-1, 1], as diffusers' autoencoders do: "
                    f"data.mean and data.std must be {list(UNIT_RANGE)} (got {list(data.mean)} and {list(data.std)})")
        return None


# model.arch picks the class; a config without it is the original's seed architecture.
MODEL_CONFIGS: dict[str, type[_ModelSection]] = {
    "seed": SeedModelConfig, "resnet": ResnetModelConfig, "autoencoder-kl": AutoencoderKLModelConfig,
}


def _arch_of(value: Any) -> Any:
    return value.get("arch", "seed") if isinstance(value, dict) else getattr(value, "arch", None)


ModelConfig = Annotated[
    Annotated[SeedModelConfig, Tag("seed")] | Annotated[ResnetModelConfig, Tag("resnet")]
    | Annotated[AutoencoderKLModelConfig, Tag("autoencoder-kl")],
    Discriminator(_arch_of),
]


Alpha = float | Literal["1/batch_size"]


# The validation metrics train.monitor may name, and whether larger is better (training/monitor.py).
MONITORED: dict[str, Literal["max", "min"]] = {
    "valid_ssim": "max", "valid_psnr": "max", "valid_pcc": "max",
    "valid_mse": "min", "valid_recon": "min", "valid_kl": "min",
}


class TrainConfig(_Section):
    batch_size: int = Field(
        64, ge=1,
        description="images per process and optimizer step; under torchrun the global batch is this x processes",
    )
    epochs: int = Field(100, ge=1, description="passes over the training split")
    # auto: the seed architecture keeps the original's RMSprop, which beat Adam in the search that
    # chose the default recipe (docs/quality.md, "How the default was chosen"); resnet gets Adam: with
    # RMSprop its validation PSNR was several dB lower, in a screen and over three seeds (the figures:
    # docs/design.md, "The residual architecture"). Why RMSprop suits one network and not the other
    # was not established. autoencoder-kl gets Adam, as latent diffusion trains it (Rombach et al. 2022).
    optimizer: Literal["auto", "rmsprop", "adam"] = Field(
        "auto",
        description="one per network: rmsprop (alpha 0.9, eps 1e-8, as the original), adam, or auto: rmsprop for "
        "model.arch=seed, adam for resnet and autoencoder-kl",
    )
    lr: float = Field(0.001, gt=0.0, description="learning rate")
    weight_decay: float = Field(1e-7, ge=0.0, description="the optimizer's weight decay")
    # training/lr_schedule.py has the formulas and why.
    # cosine with a 100-step warm-up: a higher 3-seed mean validation SSIM than the original's x0.75
    # per epoch on 40-epoch photo runs (the figures: docs/quality.md, "Learning-rate schedules").
    lr_schedule: Literal["exponential", "cosine", "constant"] = Field(
        "cosine",
        description="exponential: lr x train.decay_lr after every epoch (the original's); cosine: down to 0 over "
        "the planned steps; constant",
    )
    decay_lr: float = Field(
        0.75, gt=0.0, le=1.0,
        description="train.lr_schedule=exponential: learning rate x this after every epoch; 1.0 keeps it constant",
    )
    warmup_steps: int = Field(
        100, ge=0, description="the learning rate rises linearly from lr / this to lr over this many steps; 0: none"
    )
    monitor: Literal[tuple(MONITORED)] = Field(  # type: ignore[valid-type]
        "valid_ssim",
        description="the validation metric that picks best.pt and drives early stopping: larger is better for "
        "ssim, psnr, pcc; smaller for mse, recon, kl",
    )
    early_stopping_patience: int | None = Field(
        None, ge=1,
        description="end the run after this many epochs without a gain in train.monitor of at least "
        "train.early_stopping_min_delta; null: train every epoch",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0.0, description="the gain in train.monitor over the last mark that counts as improving"
    )
    # The original's two settings were 1 and 1/batch_size. 0.5 x summed squared error is the
    # likelihood of a decoder with pixel variance 1 on images in [-1, 1], so weak that with alpha 1 the
    # KL wins and the model blurs; 0.1 scored higher validation SSIM and PCC than 1 on both datasets of
    # benchmarks/quality.py (docs/quality.md, "The recipes").
    # One key for the KL weight of every objective: in each it weighs the KL summed over the latent
    # against the reconstruction summed over the pixels, per image. model.mode=ldm's own default
    # (LDM_KL_WEIGHT) applies where it is not given (Config._resolve_ldm_kl_weight).
    alpha: Alpha = Field(
        0.1,
        description="weight of the KL term in the encoder objective: a number >= 0, or 1/batch_size "
        "(1 / the global batch under torchrun); the original used 1; not given, model.mode=ldm uses 1e-6 "
        "(Stable Diffusion's)",
    )
    seed: int = Field(12345, description="random seed: the same config and seed give the same weights")
    device: str = Field("auto", description="auto (cuda when available, else cpu), or a device such as cpu, cuda:1")
    # auto: on a CPU with native bf16, bf16 autocast (faster than fp32 there, at the same quality);
    # elsewhere fp32, GPUs included: on an H200 this model's fp32 step was faster than bf16 (kernel
    # launches, not arithmetic, bound it) and validated better. The figures: docs/performance.md,
    # "What made the step fast", "bf16 against fp32" and "On a GPU" (benchmarks/train_throughput.py).
    # fp16 (with loss scaling) is for GPUs without bf16; on CPU it runs, slowly.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 autocast on a CPU with native bf16, else fp32 (GPUs included); "
        "or fp32, bf16, fp16 (with loss scaling)",
    )
    # oneDNN's and cuDNN's preferred layout for convolutions.
    channels_last: bool = Field(True, description="NHWC memory layout for weights and activations")
    compile: bool = Field(
        False, description="torch.compile the model (needs a C++ compiler on CPU; the first steps take longer)"
    )
    # On an H200 the default model's step (batch 64, 6.8 ms) was bound by kernel launches and the
    # Python issuing them, not arithmetic (benchmarks/results/train_throughput_h200.json): a graph
    # replay launches the whole step at once (training/cuda_graph.py).
    cuda_graphs: Literal["auto"] | bool = Field(
        "auto",
        description="capture the training step as a CUDA graph: auto (on with a CUDA device, off elsewhere, "
        "under torchrun and with fp16), true (a CUDA device, one process, no fp16) or false",
    )
    # TF32 rounds the inputs of fp32 matrix products and convolutions to 10 mantissa bits and adds in
    # fp32: on Ampere and later GPUs several times the fp32 rate, at the precision bf16 autocast
    # already accepts for this model (docs/performance.md).
    tf32: bool = Field(True, description="on CUDA, fp32 matrix products and convolutions use TF32; no effect on CPU")
    # Faster CPU steps for a little more peak memory (the figures: runtime.keep_freed_memory and
    # docs/performance.md, "What made the step fast").
    reuse_cpu_memory: bool = Field(
        True, description="on CPU, glibc's malloc keeps freed memory for the next step instead of fresh pages"
    )
    output_dir: str = Field(".", description="run folders are made under `<output_dir>/results/vae/`")
    log_dir: str | None = Field(
        None,
        description="a folder for an extra copy of the training log (the original's -l); "
        "null: only `<run>/train.log`",
    )
    checkpoint_every: int = Field(
        10, ge=1, description="write epoch_N.pt every this many epochs and at the end (last.pt: every epoch)"
    )
    keep_checkpoints: int = Field(
        3, ge=0, description="epoch_N.pt files kept, newest first (last.pt is always kept); 0 keeps every one"
    )
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="stop each epoch after this many steps (quick trials and tests); null: the whole split"
    )
    eval_images: int | None = Field(
        None, ge=1,
        description="validation images scored (SSIM, PCC, MSE, PSNR) after every epoch; null: the whole split",
    )
    tsne_points: int = Field(
        1000, ge=0,
        description="validation images in the t-SNE picture of the latent space (seconds per thousand); 0 skips it",
    )
    grid_images: int = Field(
        8, ge=1, description="fixed training and validation images shown in the reconstruction pictures"
    )
    sample_images: int = Field(64, ge=1, description="fixed latent vectors decoded into the sample pictures")
    progress: bool = Field(
        True, description="progress bars, shown only when the console is a terminal (vae train --quiet: none)"
    )

    # --- reliability: mid-epoch checkpoints and the non-finite loss guard ---
    # So that a run killed inside a long epoch resumes inside it (last.pt is written at every epoch
    # end regardless). 15 minutes: a checkpoint takes about a second to write for the models here,
    # so the cost is noise, and a kill -9 (OOM killer, preemption) loses at most that much work.
    checkpoint_every_minutes: float | None = Field(
        15.0, gt=0.0,
        description="also write last.pt inside an epoch once this many minutes have passed since the last "
        "checkpoint; null: off",
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1,
        description="also write last.pt every this many optimizer steps; null: off",
    )
    max_bad_steps: int = Field(
        3, ge=1,
        description="a non-finite loss or gradient skips its step; this many in a row stop the run (exit status 2)",
    )
    # --- end reliability ---

    # --- many GPUs: torchrun / DistributedDataParallel ---
    sync_batchnorm: bool = Field(
        False, description="under torchrun: BatchNorm statistics over the global batch, not each process's own"
    )

    # --- KL schedule ---
    # KL warm-up: Bowman et al. 2016; 0 is the original.
    kl_warmup_steps: int = Field(
        0, ge=0,
        description="the KL weight ramps linearly from 0 to alpha over this many optimizer steps; 0: alpha at once",
    )
    # Free bits: Kingma et al. 2016. Metrics still report the true KL.
    free_bits: float = Field(
        0.0, ge=0.0,
        description="in the objective, each latent unit's KL (batch mean) counts as at least this many nats; 0: off",
    )
    # The autoencoders of latent diffusion keep one (Rombach et al. 2022, ldm/modules/ema.py); the
    # average, its warm-up and why: training/ema.py.
    ema_decay: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="keep an exponential moving average of the VAE's weights with this decay (e.g. 0.999): "
        "validation, best.pt and every reader of a checkpoint use it; null: off",
    )
    # --- VAE-GAN (model.mode=vae-gan; Larsen et al. 2016) ---
    # Decoder and encoder reconstruction error: feature_weight * (discriminator-layer error) +
    # pixel_weight * (pixel error, the VAE's recon). Decoder: + adversarial_weight * GAN loss.
    gan_feature_weight: float = Field(
        1.0, ge=0.0, description="model.mode=vae-gan: weight of the discriminator-feature reconstruction error"
    )
    gan_pixel_weight: float = Field(
        1.0, ge=0.0, description="model.mode=vae-gan: weight of the pixel reconstruction error"
    )
    gan_adversarial_weight: float = Field(
        1.0, ge=0.0, description="model.mode=vae-gan: weight of the decoder's GAN loss"
    )
    # 1e-4, a tenth of the default train.lr: of the stable variants measured, the best Fashion-MNIST
    # SSIM and among the sharpest reconstructions (docs/quality.md, "How VAE-GAN was made stable").
    discriminator_lr: float | None = Field(
        1e-4, gt=0.0,
        description="model.mode=vae-gan: the discriminator's learning rate, not decayed by train.decay_lr; "
        "null: train.lr",
    )
    # Off by default: with it, the decoder maps the prior to one or a few patterns (measured on
    # Fashion-MNIST and photos: docs/quality.md, "How VAE-GAN was made stable"); without it the GAN
    # sharpens reconstructions only, as in Esser et al. 2021's autoencoder.
    gan_prior_samples: bool = Field(
        False,
        description="model.mode=vae-gan: also train the decoder to make prior samples fool the discriminator "
        "(Larsen et al.'s third GAN term)",
    )

    # --- latent diffusion's autoencoder loss (model.mode=ldm; Rombach et al. 2022, Esser et al. 2021) ---
    pixel_loss: Literal["l1", "l2"] = Field(
        "l1", description="model.mode=ldm: the per-pixel reconstruction error, |x - x~| (as Stable Diffusion's) or "
        "(x - x~)^2",
    )
    perceptual_weight: float = Field(
        1.0, ge=0.0,
        description="model.mode=ldm: weight of LPIPS (Zhang et al. 2018, VGG16) added to every pixel's error; 0: "
        "no LPIPS (no VGG16 weights needed)",
    )
    lpips_vgg_weights: str | None = Field(
        None,
        description="model.mode=ldm: torchvision's VGG16 ImageNet weights file for LPIPS; null: vgg16-397923af.pth "
        "in torch's hub cache (`$TORCH_HOME/hub/checkpoints`); never downloaded",
    )
    # Stable Diffusion's configs start the discriminator at step 50001 of runs of hundreds of
    # thousands of steps at 256 px; our runs are a few thousand steps (100 epochs of digits at batch
    # 64 are ~2,300), so the same share of a run, the autoencoder settling before the GAN joins, is
    # about a thousand steps.
    disc_start: int = Field(
        1000, ge=0,
        description="model.mode=ldm: optimizer steps before the PatchGAN discriminator and its adversarial loss "
        "start (before: neither runs)",
    )
    disc_weight: float = Field(
        0.5, ge=0.0,
        description="model.mode=ldm: factor on the adaptive adversarial weight |grad nll| / |grad GAN| at the "
        "decoder's last layer (Esser et al. 2021; 0.5 as Stable Diffusion's)",
    )

    @field_validator("alpha")
    @classmethod
    def _alpha_not_negative(cls, value: Alpha) -> Alpha:
        if isinstance(value, float) and value < 0:
            raise ValueError("alpha must be >= 0 or the string '1/batch_size'")
        return value

    def kl_weight(self, world_size: int = 1, step: int | None = None) -> float:
        """The KL weight, the one place it is computed. alpha; '1/batch_size' means 1 / the global
        batch (batch_size x processes), so that a run on W processes optimises the same objective
        as one process with the global batch. With `step` (steps done before this one), the KL
        warm-up's weight for the next step: alpha * min(1, step / kl_warmup_steps)."""
        alpha = 1.0 / (self.batch_size * world_size) if self.alpha == "1/batch_size" else float(self.alpha)
        if step is None or self.kl_warmup_steps == 0:
            return alpha
        return alpha * min(1.0, step / self.kl_warmup_steps)


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=SeedModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _image_size_fits_model(self) -> Config:
        step = self.model.downsampling
        if self.data.image_size % step:
            raise ValueError(f"data.image_size {self.data.image_size} must be a multiple of {step} "
                             f"({self.model.image_size_rule()})")
        return self

    @model_validator(mode="after")
    def _normalisation_fits_model(self) -> Config:
        problem = self.model.data_problem(self.data)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _resolve_optimizer(self) -> Config:
        # Resolved here, the one place, so that the saved config, the report and a resume all name
        # the optimizer that trained.
        if self.train.optimizer == "auto":
            self.train.optimizer = "adam" if self.model.arch in ("resnet", "autoencoder-kl") else "rmsprop"
        return self

    @model_validator(mode="after")
    def _resolve_ldm_kl_weight(self) -> Config:
        # Resolved here, as train.optimizer is, so that the saved config and a resume name the weight
        # that trained; a train.alpha given in a file or an override is kept.
        if self.model.mode == "ldm" and "alpha" not in self.train.model_fields_set:
            self.train.alpha = LDM_KL_WEIGHT
        return self

    @model_validator(mode="after")
    def _image_size_fits_lpips(self) -> Config:
        if self.model.mode == "ldm" and self.train.perceptual_weight > 0 and self.data.image_size < LPIPS_MIN_SIZE:
            raise ValueError(f"data.image_size {self.data.image_size} must be at least {LPIPS_MIN_SIZE} for "
                             "model.mode=ldm's LPIPS (VGG16 halves it 4 times); or set train.perceptual_weight=0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _key_of(location: tuple[Any, ...]) -> str:
    """The config key a pydantic error location points at: field names down the sections, list
    indexes as [i]. Whatever follows the last field name and is not an index is pydantic's own tag
    for a branch of a union type ('float', "literal['1/batch_size']", 'function-after[...]'); the
    tag of a tagged union of sections (model: 'seed', 'resnet') names no key, the section after it does."""
    names: list[str] = []
    section: Any = Config
    for part in location:
        fields = getattr(section, "model_fields", None)
        if isinstance(section, dict) and part in section:
            section = section[part]
        elif isinstance(part, int) and names:
            names[-1] += f"[{part}]"
        elif fields is not None and part in fields:
            names.append(str(part))
            annotation = fields[part].annotation
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            section = annotation if is_section else _tagged_sections(annotation) or None
        elif fields is not None:
            names.append(str(part))  # an unknown key: name it as written
            section = None
    return ".".join(names)


def _tagged_sections(annotation: Any) -> dict[str, type[BaseModel]]:
    """The sections of a tagged union (ModelConfig) by tag; empty for any other type."""
    return {meta.tag: get_args(branch)[0] for branch in get_args(annotation)
            for meta in getattr(branch, "__metadata__", ()) if isinstance(meta, Tag)}


def _error_key(error: Any) -> str:
    """The key a pydantic error is about. An architecture pydantic could not pick is model.arch's fault."""
    key = _key_of(error["loc"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") and isinstance(error.get("input"), dict):
        return f"{key}.arch"
    return key


def _other_arch_key(error: Any) -> tuple[str, list[str]] | None:
    """(the architecture, the architectures the key belongs to) when a model key is given with an
    architecture that does not have it."""
    location = error["loc"]
    if error["type"] != "extra_forbidden" or len(location) != 3 or location[0] != "model":
        return None
    owners = [arch for arch, section in MODEL_CONFIGS.items() if location[2] in section.model_fields]
    return (location[1], owners) if owners else None


def _format_error(error: ValidationError, source: str, arch_source: str = "") -> str:
    """One line naming the key. `arch_source`: the override that set model.arch, if one did."""
    first = error.errors()[0]
    key = _error_key(first)
    message = first["msg"].removeprefix("Value error, ")
    where = f"{source}: " if source else ""
    other_arch = _other_arch_key(first)
    if other_arch:
        arch, owners = other_arch
        by = f" (set by {arch_source})" if arch_source else ""
        return (f"{where}config key '{key}' belongs to model.arch {' or '.join(owners)}, not to model.arch "
                f"{arch}{by}")
    if first["type"] == "extra_forbidden":
        return f"{where}unknown config key '{key}'"
    got = first.get("input")
    if first["type"] in ("union_tag_invalid", "union_tag_not_found") and isinstance(got, dict):
        message = "Input should be " + " or ".join(repr(arch) for arch in MODEL_CONFIGS)
        got = got.get("arch")
    elif first["type"] == "union_tag_not_found":
        message = f"expected a section of {key}.* keys"
    if key and not isinstance(got, dict):
        return f"{where}config key '{key}': {message} (got {got!r})"
    return f"{where}config{(' ' + repr(key)) if key else ''}: {message}"


def _parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}': expected section.key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = _parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}': not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"config file '{path}' cannot be read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}': not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{path}': expected a mapping with data / model / train sections")
    for name, section in raw.items():
        # Checked here, not after the overrides: an override into a section the file made a number
        # would otherwise be blamed for the file's mistake.
        if name in Config.model_fields and not isinstance(section, dict | None):
            raise ConfigError(f"config file '{path}': '{name}' must be a section of {name}.* keys (got {section!r})")
    return {name: ({} if section is None else section) for name, section in raw.items()}


def build_config(raw: dict[str, Any], source: str = "", overrides: list[str] | None = None) -> Config:
    """Validate `raw`. An error is blamed on the override that set its key, if one did, else on
    `source` (the file the values came from)."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        key = _error_key(exc.errors()[0])
        blamed = [text for text in overrides or [] if key and _names_key(text.partition("=")[0], key)]
        arch_set = [text for text in overrides or [] if _names_key(text.partition("=")[0], "model.arch")]
        raise ConfigError(_format_error(exc, f"override '{blamed[-1]}'" if blamed else source,
                                        f"override '{arch_set[-1]}'" if arch_set else "")) from None


def _names_key(override_key: str, key: str) -> bool:
    """Whether an override of `override_key` set `key` (itself, a list item of it, or a key inside it)."""
    return key == override_key or key.startswith((f"{override_key}.", f"{override_key}["))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at `path`, then `section.key=value` overrides."""
    overrides = list(overrides or [])
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides)
    return build_config(raw, str(path) if path is not None else "", overrides)


def without_other_archs_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """The saved model section without the keys of architectures other than its own. Configs saved
    before each architecture had its own keys hold every architecture's keys, whatever model.arch;
    the other architectures' keys never shaped the model, so dropping them changes nothing. A key
    no architecture has stays, and is refused as unknown."""
    model = raw.get("model")
    arch = model.get("arch", "seed") if isinstance(model, dict) else None
    own = MODEL_CONFIGS.get(arch) if isinstance(arch, str) else None
    if own is None:
        return raw
    others = {key for section in MODEL_CONFIGS.values() for key in section.model_fields} - set(own.model_fields)
    return {**raw, "model": {key: value for key, value in model.items() if key not in others}}
