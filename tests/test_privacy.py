"""Differential privacy of a site's releases: calibration, noise, clipping, policy, ledger, post-processing."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy import stats as scipy_stats

from tba_fed import LinearMap, ViTAdapter, solve_span
from tba_fed.calibrate import collect_span_stats
from tba_fed.data import SyntheticImages
from tba_fed.federation.site import RunSpec, Site, statistics_reply
from tba_fed.plan import Span, parse_plan
from tba_fed.privacy.accounting import RDP_ORDERS, epsilon_spent, noise_multiplier
from tba_fed.errors import TBAInputError
from tba_fed.privacy.ledger import BudgetExceeded, LedgerEntry, PrivacyLedger, ledger_report, now
from tba_fed.privacy.mechanism import NoiseSource
from tba_fed.privacy.passes import collect_clipped_span_sums
from tba_fed.privacy.policy import PolicyRefusal, PrivacyRequest, SitePolicy, check_request
from tba_fed.privacy.postprocess import adassp_ridge, gram_noise_bound, psd_projection
from tba_fed.privacy.clipped import STATISTICS, ClippedSpanSums, SpanBounds, release_weights, to_span_stats
from tba_fed.privacy.release import noisy_spans
from tba_fed.privacy.release_store import ReleaseStore
from tba_fed.privacy.sensitivity import clip_images, span_parts
from tba_fed.stats import SpanStats

from conftest import loader

SPAN = Span(1, 3)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(("epsilon", "releases"), [(0.5, 1), (1.0, 1), (1.0, 3), (4.0, 2), (8.0, 4)])
def test_calibrated_sigma_spends_at_most_the_target_and_within_5_percent(epsilon, releases, accountant):
    sigma = noise_multiplier(epsilon, 1e-5, releases, accountant)
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, 1.0, releases)]
    spent = acc.get_epsilon(delta=1e-5, alphas=list(RDP_ORDERS)) if accountant == "rdp" else acc.get_epsilon(delta=1e-5)
    assert spent <= epsilon * (1 + 1e-9)
    assert spent >= 0.95 * epsilon


def test_rdp_sigma_matches_the_closed_form_of_one_gaussian_release():
    # At q = 1, RDP of order α is α/(2σ²); ε(δ) = min_α α/(2σ²) + log(1/δ)/(α−1) (Opacus' conversion is tighter).
    sigma = noise_multiplier(1.0, 1e-5, 1)
    assert 3.8 < sigma < 4.2  # reference: σ ≈ 4.06 for (1, 1e-5) with RDP (shared notes)
    assert epsilon_spent([(sigma, 1)], 1e-5) == pytest.approx(1.0, rel=0.01)


def _stats(dim: int, rows: int, seed: int) -> SpanStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(rows, dim, generator=g, dtype=torch.float64)
    s = SpanStats.zeros(dim)
    s.update(x, y, images=rows // 4)
    return s


def _clipped(dim: int, images: int, seed: int, bounds: SpanBounds, prior: LinearMap | None = None) -> ClippedSpanSums:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 4, dim, generator=g, dtype=torch.float64)
    y = x + 0.3 * torch.randn(images, 4, dim, generator=g, dtype=torch.float64)
    prior = prior or LinearMap(torch.eye(dim, dtype=torch.float64), None)
    sums = ClippedSpanSums.zeros(dim)
    sums.update(x, y, prior, release_weights({SPAN: (x, y)}, {SPAN: prior}, {SPAN: bounds}))
    return sums


BOUNDS = SpanBounds(gram=30.0, cross_residual=8.0, sum_x=40.0, sum_r=10.0, sum_rr=20.0)


@pytest.mark.parametrize("noise", [NoiseSource.seeded(7), NoiseSource.secure()], ids=["seeded", "secure"])
def test_released_noise_is_gaussian_with_the_calibrated_std(noise):
    dim = 128
    exact = _clipped(dim, 100, 0, BOUNDS)
    parts = span_parts([SPAN], {SPAN: BOUNDS})
    sigma = noise_multiplier(1.0, 1e-5, 1)
    released = noisy_spans({"calibration": {SPAN: exact}}, parts, sigma, noise)["calibration"][SPAN]
    std = {p.name.split(":")[-1]: p.std(sigma) for p in parts}
    upper = torch.triu_indices(dim, dim)
    gram_noise = (released.gram - exact.gram)[upper[0], upper[1]].numpy() / std["gram"]
    cross_noise = (released.cross_residual - exact.cross_residual).flatten().numpy() / std["cross_residual"]
    for sample in (gram_noise, cross_noise):
        assert scipy_stats.kstest(sample, "norm").pvalue > 1e-6
        assert sample.std() == pytest.approx(1.0, rel=0.03)
    assert torch.allclose(released.gram, released.gram.T)  # symmetric noise
    assert std["gram"] == pytest.approx(sigma * 30.0 / math.sqrt(0.45))  # σ·Δ/√share with Δ = B_G


def test_an_auto_release_is_one_mechanism_at_the_same_epsilon_with_sqrt2_times_the_noise_per_statistic():
    """map: auto releases both kinds' sums in one release: the span shares split evenly between the kinds, so the
    release is one Gaussian mechanism with the run's σ (the accountant charges it exactly as a one-kind release),
    and every span statistic of either kind gets √2 times the noise std of a one-kind release of that kind."""
    from tba_fed.federation.releases import auto_cost
    from tba_fed.privacy.sensitivity import kind_span_parts

    spans = [Span(1, 2), Span(3, 5)]
    folded = SpanBounds(gram=12.0, cross_residual=3.0, sum_x=9.0, sum_r=4.0, sum_rr=5.0)
    bounds = {"linear": dict.fromkeys(spans, BOUNDS), "folded": dict.fromkeys(spans, folded)}
    both = {p.name: p for p in kind_span_parts(bounds)}
    sigma = noise_multiplier(4.0, 1e-5, 3)

    def multiplier(parts) -> float:  # (Σ_j (Δ_j/σ_j)²)^(−1/2): the noise multiplier of the whole release
        return sum((p.sensitivity / p.std(sigma)) ** 2 for p in parts) ** -0.5

    for kind, kind_bounds in bounds.items():
        one = {p.name: p for p in span_parts(spans, kind_bounds)}
        assert multiplier(both.values()) == pytest.approx(sigma, rel=1e-12)
        assert multiplier(one.values()) == pytest.approx(sigma, rel=1e-12)
        for span in spans:
            for name in STATISTICS:
                std = both[f"{kind}/{span}:{name}"].std(sigma)
                assert std == pytest.approx(math.sqrt(2) * one[f"{span}:{name}"].std(sigma), rel=1e-12)
                assert std == pytest.approx(sigma * getattr(kind_bounds[span], name) / math.sqrt(
                    {"gram": 0.45, "cross_residual": 0.45}.get(name, 0.025) / 4), rel=1e-12)  # 2 spans x 2 kinds
        assert both["weight"].std(sigma) == one["weight"].std(sigma) == pytest.approx(sigma / math.sqrt(0.025))
    assert set(both) == {"weight"} | {f"{k}/{s}:{n}" for k in bounds for s in spans for n in STATISTICS}
    # the same σ: the run's three releases spend the same ε whether its statistics release carries one kind or two
    spent = epsilon_spent([(multiplier(both.values()), 3)], 1e-5)
    assert spent == pytest.approx(epsilon_spent([(multiplier(one.values()), 3)], 1e-5), rel=1e-9)
    assert spent <= 4.0 * (1 + 1e-9)
    assert auto_cost(bounds, spans[0]) == ("map: auto under privacy: both kinds released, noise std x1.41 per statistic "
                                           "at the same epsilon")


def test_an_auto_release_draws_each_statistic_at_its_std_and_the_shared_count_once_per_split():
    """The noise itself, not just the formula: both kinds' statistics are drawn at √2 × the one-kind std, and the
    count (one weight per image over both kinds) is noised once per split and shared, never drawn twice."""
    from tba_fed.privacy.sensitivity import kind_span_parts

    dim, draws = 6, 400
    bounds = {"linear": {SPAN: BOUNDS}, "folded": {SPAN: SpanBounds(12.0, 3.0, 9.0, 4.0, 5.0)}}
    parts = kind_span_parts(bounds)
    zero = ClippedSpanSums.zeros(dim)
    groups = {f"{kind}/{split}": {SPAN: zero} for kind in bounds for split in ("calibration", "holdout")}
    noise, samples = NoiseSource.seeded(3), {kind: [] for kind in bounds}
    for _ in range(draws):
        released = noisy_spans(groups, parts, 1.0, noise)
        for split in ("calibration", "holdout"):
            assert released[f"linear/{split}"][SPAN].weight == released[f"folded/{split}"][SPAN].weight
        assert released["linear/calibration"][SPAN].weight != released["linear/holdout"][SPAN].weight
        for kind in bounds:
            samples[kind].append(released[f"{kind}/calibration"][SPAN].cross_residual.flatten())
    for kind, kind_bounds in bounds.items():
        one = {p.name: p for p in span_parts([SPAN], kind_bounds)}
        measured = float(torch.cat(samples[kind]).std())
        assert measured == pytest.approx(math.sqrt(2) * one[f"{SPAN}:cross_residual"].std(1.0), rel=0.03)


def test_secure_noise_refuses_a_seed_and_seeded_mode_says_so():
    with pytest.raises(PolicyRefusal, match="seeded noise is not private"):
        check_request(SitePolicy(ledger="x.json"), PrivacyRequest(epsilon=1, delta=1e-5, releases=("statistics",),
                                                                   seed=3), "statistics", 500)
    assert NoiseSource.secure().is_secure and "CSPRNG" in NoiseSource.secure().mode
    assert not NoiseSource.seeded(3).is_secure and "tests only" in NoiseSource.seeded(3).mode
    a, b = NoiseSource.secure().normal((64,), 1.0), NoiseSource.secure().normal((64,), 1.0)
    assert not np.allclose(a, b)
    assert np.array_equal(NoiseSource.seeded(3).normal((8,), 1.0), NoiseSource.seeded(3).normal((8,), 1.0))


class CountingLoader:
    """Counts how many batches anyone read: a refused release must read none."""

    def __init__(self, inner) -> None:
        self.inner, self.batches, self.dataset = inner, 0, inner.dataset

    def __iter__(self):
        for batch in self.inner:
            self.batches += 1
            yield batch


@pytest.mark.parametrize(("policy", "request_", "reason"), [
    ({"epsilon": 0.5}, {"epsilon": 1.0}, "exceeds the site's total budget"),
    ({"delta": 1e-6}, {"delta": 1e-5}, "δ"),
    ({"releases": ("similarity",)}, {}, "does not release 'statistics'"),
    ({"min_images": 100}, {}, r"fewer images than the site's minimum per release \(100\)"),
    ({"max_clip": 1.0}, {}, "exceeds the site's maximum"),
    ({"secure_aggregation": "required"}, {}, "only through secure aggregation"),
    ({}, None, "requires differential privacy"),
])
def test_a_request_outside_the_policy_is_refused_before_any_image_is_read(tmp_path, tiny_vit, policy, request_, reason):
    ledger = tmp_path / "ledger.json"
    site_policy = SitePolicy(**{"min_images": 10, "ledger": ledger, **policy})
    batches = CountingLoader(loader(24))
    site = Site("hospital-a", batches, None, tmp_path, site_policy)
    request = None if request_ is None else PrivacyRequest(**{
        "epsilon": 0.5, "delta": 1e-5, "releases": ("statistics",), "clip_spans": {"1->3": (20.0, 10.0, 5.0, 5.0, 5.0)},
        **request_})
    with pytest.raises(PolicyRefusal, match=reason):
        statistics_reply(tiny_vit, site, parse_plan("1->3", 6), "all", RunSpec("run-1", request),
                         {SPAN: LinearMap(torch.eye(48, dtype=torch.float64), None)})
    assert batches.batches == 0
    assert not ledger.exists()


def test_per_image_weights_bound_what_one_crafted_image_can_change(tiny_vit):
    adapter = ViTAdapter(tiny_vit)
    base = SyntheticImages(16, 32, seed=0)
    crafted = torch.full((1, 3, 32, 32), 1e4)
    prior = LinearMap(torch.eye(48, dtype=torch.float64), None)
    bounds = SpanBounds(gram=20.0, cross_residual=6.0, sum_x=30.0, sum_r=12.0, sum_rr=9.0)

    def sums(extra: bool) -> ClippedSpanSums:
        images = torch.stack([base[i][0] for i in range(16)])
        if extra:
            images = torch.cat([images, crafted])
        return collect_clipped_span_sums(adapter, [(images, torch.zeros(len(images)))], [SPAN], token_mode="all",
                                         bounds={SPAN: bounds}, priors={SPAN: prior})[SPAN]

    with_image, without = sums(True), sums(False)
    for name in ("gram", "cross_residual", "sum_x", "sum_r", "sum_rr"):
        change = float(torch.linalg.norm(getattr(with_image, name) - getattr(without, name)))
        assert change <= getattr(bounds, name) * (1 + 1e-9), name
    assert float(with_image.weight - without.weight) <= 1.0
    assert float(torch.linalg.norm(with_image.gram - without.gram)) > 0.99 * bounds.gram  # it hit the bound
    exact = collect_span_stats(adapter, [(crafted, torch.zeros(1))], [SPAN])[SPAN]
    assert float(torch.linalg.norm(exact.gram)) > 1e3 * bounds.gram
    clipped, count = clip_images(torch.full((2, 3, 4), 10.0), 1.0)
    assert count == 2 and torch.allclose(clipped.flatten(1).norm(dim=1), torch.ones(2, dtype=clipped.dtype))


def test_one_released_count_is_every_spans_weight_sum(tiny_vit):
    """A release carries one count; each image's weight is shared by its spans, so that count is every span's Σw
    (with a weight per span, the second span's count and centred Gram came from the first span's weights)."""
    adapter, spans = ViTAdapter(tiny_vit), [Span(0, 1), Span(2, 5)]
    images = torch.stack([SyntheticImages(12, 32, seed=1)[i][0] for i in range(12)])
    priors = {s: LinearMap(torch.eye(48, dtype=torch.float64), None) for s in spans}
    exact = collect_span_stats(adapter, [(images, torch.zeros(12))], spans)
    tight = 0.5 * float(torch.linalg.norm(exact[spans[0]].gram)) / 12  # clips the first span's images only
    bounds = {spans[0]: SpanBounds(tight, 1e12, 1e12, 1e12, 1e12), spans[1]: SpanBounds(*[1e12] * 5)}
    alone = {s: collect_clipped_span_sums(adapter, [(images, torch.zeros(12))], [s], token_mode="all",
                                          bounds={s: bounds[s]}, priors={s: priors[s]})[s] for s in spans}
    assert float(alone[spans[0]].weight) < 11 and float(alone[spans[1]].weight) == 12  # the spans clip differently
    both = collect_clipped_span_sums(adapter, [(images, torch.zeros(12))], spans, token_mode="all", bounds=bounds,
                                     priors=priors)
    assert float(both[spans[0]].weight) == float(both[spans[1]].weight)
    assert float(both[spans[1]].weight) == pytest.approx(float(alone[spans[0]].weight), rel=1e-12)


def test_residual_form_converts_exactly_to_the_ordinary_sums():
    g = torch.Generator().manual_seed(3)
    prior = LinearMap(torch.randn(6, 6, generator=g, dtype=torch.float64),
                      torch.randn(6, generator=g, dtype=torch.float64))
    huge = SpanBounds(1e12, 1e12, 1e12, 1e12, 1e12)  # no image is down-weighted: the sums must be the exact ones
    sums = _clipped(6, 10, 4, huge, prior)
    g2 = torch.Generator().manual_seed(4)  # the same images _clipped drew
    x = torch.randn(10, 4, 6, generator=g2, dtype=torch.float64)
    y = x + 0.3 * torch.randn(10, 4, 6, generator=g2, dtype=torch.float64)
    exact = SpanStats.zeros(6)
    exact.update(x.reshape(-1, 6), y.reshape(-1, 6), images=10)
    converted = to_span_stats(sums, prior, tokens_per_image=4)
    assert converted.images == 10 and converted.tokens == 40
    for name in ("gram", "cross", "sum_x", "sum_y", "sum_yy"):
        assert torch.allclose(getattr(converted, name), getattr(exact, name), rtol=1e-10, atol=1e-9), name


def _entry(run: str, release: str, sigma: float) -> LedgerEntry:
    return LedgerEntry(run_id=run, release=release, spec_sha256="0" * 64, mechanism="gaussian", noise_multiplier=sigma,
                       noise_std={}, noise="secure", aggregation="local", images=500, epsilon_run=1.0, delta=1e-5,
                       time=now())


def test_ledger_composes_runs_and_refuses_an_over_budget_run(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    sigma = noise_multiplier(1.0, 1e-5, 1)
    ledger.record(_entry("run-1", "statistics", sigma), budget=2.0, delta=1e-5)
    assert ledger.spent(1e-5) == pytest.approx(1.0, rel=0.01)
    ledger.record(_entry("run-2", "statistics", sigma), budget=2.0, delta=1e-5)
    assert 1.0 < ledger.spent(1e-5) <= 2.0  # RDP composition: tighter than adding ε
    before = ledger.path.read_bytes()
    with pytest.raises(BudgetExceeded, match="budget is 2"):
        ledger.record(replace(_entry("run-3", "statistics", sigma), releases=("statistics", "probe", "accuracy")),
                      budget=2.0, delta=1e-5)
    other_spec = replace(_entry("run-2", "statistics", sigma * 100), spec_sha256="1" * 64)
    with pytest.raises(BudgetExceeded, match="already made its 'statistics' release under another specification"):
        ledger.record(other_spec, budget=2.0, delta=1e-5)
    again = ledger.record(_entry("run-2", "statistics", sigma), budget=2.0, delta=1e-5)  # idempotent: nothing spent
    assert again == ledger.entries()[1]
    assert ledger.path.read_bytes() == before
    report = ledger_report(ledger, 2.0, 1e-5)
    assert "run-1" in report and "run-2" in report and "remaining" in report
    fresh = PrivacyLedger(tmp_path / "fresh.json")  # the release being granted counts against the budget too
    with pytest.raises(BudgetExceeded, match="ε=0.99"):
        fresh.record(_entry("run-1", "statistics", sigma), budget=0.5, delta=1e-5)
    assert not fresh.path.exists()


def test_ledger_survives_a_crash_mid_write(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path)
    sigma = noise_multiplier(1.0, 1e-5, 1)
    ledger.record(_entry("run-1", "statistics", sigma), budget=10.0, delta=1e-5)
    before = path.read_bytes()
    # A process dies between writing the new ledger and renaming it into place.
    script = textwrap.dedent(f"""
        import os
        from tba_fed import fileio as mod  # the ledger's atomic write
        from tba_fed.privacy.ledger import LedgerEntry, PrivacyLedger, now
        mod.os.replace = lambda *a: os._exit(9)
        entry = LedgerEntry(run_id="run-2", release="statistics", spec_sha256="1" * 64, mechanism="gaussian",
                            noise_multiplier={sigma}, noise_std={{}}, noise="secure", aggregation="local", images=500,
                            epsilon_run=1.0, delta=1e-5, time=now())
        PrivacyLedger({str(path)!r}).record(entry, budget=10.0, delta=1e-5)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), capture_output=True)
    assert result.returncode == 9
    assert path.read_bytes() == before  # the old, complete ledger
    assert [e.run_id for e in ledger.entries()] == ["run-1"]
    ledger.record(_entry("run-2", "statistics", sigma), budget=10.0, delta=1e-5)
    assert [e.run_id for e in ledger.entries()] == ["run-1", "run-2"]
    path.write_text('{"format": "tba-fed privacy ledger 1", "entries": [{"run_id"')  # torn by hand: fail closed
    with pytest.raises(ValueError, match="unreadable"):
        ledger.record(_entry("run-3", "statistics", sigma), budget=10.0, delta=1e-5)


