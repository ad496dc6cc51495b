"""Accuracy of the original and the compressed model on a labelled evaluation set (`compress --eval-data`).

Two classifiers, chosen by the user (`EvaluationSetConfig.classifier`): the closed-form ridge probe of
`probe` (fitted on each model's features of the calibration images, as the Table-1 experiment and the federated
evaluation do), or the model's own head. Counts are integers, so the fractions in the report can be checked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .config import DataConfig, EvaluationSetConfig
from .errors import TBAInputError
from .probe import accuracy, collect_probe_stats, solve_probe
from .stats import finite_images

_logger = logging.getLogger(__name__)

PROBE = "closed-form ridge probe on the final-norm class token"
HEAD = "the model's own classifier head (argmax of its logits)"


def subset_labels(subset: Subset) -> np.ndarray:
    """The labels of a subset of a labelled data set, read from its ``targets`` (no image is decoded)."""
    return np.asarray(subset.dataset.targets)[np.asarray(subset.indices, dtype=np.int64)]  # type: ignore[attr-defined]


def check_classifier(model: nn.Module, config: EvaluationSetConfig, calibration: DataConfig) -> None:
    """Before any image is read: `classifier: head` needs a model that has one; the probe learns the calibration
    labels, so it scores only images of the calibration data's source."""
    if config.classifier == "head" and int(getattr(model, "num_classes", 0) or 0) <= 0:
        raise TBAInputError("evaluation.classifier", "head: this model has no classifier head (num_classes 0)",
                            "use classifier: probe (--eval-classifier probe)")
    if config.classifier == "probe" and config.data.source != calibration.source:
        raise TBAInputError("evaluation.data.source", f"{config.data.source}: the probe learns the calibration labels "
                                                      f"({calibration.source}), so the evaluation labels must be the "
                                                      "same classes", f"evaluate on {calibration.source} images")


def check_label_space(config: EvaluationSetConfig, model: nn.Module, calibration_set: Dataset, evaluation_set: Dataset,
                      labels: np.ndarray) -> None:
    """The evaluation labels must name the classes the classifier knows: the head's (within its num_classes), or
    the calibration labels' for the probe (image folders: the same class folders)."""
    if config.classifier == "head":
        classes = int(model.num_classes)
        if len(labels) and (labels.min() < 0 or labels.max() >= classes):
            raise TBAInputError("evaluation.data", f"labels {int(labels.min())}..{int(labels.max())} are not all among "
                                                   f"the head's {classes} classes", "use classifier: probe")
        return
    ours, theirs = getattr(evaluation_set, "classes", None), getattr(calibration_set, "classes", None)
    if ours is not None and theirs is not None and list(ours) != list(theirs):
        raise TBAInputError("evaluation.data.path", f"class folders {list(ours)[:10]} differ from the calibration "
                                                    f"data's {list(theirs)[:10]}", "give one sub-folder per class, "
                                                                                   "named as in the calibration data")


def check_disjoint(config: EvaluationSetConfig, calibration: DataConfig, calibration_images: Subset,
                   evaluation_images: Subset) -> None:
    """No evaluation image may be a calibration image: the maps and the probe were fitted on those, so scoring them
    would flatter both. Two configs read the same images when they name the same source, path and split (synthetic:
    the same seed and classes, whatever the split); their subsets are then compared by index."""
    ours, theirs = config.data, calibration
    same = (lambda d: (d.source, d.seed, d.num_classes)) if ours.source == "synthetic" else \
        (lambda d: (d.source, d.path, d.split))
    if same(ours) != same(theirs):
        return
    if shared := len(set(calibration_images.indices) & set(evaluation_images.indices)):
        raise TBAInputError("evaluation.data", f"{shared} of its {len(evaluation_images)} images are calibration "
                                               f"images ({ours.source}, split {ours.split}): their accuracy would "
                                               "flatter the maps and the probe fitted on them",
                            "evaluate on another split (e.g. --eval-split test) or other images (synthetic: another "
                            "evaluation.data.seed)")


def head_accuracy(model: nn.Module, batches: Iterable, *, device: str | torch.device = "cpu") -> tuple[int, int]:
    """(correct, total) of the argmax of the model's logits; images with non-finite logits are left out of both."""
    correct = total = left_out = 0
    dtype = next(model.parameters()).dtype
    model.to(device).eval()
    with torch.inference_mode():
        for images, labels in batches:
            (logits, labels), dropped = finite_images([model(images.to(device=device, dtype=dtype)),
                                                       torch.as_tensor(labels)])
            left_out += dropped
            correct += int((logits.argmax(dim=1).cpu() == labels.cpu()).sum())
            total += len(labels)
    if left_out:
        _logger.warning("head accuracy: left out %d image(s) with non-finite logits", left_out)
    return correct, total


def evaluate_models(original: nn.Module, compressed: nn.Module, calibration: Iterable, evaluation: Iterable, *,
                    config: EvaluationSetConfig, num_classes: int, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The report's ``accuracy`` section: each model's correct count and fraction on the evaluation batches."""
    counts, probe_images = {}, {}
    for name, model in (("original", original), ("compressed", compressed)):
        if config.classifier == "head":
            counts[name] = head_accuracy(model, evaluation, device=device)
        else:
            stats = collect_probe_stats(model, calibration, num_classes, device=device)
            probe_images[name] = stats.images
            counts[name] = accuracy(model, solve_probe(stats, ridge=config.probe_ridge), evaluation, device=device)
    total = counts["original"][1]
    if total == 0:
        raise TBAInputError("evaluation.data", "no evaluation image has finite features", "check the evaluation images")
    section: dict[str, Any] = {
        "classifier": config.classifier, "method": HEAD if config.classifier == "head" else PROBE,
        "evaluation_images": total, "data": config.data.model_dump(mode="json", exclude={"batch_size", "num_workers"}),
        "correct": {name: c for name, (c, _) in counts.items()},
        "original": counts["original"][0] / total, "compressed": counts["compressed"][0] / counts["compressed"][1]}
    if config.classifier == "probe":
        section |= {"probe_ridge": config.probe_ridge, "probe_images": probe_images}
    _logger.info("accuracy on %d evaluation images (%s): original %.4f, compressed %.4f", total, config.classifier,
                 section["original"], section["compressed"])
    return section
