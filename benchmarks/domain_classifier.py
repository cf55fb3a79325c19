"""A small Fashion-MNIST classifier, trained here from the training split (seeded), whose penultimate
layer is the feature space of a *domain* FID / KID and of precision / recall (Kynkäänniemi et al. 2019)
for samples, where no Inception-v3 weights can be downloaded.

Features from a network trained on the same kind of images see what distinguishes a shirt from a
sandal; ImageNet's Inception sees textures of photographs. The figures are comparable with each other
(same network, same seed, same test images), not with any published FID.

    python benchmarks/domain_classifier.py [--image-size 32] [--epochs 4]   # prints test accuracy
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import Tensor, nn

from image_autoencoding.evaluation.feature_networks import FeatureNetwork

FEATURES = 128  # the penultimate layer's width: the dimension of the domain features
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class SmallConvNet(nn.Module):
    """Two convolutions and a 128-unit layer, cheap enough on two CPU cores to train inside the
    benchmark (test accuracy and seconds in benchmarks/results/quality.json). Measured at 32 px: a
    deeper one (two convolutions per block) reached 92.9% after 4 epochs but took 9 minutes.
    `forward` returns the penultimate features (what FeatureNetwork reads); `logits` the class scores
    used to train it."""

    def __init__(self, image_size: int, classes: int = 10):
        super().__init__()
        block = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),  # noqa: E731
                                   nn.MaxPool2d(2)]
        self.body = nn.Sequential(*block(3, 32), *block(32, 64), nn.Flatten(),
                                  nn.Linear(64 * (image_size // 4) ** 2, FEATURES), nn.ReLU())
        self.head = nn.Linear(FEATURES, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def _unit(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float (N, 3, H, W) in [0, 1]."""
    x = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).float() / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def train_domain_classifier(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                            test_labels: np.ndarray, seed: int = 0, epochs: int = 3, batch_size: int = 128
                            ) -> tuple[FeatureNetwork, dict]:
    """Adam, one-cycle learning rate, random horizontal flips; returns the feature network and
    {test_accuracy, epochs, seconds, seed}."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image_size = train_images.shape[1]
    network = FeatureNetwork(SmallConvNet(image_size), input_size=image_size, mean=MEAN, std=STD)
    model = network.module
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x_train, y_train = _unit(train_images), torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    steps = epochs * (len(x_train) // batch_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator)
        for batch in order[: len(order) // batch_size * batch_size].split(batch_size):
            x = x_train[batch]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = nn.functional.cross_entropy(model.logits((x - mean) / std), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        x_test = _unit(test_images)
        predicted = torch.cat([model.logits((x - mean) / std).argmax(1) for x in x_test.split(512)])
    accuracy = float((predicted == torch.as_tensor(np.asarray(test_labels))).double().mean())
    info = {"test_accuracy": accuracy, "epochs": epochs, "seconds": round(time.perf_counter() - start, 1),
            "seed": seed, "features": FEATURES, "image_size": image_size}
    return network, info


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from image_autoencoding.config import load_config
    from image_autoencoding.data.image_data import load_image_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, ["data.dataset=fashion-mnist", f"data.image_size={args.image_size}",
                                    f"data.cache_dir={tmp}"])
        data = load_image_data(config.data, progress=False)
        _, info = train_domain_classifier(data.train.images, data.train.labels, data.valid.images,
                                          data.valid.labels, args.seed, args.epochs)
    print(info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