def test_psd_projection_and_adassp_ridge():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    sym = (a + a.T) / 2
    projected = psd_projection(sym)
    assert float(torch.linalg.eigvalsh(projected)[0]) >= -1e-10
    eig, vec = torch.linalg.eigh(sym)
    assert torch.allclose(projected, (vec * eig.clamp_min(0)) @ vec.T)
    # Well-conditioned Gram, small noise: no ridge needed. Singular Gram: the ridge is the noise bound.
    well = 1e4 * torch.eye(30, dtype=torch.float64)
    assert adassp_ridge(well, 1.0).ridge_lambda == 0.0
    singular = torch.zeros(30, 30, dtype=torch.float64)
    choice = adassp_ridge(singular, 2.0)
    assert choice.ridge_lambda == pytest.approx(gram_noise_bound(30, 2.0))


def test_prior_solve_is_the_closed_form_and_shrinks_toward_the_prior():
    s = _stats(6, 200, seed=1)
    prior = LinearMap(torch.full((6, 6), 0.1, dtype=torch.float64), None)
    lam = 50.0
    m, diag = solve_span(s, bias=False, ridge_lambda=lam, prior=prior)
    expected = torch.linalg.solve(s.gram + lam * torch.eye(6, dtype=torch.float64), s.cross + lam * prior.weight.T)
    assert torch.allclose(m.weight.T, expected, rtol=1e-10, atol=1e-12)
    assert diag.ridge_lambda == lam
    far, _ = solve_span(s, bias=True, ridge_lambda=1e12, prior=prior)
    assert torch.allclose(far.weight, prior.weight, atol=1e-6)


