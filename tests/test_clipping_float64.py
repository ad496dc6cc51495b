"""Clipping happens in float64: a clipped image's norm is within its bound up to float64 rounding.

Scaling a float32 image by bound/‖x‖ rounds each entry to float32, so its norm could exceed the bound by
~1e-7 relative, and every sensitivity derived from the bound with it.
"""

from __future__ import annotations

import torch

from tba_fed import ViTAdapter
from tba_fed.data import SyntheticImages
from tba_fed.privacy.passes import collect_clipped_probe_stats, collect_clipped_similarity
from tba_fed.privacy.sensitivity import clip_images

TOLERANCE = 1 + 1e-12  # float64 rounding only


def test_clipped_float32_activations_are_within_the_bound_in_float64():
    g = torch.Generator().manual_seed(0)
    scales = 10 ** (4 * torch.rand(512, 1, 1, generator=g) - 1)  # norms from well below to far above the bound
    x = (torch.randn(512, 17, 48, generator=g) * scales).to(torch.float32)
    bound = 30.0
    clipped, count = clip_images(x, bound)
    norms, after = x.double().flatten(1).norm(dim=1), clipped.double().flatten(1).norm(dim=1)
    assert float(after.max()) <= bound * TOLERANCE
    assert clipped.dtype == torch.float64
    assert count == int((norms > bound).sum()) and 100 < count < 500
    assert torch.allclose(after[norms > bound], torch.full((count,), bound, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(clipped[norms <= bound], x[norms <= bound].double())  # images within the bound are untouched


def _crafted(n: int) -> list[torch.Tensor]:
    """Ordinary images pushed away from zero at different strengths: each lands far beyond the bounds."""
    base = SyntheticImages(n, 32, seed=3)
    return [(base[i][0] * (1 + 3 * i))[None] for i in range(n)]


def test_one_image_contributes_within_the_similarity_bounds(tiny_vit):
    adapter = ViTAdapter(tiny_vit)
    clip = (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    tokens = adapter.tokens_per_image("all")
    for image in _crafted(12):
        alone = collect_clipped_similarity(adapter, [image], clip)  # the pass over one image is its contribution
        assert alone.images == 1
        for b, c_b in enumerate(clip):
            assert float(alone.sq_norm[b]) <= c_b**2 * TOLERANCE, b
            assert float(alone.sq_norm[b]) >= c_b**2 * (1 - 1e-12), b  # it was clipped, to the bound
            for a in range(b):
                assert float(alone.sq_dist[a, b]) <= (clip[a] + c_b) ** 2 * TOLERANCE, (a, b)
                assert abs(float(alone.cos_sum[a, b])) <= tokens and 0 <= float(alone.angle_sum[a, b]) <= tokens


def test_one_image_contributes_within_the_probe_bound(tiny_vit):
    c = 0.5
    for image in _crafted(12):
        alone = collect_clipped_probe_stats(tiny_vit, [(image, torch.tensor([2]))], 10, c)
        assert float(alone.sum_f.norm()) <= c * TOLERANCE
        assert float(torch.linalg.norm(alone.gram)) <= c * c * TOLERANCE
        assert float(alone.cross.norm()) <= c * TOLERANCE
