import pytest
import torch

from tba_fed import LinearMap, SpanStats, TBAInputError, ViTAdapter, fit_quality, solve_span
from tba_fed.calibrate import collect_span_stats
from tba_fed.plan import Span

from conftest import loader, stacked_rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("token_mode", ["all", "cls"])
def test_solution_equals_lstsq_on_stacked_activations(tiny_vit, bias, token_mode):
    span = Span(1, 3)
    data = loader(80) if token_mode == "cls" else loader()
    stats = collect_span_stats(ViTAdapter(tiny_vit), data, [span], token_mode=token_mode)[span]
    x = stacked_rows(tiny_vit, data, span.start, token_mode)
    y = stacked_rows(tiny_vit, data, span.end, token_mode)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) if bias else x
    reference = torch.linalg.lstsq(design, y, driver="gelsd").solution
    linear_map, diag = solve_span(stats, bias=bias)
    assert diag.method == "cholesky"
    got = torch.cat([linear_map.weight.T, linear_map.bias[None]]) if bias else linear_map.weight.T
    assert float((got - reference).norm() / reference.norm()) < 1e-8
    # fit quality from the sums equals the residual of the stacked rows
    residual = float((y - linear_map.apply(x)).square().sum())
    quality = fit_quality(stats, linear_map)
    assert quality.sse == pytest.approx(residual, rel=1e-7)
    assert quality.relative_error == pytest.approx(residual / float(y.square().sum()), rel=1e-7)
    assert quality.r2 == pytest.approx(1 - residual / float((y - y.mean(0)).square().sum()), rel=1e-7)
    assert diag.condition_number == pytest.approx(float(torch.linalg.cond(design.T @ design)), rel=1e-6)


def test_identity_quality_is_the_error_of_dropping_blocks(tiny_vit):
    span = Span(0, 4)
    stats = collect_span_stats(ViTAdapter(tiny_vit), loader(), [span])[span]
    x, y = stacked_rows(tiny_vit, loader(), 0), stacked_rows(tiny_vit, loader(), 4)
    q = fit_quality(stats, LinearMap.identity(stats.dim))
    assert q.relative_error == pytest.approx(float((y - x).square().sum() / y.square().sum()), rel=1e-8)


def test_ridge_matches_closed_form_and_singular_gram_falls_back_to_pinv():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    x[:, 5] = x[:, 4]  # rank-deficient: G is singular
    y = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    stats = SpanStats.zeros(6)
    stats.update(x, y, images=50)
    linear_map, diag = solve_span(stats, bias=False, ridge=0.0)
    assert diag.method == "pinv"
    assert torch.allclose(linear_map.weight.T, torch.linalg.pinv(x) @ y, atol=1e-10)
    ridge = 0.1
    lam = ridge * float(torch.trace(x.T @ x)) / 6
    linear_map, diag = solve_span(stats, bias=False, ridge=ridge)
    expected = torch.linalg.solve(x.T @ x + lam * torch.eye(6, dtype=torch.float64), x.T @ y)
    assert diag.method == "cholesky" and diag.ridge_lambda == pytest.approx(lam)
    assert torch.allclose(linear_map.weight.T, expected, atol=1e-12)
    with pytest.raises(TBAInputError, match="ridge"):
        solve_span(stats, ridge=-1.0)
    with pytest.raises(TBAInputError, match="no calibration tokens"):
        solve_span(SpanStats.zeros(6))