def test_secure_aggregation_ranges_hold_every_noisy_release_and_keep_quantisation_below_the_noise():
    from tba_fed.federation.secure_aggregation import quantisation_error_bound
    from tba_fed.federation.wire import PRIVATE_SPAN, encode_spans, private_span_shapes
    from tba_fed.privacy.ranges import span_ranges

    sums = {split: {SPAN: _clipped(48, 24, k, BOUNDS)} for k, split in enumerate(("calibration", "holdout"))}
    parts = span_parts([SPAN], {SPAN: BOUNDS})
    sigma = noise_multiplier(1.0, 1e-5, 1) / math.sqrt(3)
    ranges = PRIVATE_SPAN.keyed({f"{split}/{SPAN.key}/": span_ranges([SPAN], {SPAN: BOUNDS}, 24, parts, sigma)[SPAN]
                                 for split in ("calibration", "holdout")})
    arrays = encode_spans(noisy_spans(sums, parts, sigma, NoiseSource.seeded(1)))
    shapes = private_span_shapes([SPAN], 48)
    assert set(arrays) == set(ranges) == set(shapes)
    for key, value in arrays.items():
        assert value.shape == shapes[key]
        assert np.abs(value).max() <= ranges[key], key
    gram_noise = next(p for p in parts if p.name.endswith(":gram")).std(sigma)
    assert quantisation_error_bound(ranges["calibration/1-3/gram_triu"], 3, 2**22) < 0.01 * gram_noise


