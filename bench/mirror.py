"""What flipped views would cost a data set: real training images against the test split, as they are,
each flipped with probability 1/2 (what a DiT trained on a latent cache with flips learns to make), and all
flipped. Frechet distance over the project's classifier features and that classifier's accuracy, as
`ldm eval samples` measures samples. On data whose items all face one way (Fashion-MNIST), the middle row is
the floor a DiT trained with flips cannot go below; `ldm encode` caches flips only for image folders.

    python bench/mirror.py --store artifacts --classifier classifier@latest --n 10000
"""

from __future__ import annotations

import argparse

import torch

from ldm.artifacts import ArtifactStore
from ldm.data import DataConfig, build_dataset, iterate_images
from ldm.evaluation import real_statistics
from ldm.loading import feature_extractor, load_classifier
from ldm.metrics import FeatureStats, frechet_distance


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="artifacts")
    parser.add_argument("--classifier", default="classifier@latest")
    parser.add_argument("--data", default="fmnist", help="fmnist, or an image folder (with --path)")
    parser.add_argument("--path", default=None)
    parser.add_argument("--n", type=int, default=10_000, help="images of each split")
    parser.add_argument("--seed", type=int, default=0, help="which images the middle row flips")
    args = parser.parse_args(argv)

    store = ArtifactStore(args.store)
    artifact = store.load(args.classifier, stage="classifier")
    extractor = feature_extractor(store, "classifier", artifact.ref, torch.device("cpu"))
    classifier = load_classifier(artifact)
    data = DataConfig(name=args.data, path=args.path)
    test = real_statistics(extractor, build_dataset(data, "test"), args.n, 500, torch.device("cpu"))
    rows = {"as they are": FeatureStats(), "half flipped": FeatureStats(), "all flipped": FeatureStats()}
    correct = dict.fromkeys(rows, 0)
    generator = torch.Generator().manual_seed(args.seed)
    seen = 0
    with torch.no_grad():
        for images, labels in iterate_images(build_dataset(data, "train"), 500, args.n):
            flip = (torch.rand(len(images), generator=generator) < 0.5).view(-1, *[1] * (images.ndim - 1))
            variants = {
                "as they are": images,
                "half flipped": torch.where(flip, images.flip(-1), images),
                "all flipped": images.flip(-1),
            }
            for name, batch in variants.items():
                rows[name].update(extractor(batch))
                correct[name] += int((classifier(batch).argmax(1) == labels).sum())
            seen += len(images)
    print(f"{seen} training images against {seen} test images, features and accuracy of {artifact.ref} (not Inception)")
    print(f"{'train images':<14} {'FD':>8} {'class accuracy':>15}")
    results = {}
    for name, stats in rows.items():
        distance = frechet_distance(stats.mean(), stats.cov(), test.mean(), test.cov())
        results[name] = (distance, correct[name] / seen)
        print(f"{name:<14} {distance:8.3f} {correct[name] / seen:15.4f}")
    return results


if __name__ == "__main__":
    main()
