import logging

import numpy as np
import pytest

from tba_fed import TBAInputError
from tba_fed.partition import class_histograms, log_histograms, partition

TARGETS = np.repeat(np.arange(10), 100)[np.random.default_rng(0).permutation(1000)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("num_sites", [1, 3, 7])
def test_partitions_are_deterministic_disjoint_complete(scheme, num_sites):
    parts = partition(TARGETS, num_sites, scheme=scheme, alpha=0.1, seed=4)
    again = partition(TARGETS, num_sites, scheme=scheme, alpha=0.1, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    joined = np.concatenate(parts)
    assert len(joined) == len(TARGETS) and np.array_equal(np.sort(joined), np.arange(len(TARGETS)))
    assert min(len(p) for p in parts) >= 1
    hist = class_histograms(TARGETS, parts, 10)
    assert np.array_equal(hist.sum(axis=0), np.full(10, 100))
    if num_sites > 1:
        other = partition(TARGETS, num_sites, scheme=scheme, alpha=0.1, seed=5)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_is_skewed_and_iid_is_not():
    def max_share(parts):
        hist = class_histograms(TARGETS, parts, 10)
        return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))

    iid = max_share(partition(TARGETS, 5, scheme="iid", seed=0))
    skewed = max_share(partition(TARGETS, 5, scheme="dirichlet", alpha=0.1, seed=0))
    shards = class_histograms(TARGETS, partition(TARGETS, 5, scheme="shards", shards_per_site=2, seed=0), 10)
    assert iid < 0.2  # 10 balanced classes: about 0.1 each
    assert skewed > 0.4
    assert ((shards > 0).sum(axis=1) <= 3).all()  # two shards touch at most 2-3 classes


def test_partition_errors():
    with pytest.raises(TBAInputError, match="data.num_images"):
        partition(TARGETS[:3], 5)
    with pytest.raises(TBAInputError, match="scheme"):
        partition(TARGETS, 2, scheme="random")  # type: ignore[arg-type]
    assert "total" in log_histograms(TARGETS, partition(TARGETS, 2), 10)


def test_the_class_histogram_is_one_log_line_and_a_table_for_the_report(caplog):
    caplog.set_level(logging.INFO, "tba_fed.partition")
    targets = np.array([0, 1, 1, 2, 2, 2])
    table = log_histograms(targets, [np.array([0, 1]), np.array([2, 3, 4, 5])], 3)
    assert [r.getMessage() for r in caplog.records] == \
        ["class histogram per site (classes 0-2; total): site 0: 1 1 0 (2); site 1: 0 1 3 (4)"]
    assert table.splitlines()[1:] == ["   0 |     1     1     0 |     2", "   1 |     0     1     3 |     4"]