def test_private_solve_can_shrink_the_bias_toward_the_prior_too():
    s = _stats(5, 300, seed=2)
    prior = LinearMap(torch.full((5, 5), 0.2, dtype=torch.float64), torch.full((5,), 3.0, dtype=torch.float64))
    lam = 40.0
    m, _ = solve_span(s, bias=True, ridge_lambda=lam, prior=prior, shrink_bias=True)
    a = torch.zeros(6, 6, dtype=torch.float64)
    a[:5, :5], a[:5, 5], a[5, :5], a[5, 5] = s.gram, s.sum_x, s.sum_x, s.tokens
    a += lam * torch.eye(6, dtype=torch.float64)
    rhs = torch.cat([s.cross + lam * prior.weight.T, (s.sum_y + lam * prior.bias)[None]])
    expected = torch.linalg.solve(a, rhs)
    assert torch.allclose(m.weight.T, expected[:5], rtol=1e-10) and torch.allclose(m.bias, expected[5], rtol=1e-10)
    free, _ = solve_span(s, bias=True, ridge_lambda=lam, prior=prior)
    assert not torch.allclose(free.bias, m.bias)


def _private_site(tmp_path, counting: bool = False) -> tuple[Site, RunSpec]:
    batches = CountingLoader(loader(24))
    site = Site("hospital-a", batches, None, tmp_path, SitePolicy(min_images=10, ledger=tmp_path / "ledger.json"))
    request = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=("statistics",),
                             clip_spans={"1->3": (20.0, 10.0, 5.0, 5.0, 5.0)})
    return site, RunSpec("run-1", request, ("plan=1->3",))


