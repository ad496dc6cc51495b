"""Why `make demo` prints two accuracies so far apart (docs/results.md, "The demo's two accuracies").

The demo's federated probe and its Table 1 use the same closed-form ridge probe on the same model (DINOv2-S,
112 px) and data set (Fashion-MNIST); they differ in how many images the probe is fitted on (the federated run:
its ~480 calibration images; Table 1: 1,000 further training images) and where it is scored. This measures the
same probe on the original model for both sizes (and more), scored on the test split and on held-out training
images, at the demo's ridge and two larger ones.

    python studies/probe_size.py
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Subset

from tba_fed.config import DataConfig, ModelConfig
from tba_fed.data import build_dataset, pool_indices
from tba_fed.models import create_model
from tba_fed.probe import ProbeStats, features, solve_probe


def _features(model: torch.nn.Module, config: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = build_dataset(config, model)
    feats, labels = [], []
    with torch.inference_mode():
        for images, y in DataLoader(Subset(dataset, pool_indices(dataset, config)), batch_size=50):
            feats.append(features(model, images).double())
            labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


def main() -> None:
    start = time.perf_counter()
    model = create_model(ModelConfig(name="dinov2-s-imgfocus", kwargs={"img_size": 112})).eval()
    train, train_labels = _features(model, DataConfig(source="fashion_mnist", split="train", num_images=1600))
    test, test_labels = _features(model, DataConfig(source="fashion_mnist", split="test", num_images=500))
    print(f"features of {len(train)} training and {len(test)} test images in {time.perf_counter() - start:.0f} s")
    for ridge in (1e-6, 1e-3, 1e-2):
        for n in (482, 1000, 1500):
            stats = ProbeStats.zeros(train.shape[1], 10)
            stats.update(train[:n], train_labels[:n])
            head = solve_probe(stats, ridge=ridge)
            on_test = float((head.predict(test) == test_labels).double().mean())
            on_held_out = float((head.predict(train[1500:]) == train_labels[1500:]).double().mean())
            print(f"ridge {ridge:g}, probe fitted on {n} images: test split (500) {on_test:.3f}, "
                  f"held-out training images (100) {on_held_out:.3f}")


if __name__ == "__main__":
    main()
