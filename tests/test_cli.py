import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tba_fed import load_compressed
from tba_fed.cli import main
from tba_fed.config import load_config
from tba_fed.errors import TBAInputError

TINY_FLAGS = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=32", "--model-arg", "patch_size=8",
              "--model-arg", "depth=6", "--model-arg", "embed_dim=48", "--model-arg", "num_heads=3"]


@pytest.fixture()
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    return tmp_path / "images"


def test_compress_image_folder_with_budget(tmp_path, image_folder, capsys):
    out = tmp_path / "out"
    code = main(["compress", *TINY_FLAGS, "--data", str(image_folder), "--num-images", "20",
                 "--holdout-fraction", "0.25", "--batch-size", "4", "--budget-blocks", "2", "--output", str(out)])
    assert code == 0
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    # each of the 20 images is held out with probability 0.25, decided from its own bytes (development key, seed 0)
    assert manifest["calibration_images"] + manifest["holdout_images"] == 20 and manifest["holdout_images"] > 0
    assert manifest["model"]["kwargs"]["depth"] == 6
    assert sum(int(s.split("->")[1]) - int(s.split("->")[0]) for s in manifest["plan"].split(", ")) == 2
    assert {p.name for p in out.iterdir()} >= {"maps.safetensors", "manifest.yaml", "report.md", "similarity.png"}
    report = json.loads((out / "report.json").read_text())
    assert report["spans"][0]["holdout_relative_error"] is not None
    model = load_compressed(out)
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 1000)
    assert "compressed model written to" in capsys.readouterr().out


def test_yaml_config_with_flag_overrides(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 4,
                                                             "embed_dim": 48, "num_heads": 3}},
        "data": {"source": "synthetic", "num_images": 12, "batch_size": 6},
        "plan": "0->1", "output": str(tmp_path / "from-yaml")}))
    out = tmp_path / "from-flag"
    assert main(["compress", "--config", str(config), "--plan", "1->3", "--no-bias", "--ridge", "1e-6",
                 "--output", str(out)]) == 0
    manifest = yaml.safe_load((out / "manifest.yaml").read_text())
    assert manifest["plan"] == "1->3" and manifest["bias"] is False and manifest["ridge"] == 1e-6
    assert not (tmp_path / "from-yaml").exists()


def test_analyze_writes_table_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["analyze", *TINY_FLAGS, "--num-images", "8", "--metric", "angular", "-o", str(out)]) == 0
    data = json.loads((out / "similarity.json").read_text())
    assert set(data["metrics"]) == {"mse", "cosine", "angular"} and data["images"] == 7  # 1 of 8 held out
    assert len(data["metrics"]["mse"]) == 6 and data["metrics"]["mse"][0][0] is None
    assert (out / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    assert "Similarity (angular)" in capsys.readouterr().out


# A span beyond the model, a missing data folder, an unknown model and no plan at all: test_bad_inputs_cli.py (413-424).
@pytest.mark.parametrize("flags,field", [
    (["--plan", "1->3, 2->4"], "plan: spans 1->3 and 2->4 overlap"),
    (["--plan", "3->1"], "plan: span 3->1"),
    (["--plan", "1->2", "--token-mode", "cls", "--model-arg", "class_token=false", "--model-arg", "global_pool=avg"],
     "token_mode: cls needs a model with a class token"),
    (["--plan", "1->2", "--num-images", "0"], "data.num_images"),
])
def test_bad_input_names_the_field_and_writes_nothing(tmp_path, capsys, flags, field):
    out = tmp_path / "out"
    code = main(["compress", *TINY_FLAGS, "--num-images", "8", *flags, "-o", str(out)])
    assert code == 2
    assert field in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_non_vit_model_is_rejected(tmp_path, capsys):
    assert main(["compress", "--model", "resnet18", "--plan", "1->2", "-o", str(tmp_path / "out")]) == 2
    assert "model: ResNet is not a timm VisionTransformer" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_unknown_yaml_key_is_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  name: vit_tiny_patch16_224\ndata:\n  batch_sise: 4\n")
    with pytest.raises(TBAInputError, match="data.batch_sise: unknown key"):
        load_config(config)  # plan and budget together: test_bad_inputs_config.py (8)


def test_existing_output_is_kept_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["compress", *TINY_FLAGS, "--num-images", "8", "--plan", "1->2", "-o", str(out)]) == 2
    assert main(["compress", *TINY_FLAGS, "--num-images", "8", "--plan", "1->2", "-o", str(out), "--overwrite"]) == 2
    assert (out / "precious.txt").read_text() == "keep me"


def test_privacy_report_prints_the_ledger_and_the_budget_left(tmp_path, capsys):
    from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier
    from tba_fed.privacy.ledger import LedgerEntry, PrivacyLedger, now
    from tba_fed.privacy.site_state import initialise

    ledger = tmp_path / "ledger.json"
    sigma = noise_multiplier(1.0, 1e-5, 2)
    for release in ("statistics", "probe"):
        PrivacyLedger(ledger).record(
            LedgerEntry(run_id="run-7", release=release, spec_sha256="ab" * 32, mechanism="gaussian", noise_multiplier=sigma,
                        noise_std={}, noise="secure", aggregation="local", images=300, epsilon_run=1.0, delta=1e-5,
                        time=now()), budget=3.0, delta=1e-5)
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "hospital-a", "data": {"source": "synthetic"}, "output": str(tmp_path / "out"),
                                    "privacy": {"epsilon": 3.0, "ledger": str(ledger)}, "state": str(tmp_path / "state")}))
    initialise(tmp_path / "state", "hospital-a", ledger)  # tba-fed site init adopts the existing ledger
    assert main(["privacy", "report", str(site)]) == 0
    out = capsys.readouterr().out
    spent = epsilon_spent([(sigma, 2)], 1e-5)
    assert "run-7" in out and out.count("| run-7 |") == 2
    assert f"ε spent {spent:.4f} of 3" in out and f"remaining {3.0 - spent:.4f}" in out
    replace_one = epsilon_spent([(sigma / 2, 2)], 1e-5)  # the same noise, judged under replace-one adjacency
    assert f"add/remove-one-image adjacency; under replace-one adjacency the same releases give ε ≤ {replace_one:.4f}" in out
    assert replace_one > 1.9 * spent
    site.write_text(yaml.safe_dump({"name": "hospital-a", "data": {"source": "synthetic"}, "output": "out"}))
    assert main(["privacy", "report", str(site)]) == 2
    assert "privacy: Field required" in capsys.readouterr().err