def _statistics(tiny_vit, site: Site, run: RunSpec):
    return statistics_reply(tiny_vit, site, parse_plan("1->3", 6), "all", run,
                            {SPAN: LinearMap(torch.eye(48, dtype=torch.float64), None)})


def test_a_release_asked_again_resends_the_stored_payload_and_spends_nothing_more(tmp_path, tiny_vit):
    site, run = _private_site(tmp_path)
    first = _statistics(tiny_vit, site, run)
    read = site.calibration.batches
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    [entry] = ledger.entries()
    spent = ledger.spent(1e-5)
    again = _statistics(tiny_vit, site, run)  # a restarted site, or Flower delivering the message twice
    assert site.calibration.batches == read  # not recomputed: no image read, no fresh noise
    assert set(again) == set(first) and all(np.array_equal(again[k], first[k]) for k in first)
    assert ledger.entries() == [entry] and ledger.spent(1e-5) == spent
    stored = ReleaseStore(ledger.path).path("run-1", "statistics")
    assert entry.payload_sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))  # altered on disk: refused, never re-noised
    with pytest.raises(TBAInputError, match="does not match the sha256 recorded in the ledger"):
        _statistics(tiny_vit, site, run)
    stored.unlink()
    with pytest.raises(TBAInputError, match="statistics' release but .* is gone"):
        _statistics(tiny_vit, site, run)
    assert ledger.entries() == [entry]


