import json

import pytest
import torch
import yaml

from tba_fed import ViTAdapter, build_compressed, calibrate, parse_plan
from tba_fed.experiment import Variant, load_experiment_config, original_states, run_experiment, variant_features
from tba_fed.probe import features

from conftest import TINY, loader


@pytest.mark.parametrize("plan,kind", [("1->2, 3->5", "linear"), ("0->3", "identity"), ("4->5", "linear"),
                                       ("0->1, 2->4", "folded"), ("1->2, 3->5", "folded"), ("0->2, 3->4", "auto")])
def test_variant_features_equal_the_compressed_model(tiny_vit, plan, kind):
    result = calibrate(tiny_vit, plan, loader(), loader(16, seed=3) if kind == "auto" else None, bias=True,
                       identity=plan if kind == "identity" else "", map_kind="linear" if kind == "identity" else kind)
    maps = {span: fit.map for span, fit in result.fits.items()}
    adapter = ViTAdapter(tiny_vit)
    images = next(iter(loader(6, seed=5)))[0]
    with torch.no_grad():
        states = original_states(adapter, images)
        got = variant_features(adapter, states, Variant(parse_plan(plan, 6), kind), maps)
        expected = features(build_compressed(tiny_vit, maps), images)
        original = variant_features(adapter, states, Variant(None, "original"), maps)
        assert torch.allclose(got, expected, atol=1e-5)
        assert torch.equal(original, features(tiny_vit, images))


def _config(tmp_path, seeds):
    path = tmp_path / f"exp{len(seeds)}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        "datasets": [{"name": "synth", "train": {"source": "synthetic", "num_images": 120},
                      "test": {"source": "synthetic", "num_images": 40, "seed": 1}}],
        "approximations": ["0->1", "2->4"], "seeds": seeds, "calibration_images": 30, "probe_train_images": 60,
        "probe_test_images": 40, "batch_size": 20, "output": str(tmp_path / "out")}))
    return load_experiment_config(path)


def test_table_rows_and_resume(tmp_path, caplog):
    out = run_experiment(_config(tmp_path, [0]))
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 2 * 2  # original + 2 approximations x (linear, identity)
    linear = next(r for r in rows if r["approximation"] == "2->4" and r["kind"] == "linear")
    identity = next(r for r in rows if r["approximation"] == "2->4" and r["kind"] == "identity")
    assert linear["params_removed"] == 2 * 28_272 - (48 * 48 + 48) and identity["params_removed"] == 2 * 28_272
    assert linear["calibration_relative_error"] < identity["calibration_relative_error"]
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    table = (out / "table.md").read_text()
    assert "| 2->4 | linear |" in table and "| original |" in table and "± 0.00" in table
    # a second run with one more seed recomputes only the new seed
    caplog.set_level("INFO", logger="tba_fed.experiment")
    run_experiment(_config(tmp_path, [0, 1]))
    assert "synth seed 0: already done, skipped" in caplog.text
    rows = (out / "rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 5 and sorted({json.loads(r)["seed"] for r in rows}) == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert next(s for s in summary if s["approximation"] == "original")["seeds"] == 2


def test_folded_and_auto_rows(tmp_path):
    config = _config(tmp_path, [0]).model_copy(update={"maps": ["linear", "folded", "auto"], "holdout_images": 20})
    out = run_experiment(config)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 2 * 4  # original + 2 approximations x (linear, folded, auto, identity)
    cell = {(r["approximation"], r["kind"]): r for r in rows}
    assert cell[("2->4", "folded")]["params_removed"] == 2 * 28_272  # a folded map adds nothing
    for approx in ("0->1", "2->4"):
        auto = cell[(approx, "auto")]
        errors = auto["holdout_errors"][approx]
        chosen = min(errors, key=errors.get)
        assert auto["span_kinds"] == {approx: chosen}
        assert auto["accuracy"] == cell[(approx, chosen)]["accuracy"]  # the same maps as that kind's row
        assert auto["params_removed"] == cell[(approx, chosen)]["params_removed"]
        # every kind's calibration error is of the span's output: the identity's is the largest
        assert max(cell[(approx, k)]["calibration_relative_error"] for k in ("linear", "folded")) \
            < cell[(approx, "identity")]["calibration_relative_error"]
    assert "| 2->4 | folded |" in (out / "table.md").read_text()
