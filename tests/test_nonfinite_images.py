"""An image whose activations are not finite is left out of every release, on its own values alone.

One NaN or ±inf image used to turn a private release into NaN (the server rejects it after the site has
spent its budget) or end the pass with an error. Leaving it out is a decision about that image only, so the
release must equal the release without it (record-level DP), and the site's ledger holds one entry per release.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tba_fed import LinearMap, ViTAdapter
from tba_fed.calibrate import collect_similarity, collect_span_stats
from tba_fed.compressed import build_compressed
from tba_fed.data import SyntheticImages
from tba_fed.errors import TBAInputError
from tba_fed.federation.site import RunSpec, Site, accuracy_reply, probe_reply, similarity_reply, statistics_reply
from tba_fed.plan import Span, parse_plan
from tba_fed.privacy.clipped import SpanBounds
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.passes import collect_clipped_kind_sums
from tba_fed.privacy.policy import RELEASES, PrivacyRequest, SitePolicy
from tba_fed.probe import accuracy, collect_probe_stats, solve_probe

SPAN = Span(1, 3)
IDENTITY = LinearMap(torch.eye(48, dtype=torch.float64), None)
BAD_AT = 11  # inside the second batch of eight


def _bad_image(kind: str) -> torch.Tensor:
    image = torch.zeros(3, 32, 32)
    if kind == "inf":
        image[1, 5, 7] = float("inf")
    elif kind == "nan":
        image[0, 0, 0] = float("nan")
    else:  # finite pixels whose patch embedding overflows float32
        image.fill_(1e38)
    return image


def _data(num: int, seed: int, bad: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    base = SyntheticImages(num, 32, seed=seed)
    images = torch.stack([base[i][0] for i in range(num)])
    labels = torch.tensor([int(base[i][1]) for i in range(num)])
    if bad is not None:
        images = torch.cat([images[:BAD_AT], _bad_image(bad)[None], images[BAD_AT:]])
        labels = torch.cat([labels[:BAD_AT], torch.tensor([0]), labels[BAD_AT:]])
    return images, labels


def _batches(num: int, seed: int, bad: str | None) -> DataLoader:
    """Batches of eight; with `bad`, the bad image joins the second batch, so both datasets' good images
    fall into the same batches in the same order."""
    images, labels = _data(num, seed, bad)
    starts = [0, 8, *range(16 + (bad is not None), len(images), 8)]
    batches = [list(range(a, b)) for a, b in zip(starts, [*starts[1:], len(images)]) if a < len(images)]
    return DataLoader(TensorDataset(images, labels), batch_sampler=batches)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "non-finite" in r.getMessage()]


@pytest.mark.parametrize("bad", ["inf", "nan", "overflow"])
def test_exact_passes_leave_the_image_out_and_equal_the_pass_without_it(tiny_vit, bad, caplog):
    adapter = ViTAdapter(tiny_vit)
    spans = [Span(0, 1), SPAN]
    with caplog.at_level(logging.WARNING):
        with_bad = collect_span_stats(adapter, _batches(24, 0, bad), spans)
    assert _warnings(caplog) == ["statistics: left out 1 image(s) with non-finite activations"]
    without = collect_span_stats(adapter, _batches(24, 0, None), spans)
    for span in spans:
        assert with_bad[span].images == without[span].images == 24
        assert with_bad[span].tokens == without[span].tokens
        for name in ("gram", "cross", "sum_x", "sum_y", "sum_yy"):
            assert torch.equal(getattr(with_bad[span], name), getattr(without[span], name)), (span, name)
    similarity = collect_similarity(adapter, _batches(24, 0, bad)), collect_similarity(adapter, _batches(24, 0, None))
    assert similarity[0].images == similarity[1].images == 24
    for name in ("sq_dist", "cos_sum", "angle_sum", "sq_norm"):
        assert torch.equal(getattr(similarity[0], name), getattr(similarity[1], name)), name
    probe = collect_probe_stats(tiny_vit, _batches(24, 0, bad), 10), collect_probe_stats(tiny_vit, _batches(24, 0, None), 10)
    assert probe[0].images == probe[1].images == 24
    for name in ("gram", "cross", "sum_f", "class_counts"):
        assert torch.equal(getattr(probe[0], name), getattr(probe[1], name)), name
    head = solve_probe(probe[1])
    assert accuracy(tiny_vit, head, _batches(24, 0, bad)) == accuracy(tiny_vit, head, _batches(24, 0, None))


def test_a_clipped_pass_leaves_the_image_out_too(tiny_vit):
    adapter = ViTAdapter(tiny_vit)
    bounds = {"linear": {SPAN: SpanBounds(gram=20.0, cross_residual=6.0, sum_x=30.0, sum_r=12.0, sum_rr=9.0)}}
    sums = [collect_clipped_kind_sums(adapter, _batches(24, 0, bad), [SPAN], token_mode="all", bounds=bounds,
                                      priors={"linear": {SPAN: IDENTITY}})["linear"][SPAN] for bad in ("inf", None)]
    assert sums[0].images == sums[1].images == 24
    for name in ("gram", "cross_residual", "sum_x", "sum_r", "sum_rr", "weight"):
        assert torch.equal(getattr(sums[0], name), getattr(sums[1], name)), name


def test_a_batch_of_only_bad_images_adds_nothing_and_no_finite_image_at_all_is_an_error(tiny_vit, caplog):
    adapter = ViTAdapter(tiny_vit)
    good = _batches(8, 0, None)
    bad_batch = (torch.stack([_bad_image("inf"), _bad_image("overflow")]), torch.zeros(2, dtype=torch.long))
    with caplog.at_level(logging.WARNING):
        with_bad = collect_span_stats(adapter, [*good, bad_batch], [SPAN])[SPAN]
    assert _warnings(caplog) == ["statistics: left out 2 image(s) with non-finite activations"]
    without = collect_span_stats(adapter, good, [SPAN])[SPAN]
    assert with_bad.images == 8 and torch.equal(with_bad.gram, without.gram)
    with pytest.raises(TBAInputError, match="data: no images with finite activations"):
        collect_span_stats(adapter, [bad_batch], [SPAN])
    with pytest.raises(TBAInputError, match="data: no images with finite activations"):
        collect_similarity(adapter, [bad_batch])
    with pytest.raises(TBAInputError, match="data: no labelled images for the probe"):
        collect_probe_stats(tiny_vit, [bad_batch], 10)
    head = solve_probe(collect_probe_stats(tiny_vit, good, 10))
    assert accuracy(tiny_vit, head, [bad_batch]) == (0, 0)


def _site(tmp_path, bad: str | None) -> Site:
    policy = SitePolicy(min_images=5, releases=RELEASES, allow_seeded_noise=True, ledger=tmp_path / "ledger.json")
    return Site("hospital-a", _batches(24, 0, bad), _batches(16, 7, bad), tmp_path, policy)


REQUEST = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=RELEASES, seed=5,
                         clip_spans={str(SPAN): (20.0, 10.0, 5.0, 5.0, 5.0)}, clip_blocks=(4.0,) * 6, clip_features=3.0)


# The passes behind each release: statistics reads calibration and held-out images, probe and accuracy two models.
PASSES = {"similarity": ["similarity"], "statistics": ["statistics"] * 2, "probe": ["probe"] * 2,
          "accuracy": ["accuracy"] * 2}


def _release(tiny_vit, tmp_path, bad: str | None, release: str) -> dict[str, np.ndarray]:
    """One private release through the site's own functions (seeded noise: the same draws with and without)."""
    site, run = _site(tmp_path, bad), RunSpec("run-1", REQUEST, ("plan=1->3",))
    compressed = build_compressed(tiny_vit, {SPAN: IDENTITY})
    if release == "similarity":
        return similarity_reply(tiny_vit, site, "all", run)
    if release == "statistics":
        return statistics_reply(tiny_vit, site, parse_plan("1->3", 6), "all", run, {"linear": {SPAN: IDENTITY}})
    if release == "probe":
        return probe_reply(tiny_vit, compressed, site, 10, run)
    clean = _batches(24, 0, None)
    heads = {"original": solve_probe(collect_probe_stats(tiny_vit, clean, 10)),
             "compressed": solve_probe(collect_probe_stats(compressed, clean, 10))}
    return {k: np.asarray(v) for k, v in accuracy_reply(tiny_vit, compressed, site, heads, run).items()}


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("bad", ["inf", "overflow"])
def test_a_private_release_with_a_bad_image_equals_the_release_without_it(tiny_vit, tmp_path, bad, release, caplog):
    with caplog.at_level(logging.WARNING):
        with_bad = _release(tiny_vit, tmp_path / "with", bad, release)
        without = _release(tiny_vit, tmp_path / "without", None, release)
    assert set(with_bad) == set(without)
    for key, value in with_bad.items():
        assert np.isfinite(value).all(), key
        np.testing.assert_allclose(value, without[key], rtol=1e-12, atol=0, err_msg=key)
    assert _warnings(caplog) == [f"{desc}: left out 1 image(s) with non-finite activations" for desc in PASSES[release]]
    for folder in ("with", "without"):
        [entry] = PrivacyLedger(tmp_path / folder / "ledger.json").entries()
        assert entry.release == release and entry.payload_sha256 is not None