def test_a_release_recorded_but_never_produced_is_produced_once_without_a_second_entry(tmp_path, tiny_vit, monkeypatch):
    site, run = _private_site(tmp_path)
    store_save = ReleaseStore.save

    def crash(*args, **kwargs):  # the site dies after the write-ahead entry, before its payload exists
        raise KeyboardInterrupt

    monkeypatch.setattr(ReleaseStore, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _statistics(tiny_vit, site, run)
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    [granted] = ledger.entries()
    assert granted.payload_sha256 is None  # budget counted, nothing sent
    monkeypatch.setattr(ReleaseStore, "save", store_save)
    payload = _statistics(tiny_vit, site, run)
    [entry] = ledger.entries()
    assert entry.payload_sha256 is not None and entry.time == granted.time
    assert all(np.array_equal(payload[k], v) for k, v in _statistics(tiny_vit, site, run).items())


def test_a_noisy_held_out_identity_error_that_is_not_positive_gives_no_ratio():
    """The ratios divide by the held-out identity error; from noisy sums it can be ≤ 0, and the report showed
    ratios near 1e300. Now there is no ratio, and the report says why."""
    from tba_fed.federation.run_report import privacy_markdown
    from tba_fed.privacy.solve import compare_priors

    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    calibration = SpanStats.zeros(6)
    calibration.update(x, x + 0.1 * torch.randn(40, 6, generator=g, dtype=torch.float64), images=10)
    # noise took Σ‖y‖² so low that the identity's error, Σ‖y‖² − 2 tr C + tr G, is below zero
    holdout = replace(calibration, sum_yy=2 * torch.trace(calibration.cross) - torch.trace(calibration.gram) - 5.0)
    ratios, _ = compare_priors(calibration, holdout, bias=False, ridge_lambda=None, ridge=0.0, public=None)
    assert ratios == {"identity": None, "federated": None}
    markdown = privacy_markdown({"prior": "zero", "prior_comparison": {"1->2": ratios}})
    assert "| 1->2 | n/a (noisy held-out error ≤ 0) | n/a (noisy held-out error ≤ 0) |" in markdown


def test_the_report_gives_no_spread_for_a_span_whose_renoised_draws_were_all_unusable():
    """compare_priors returns an empty spread when every re-noised held-out draw has no ratio: that span's
    row carries no ±, the others keep theirs (it used to end the ServerApp with a KeyError)."""
    from tba_fed.federation.run_report import privacy_markdown

    report = {"prior": "public",
              "prior_comparison": {"1->2": {"identity": 1.0, "federated": 0.5}, "3->5": {"identity": 1.0, "federated": 0.25}},
              "prior_comparison_std": {"1->2": {}, "3->5": {"identity": 0.0, "federated": 0.125}}}
    markdown = privacy_markdown(report)
    assert "| 1->2 | 1.0000 | 0.5000 |" in markdown
    assert "| 3->5 | 1.0000 ± 0.0000 | 0.2500 ± 0.1250 |" in markdown
