import numpy as np
import pytest
import torch

from tba_fed import SimilarityStats, SpanStats, TBAInputError, ViTAdapter
from tba_fed.calibrate import collect_similarity, collect_span_stats
from tba_fed.plan import Span

from conftest import loader, stacked_rows

SPANS = [Span(0, 1), Span(2, 4)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("token_mode", ["all", "cls", "patch"])
def test_span_stats_equal_stacked_sums(tiny_vit, token_mode):
    stats = collect_span_stats(ViTAdapter(tiny_vit), loader(), SPANS, token_mode=token_mode)
    for span in SPANS:
        x = stacked_rows(tiny_vit, loader(), span.start, token_mode)
        y = stacked_rows(tiny_vit, loader(), span.end, token_mode)
        s = stats[span]
        assert s.tokens == x.shape[0] and s.images == 24
        assert _rel(s.gram, x.T @ x) < 1e-12
        assert _rel(s.cross, x.T @ y) < 1e-12
        assert _rel(s.sum_x, x.sum(0)) < 1e-12 and _rel(s.sum_y, y.sum(0)) < 1e-12
        assert abs(float(s.sum_yy) - float(y.square().sum())) / float(y.square().sum()) < 1e-12
    rows_per_image = {"all": 17, "cls": 1, "patch": 16}[token_mode]
    assert stats[SPANS[0]].tokens == 24 * rows_per_image


@pytest.mark.parametrize("split", [[24], [8, 16], [8, 8, 8], [16, 8]])
def test_merged_statistics_equal_one_pass(tiny_vit, split):
    adapter = ViTAdapter(tiny_vit)
    data = [b for b in loader(batch_size=8)]
    whole_span = collect_span_stats(adapter, data, SPANS)
    whole_sim = collect_similarity(adapter, data)
    parts, start = [], 0
    for size in split:
        parts.append(data[start // 8:(start + size) // 8])
        start += size
    span_parts = [collect_span_stats(adapter, p, SPANS) for p in parts]
    sim = sum(collect_similarity(adapter, p) for p in parts)
    for span in SPANS:
        merged = sum(part[span] for part in span_parts)
        for name in ("gram", "cross", "sum_x", "sum_y", "sum_yy"):
            assert _rel(getattr(merged, name), getattr(whole_span[span], name)) < 1e-12
        assert merged.tokens == whole_span[span].tokens
    for name in ("sq_dist", "cos_sum", "angle_sum", "sq_norm"):
        assert _rel(getattr(sim, name), getattr(whole_sim, name)) < 1e-12
    assert sim.images == 24


def test_similarity_metrics_match_direct_computation(tiny_vit):
    stats = collect_similarity(ViTAdapter(tiny_vit), loader())
    a, b = stacked_rows(tiny_vit, loader(), 1), stacked_rows(tiny_vit, loader(), 4)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    assert stats.metric("mse")[1, 4] == pytest.approx(float((b - a).square().sum() / b.square().sum()), rel=1e-10)
    assert stats.metric("cosine")[1, 4] == pytest.approx(float(1 - cos.mean()), rel=1e-10)
    assert stats.metric("angular")[1, 4] == pytest.approx(float(torch.arccos(cos.clamp(-1, 1)).mean() / np.pi), rel=1e-8)
    assert np.isnan(stats.metric("mse")[4, 1])


def test_arrays_round_trip_and_validation(tiny_vit):
    stats = collect_span_stats(ViTAdapter(tiny_vit), loader(), SPANS)[SPANS[0]]
    arrays = stats.to_arrays()
    assert all(v.dtype == np.float64 for v in arrays.values())
    back = SpanStats.from_arrays(arrays)
    assert torch.equal(back.gram, stats.gram) and back.tokens == stats.tokens
    bad = dict(arrays, gram=arrays["gram"].astype(np.float32))
    with pytest.raises(TBAInputError, match="SpanStats.gram: dtype"):
        SpanStats.from_arrays(bad)
    bad = dict(arrays)
    bad["cross"] = arrays["cross"].copy()
    bad["cross"][0, 0] = np.nan
    with pytest.raises(TBAInputError, match="NaN"):
        SpanStats.from_arrays(bad)
    with pytest.raises(TBAInputError, match="missing"):
        SpanStats.from_arrays({k: v for k, v in arrays.items() if k != "sum_yy"})
    sim = collect_similarity(ViTAdapter(tiny_vit), loader())
    assert torch.equal(SimilarityStats.from_arrays(sim.to_arrays()).sq_dist, sim.sq_dist)
    with pytest.raises(TBAInputError, match="cannot merge"):
        _ = stats + SpanStats.zeros(stats.dim + 1)


def test_nan_activations_are_left_out_and_empty_data_is_rejected(tiny_vit):
    adapter = ViTAdapter(tiny_vit)
    images = torch.zeros(2, 3, 32, 32)
    images[0, 0, 0, 0] = float("nan")
    assert collect_span_stats(adapter, [images], SPANS)[SPANS[0]].images == 1  # more in test_nonfinite_images
    with pytest.raises(TBAInputError, match="data: no images with finite activations"):
        collect_span_stats(adapter, [images[:1]], SPANS)
    rows = torch.zeros(2, 48)
    rows[0, 0] = float("nan")
    with pytest.raises(TBAInputError, match="activations: .*NaN"):  # the accumulator itself still refuses them
        SpanStats.zeros(48).update(rows, rows, images=1)
    with pytest.raises(TBAInputError, match="data: no images"):
        collect_span_stats(adapter, [], SPANS)
    with pytest.raises(TBAInputError, match="token_mode"):
        collect_span_stats(adapter, loader(), SPANS, token_mode="tokens")
