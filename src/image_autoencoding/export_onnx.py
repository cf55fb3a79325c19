"""`vae export --onnx`: the encoder (image -> mean, logvar) and the decoder (z -> image) as ONNX
files with a dynamic batch axis, for onnxruntime and other runtimes without PyTorch.

    encoder.onnx   input "image" (N, 3, S, S) float32, normalised as config.json says;
                   outputs "mean", "logvar" (N, latent_size)
    decoder.onnx   input "z" (N, latent_size) float32; output "image" (N, 3, S, S) in [-1, 1] (tanh)

Written with torch's torch.export-based exporter (the TorchScript one is deprecated since PyTorch
2.9), then checked: each file is run in onnxruntime on random inputs of a batch size other than
the one traced, and must match torch to 1e-4, or the export fails instead of shipping a wrong file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from image_autoencoding.atomic_files import atomic_write
from image_autoencoding.errors import UserError
from image_autoencoding.models.vae import VAE

TOLERANCE = 1e-4


class _EncoderGraph(nn.Module):
    """The posterior's parameters as plain tensors (ONNX has no posterior object)."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        posterior = self.encoder(image)
        return posterior.mean, posterior.logvar


class _DecoderGraph(nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.decoder = vae.decoder

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z)


def require_onnx() -> None:
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("vae export --onnx needs onnx, onnxscript and onnxruntime: "
                        "pip install 'image-autoencoding[onnx]'") from None


def export_onnx(vae: VAE, image_size: int, out: Path) -> list[Path]:
    """Write and check encoder.onnx and decoder.onnx in `out`; returns their paths."""
    require_onnx()
    vae = vae.float().cpu().eval()
    graphs = {
        "encoder": (_EncoderGraph(vae).eval(), torch.randn(2, 3, image_size, image_size), "image", ["mean", "logvar"]),
        "decoder": (_DecoderGraph(vae).eval(), torch.randn(2, vae.latent_size), "z", ["image"]),
    }
    written = []
    for name, (graph, example, input_name, output_names) in graphs.items():
        path = out / f"{name}.onnx"
        # torch.onnx logs each pass at INFO through its own logger; a user wants the file, not those.
        logging.getLogger("torch.onnx").setLevel(logging.WARNING)
        # The batch axis named by a string (torch.onnx turns it into torch.export.Dim.DYNAMIC and
        # names the file's axis "batch"), not by a Dim("batch", min=1): diffusers' decoder branches
        # on batch >= 64 (Upsample2D), which a Dim's range refuses, and torch.onnx then traces the
        # graph a second time in strict mode (1.5 s of the tiny test decoder's 6.5 s). The file keeps
        # neither the branch nor shape assertions (torch.onnx removes them): any batch size runs.
        program = torch.onnx.export(graph, (example,), input_names=[input_name], output_names=output_names,
                                    dynamic_shapes={input_name: {0: "batch"}}, dynamo=True, verbose=False)
        blob = program.model_proto.SerializeToString()
        atomic_write(path, lambda handle, blob=blob: handle.write(blob))
        _check_against_torch(path, graph, example.shape[1:])
        written.append(path)
    return written


@torch.no_grad()
def _check_against_torch(path: Path, graph: nn.Module, shape: torch.Size) -> None:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))  # another batch size than traced
    expected = graph(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    for output, want in zip(got, expected, strict=True):
        error = float(np.abs(output - want.numpy()).max())
        if not error <= TOLERANCE:
            path.unlink(missing_ok=True)
            raise UserError(f"ONNX export check failed: {path.name} differs from torch by {error:.2e} "
                            f"(more than {TOLERANCE:g}); file removed")
