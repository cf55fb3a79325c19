"""How long the ex-post latent sampler takes to fit (sampling/latent_mixture.py), and what its
subsample costs in fit quality: latents of a 128-dimensional model (the default latent_dim), drawn
from a 10-cluster mixture, 100,000 of them as from a large training split; the sampler fits on a
seeded subsample of FIT_POINTS. Prints a table and writes JSON.

    python benchmarks/latent_mixture_fit.py --json benchmarks/results/latent_mixture_fit.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import describe

from image_autoencoding.sampling.latent_mixture import COMPONENT_CHOICES, FIT_POINTS, fit_latent_mixture


def synthetic_latents(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.5, size=(clusters, dim))
    scales = rng.uniform(0.3, 1.0, size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.normal(size=(n, dim)) * scales[labels]).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--points", type=int, nargs="+", default=[5_000, FIT_POINTS])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    drawn = synthetic_latents(args.latents + 5_000, args.dim, 10)
    latents, held_out = drawn[: args.latents], torch.from_numpy(drawn[args.latents :])  # held out: never fitted
    rows = []
    for points in args.points:
        start = time.perf_counter()
        mixture = fit_latent_mixture(latents, max_points=points)
        seconds = time.perf_counter() - start
        # Mean log-likelihood of held-out latents under the fitted mixture: higher is a better fit.
        dist = torch.distributions.MixtureSameFamily(
            torch.distributions.Categorical(mixture.weights.double()),
            torch.distributions.MultivariateNormal(mixture.means.double(), scale_tril=mixture.cholesky.double()))
        rows.append({"fit_points": points, "seconds": round(seconds, 1), "components": mixture.components,
                     "bic": mixture.info["bic"], "held_out_loglik_per_dim": round(
                         float(dist.log_prob(held_out.double()).mean()) / args.dim, 4)})
    machine = describe()
    print(f"{machine}; {args.latents} latents of dimension {args.dim}; components tried {COMPONENT_CHOICES}")
    print("| fit points | seconds | components (lowest BIC) | held-out log-likelihood / dim |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['fit_points']} | {row['seconds']} | {row['components']} | {row['held_out_loglik_per_dim']} |")
    command = " ".join(["python benchmarks/latent_mixture_fit.py", *sys.argv[1:]])
    print(f"command: {command}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "latents": args.latents, "dim": args.dim,
                                         "choices": list(COMPONENT_CHOICES), "rows": rows, "command": command},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
