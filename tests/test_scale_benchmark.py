"""The scale benchmark's quick mode: a real loopback deployment (flower-superlink with TLS, SuperNode
authentication and SQLite; 2 flower-supernode processes; `flwr run`) at d=64 whose maps must equal the
centralised solve, with every Flower process it started stopped afterwards."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real SuperLink and SuperNode processes

REPO = Path(__file__).resolve().parents[1]
SPANS, DIM = 5, 64  # --quick: the fewest one-block spans whose reply is >= 0.5 MB at d=64


def test_a_benchmark_site_refuses_a_release_by_chance_at_most_once_in_a_thousand(monkeypatch):
    """Each site splits its images with its own random key, so the held-out part's size is Binomial(images,
    fraction); below min_images the site refuses and the run fails (it did in CI, in --quick: min_images 5 of 24
    images, probability 0.46 per site)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # a script beside its helper modules, not a package
    bench = importlib.import_module("scale_deployment")
    p = bench.HOLDOUT_FRACTION
    for n in (bench.IMAGES, bench.QUICK_IMAGES):  # the full benchmark's sites, and --quick's (this file's run)
        too_few = sum(math.comb(n, k) * q ** k * (1 - q) ** (n - k)  # either part below min_images
                      for q in (p, 1 - p) for k in range(bench.MIN_IMAGES))
        assert too_few <= 1e-3, (n, too_few)


def test_quick_scale_benchmark_deploys_measures_and_checks_its_maps(tmp_path):
    out = tmp_path / "scale.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks/scale_deployment.py"), "--quick", "--out", str(out)],
                               cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads(out.read_text())
    per_span = 2 * (DIM * (DIM + 1) // 2 + DIM * DIM + 2 * DIM + 3) * 8  # 2 splits: packed Gram, cross, sums, counts
    assert results["payload_bytes"] == SPANS * per_span == 504_560
    assert results["plan"] == "1->2, 3->4, 5->6, 7->8, 9->10" and results["model"]["kwargs"]["depth"] == 11
    (run,) = results["runs"]
    assert run["sites"] == 2 and run["max_relative_error"] < 1e-9
    statistics, install = run["rounds"]
    assert statistics["name"] == "statistics" and statistics["bytes_from_site"] == [504_560]
    assert install["name"] == "install" and install["bytes_to_site"] == [SPANS * (DIM * DIM + DIM) * 8]
    for role in ("server_app", "superlink", "clientapp", "supernode"):
        assert statistics[role]["peak_rss_mib"] > 50, role  # every process was found and sampled
    assert statistics["clientapp"]["processes"] == 2  # one ClientApp per site for the message
    assert results["clientapp_turns"] == 4  # each site's SuperExec launched a ClientApp in each of the 2 rounds
    assert results["processes"]["left_running"] == [] and results["passed"]
    assert "maps vs centralised solve on the union" in completed.stdout
