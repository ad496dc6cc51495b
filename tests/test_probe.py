import numpy as np
import pytest
import torch

from tba_fed import TBAInputError
from tba_fed.probe import ProbeStats, accuracy, collect_probe_stats, features, solve_probe

from conftest import loader


def _stacked(model, batches):
    feats, labels = [], []
    with torch.no_grad():
        for images, y in batches:
            feats.append(features(model, images).double())
            labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def test_closed_form_equals_lstsq_on_stacked_features(tiny_vit):
    """Final-LayerNorm features lie (up to float32 noise) in a hyperplane, so [f, 1] has cond ~1e8 and
    plain normal equations cannot match lstsq without a ridge; with the default ridge the ridge rows are
    stacked under the design and lstsq solves exactly the same problem."""
    batches = loader(120, batch_size=20)
    ridge = 1e-6
    head = solve_probe(collect_probe_stats(tiny_vit, batches, 10), ridge=ridge)
    f, y = _stacked(tiny_vit, batches)
    d = f.shape[1]
    lam = ridge * float((f * f).sum()) / d
    design = torch.cat([torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1),
                        torch.cat([lam ** 0.5 * torch.eye(d, dtype=f.dtype), torch.zeros(d, 1, dtype=f.dtype)], dim=1)])
    targets = torch.cat([torch.nn.functional.one_hot(y, 10).double(), torch.zeros(d, 10, dtype=f.dtype)])
    reference = torch.linalg.lstsq(design, targets, driver="gelsd").solution
    got = torch.cat([head.weight.T, head.bias[None]])
    assert float((got - reference).norm() / reference.norm()) < 1e-8


def test_ridge_equals_hand_written_solution(tiny_vit):
    batches = loader(40, batch_size=20)
    f, y = _stacked(tiny_vit, batches)
    ridge = 0.05
    lam = ridge * float((f * f).sum()) / f.shape[1]
    design = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    penalty = torch.diag(torch.cat([torch.full((f.shape[1],), lam, dtype=f.dtype), torch.zeros(1, dtype=f.dtype)]))
    expected = torch.linalg.solve(design.T @ design + penalty, design.T @ torch.nn.functional.one_hot(y, 10).double())
    head = solve_probe(collect_probe_stats(tiny_vit, batches, 10), ridge=ridge)
    assert torch.allclose(torch.cat([head.weight.T, head.bias[None]]), expected, atol=1e-10)


def test_merged_statistics_equal_one_pass_and_round_trip(tiny_vit):
    data = list(loader(48, batch_size=8))
    whole = collect_probe_stats(tiny_vit, data, 10)
    merged = sum(collect_probe_stats(tiny_vit, part, 10) for part in (data[:1], data[1:4], data[4:]))
    for name in ("gram", "cross", "sum_f", "class_counts"):
        a, b = getattr(merged, name), getattr(whole, name)
        assert float((a - b).norm() / b.norm()) < 1e-12
    assert merged.images == 48 and int(whole.class_counts.sum()) == 48
    back = ProbeStats.from_arrays(whole.to_arrays())
    assert torch.equal(back.cross, whole.cross)
    arrays = whole.to_arrays()
    with pytest.raises(TBAInputError, match="ProbeStats.gram: dtype"):
        ProbeStats.from_arrays(dict(arrays, gram=arrays["gram"].astype(np.float32)))
    with pytest.raises(TBAInputError, match="missing"):
        ProbeStats.from_arrays({k: v for k, v in arrays.items() if k != "class_counts"})


def test_accuracy_matches_hand_computation_and_beats_chance(tiny_vit):
    train, test = loader(200, batch_size=25), loader(100, seed=9, batch_size=25)
    head = solve_probe(collect_probe_stats(tiny_vit, train, 10))
    correct, total = accuracy(tiny_vit, head, test)
    f, y = _stacked(tiny_vit, test)
    assert total == 100 and correct == int((head.logits(f).argmax(1) == y).sum())
    train_correct, train_total = accuracy(tiny_vit, head, train)
    assert train_correct / train_total > 0.5  # synthetic labels carry a colour shift: far above 0.1 chance


def test_bad_labels_are_rejected(tiny_vit):
    stats = ProbeStats.zeros(48, 3)
    with pytest.raises(TBAInputError, match=r"labels must lie in \[0, 3\)"):
        stats.update(torch.zeros(2, 48), torch.tensor([0, 5]))
