"""compress with an evaluation set: accuracy (probe and head), parameters and FLOPs in the report, the heatmap's
plan marks, the experiment's accuracy and latency plots; bad evaluation settings end in one line naming the field."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tba_fed import calibrate, load_compressed
from tba_fed.accuracy import evaluate_models
from tba_fed.cli import main
from tba_fed.compressed import count_flops, count_parameters
from tba_fed.config import EvaluationSetConfig, ModelConfig
from tba_fed.data import SyntheticImages
from tba_fed.experiment import ACCURACY_PLOT, LATENCY_FILE, LATENCY_PLOT, load_experiment_config, run_experiment
from tba_fed.models import create_model
from tba_fed.plan import parse_plan
from tba_fed.report import accuracy_figure, latency_figure, similarity_figure, span_cells
from tba_fed.stats import SimilarityStats

from conftest import TINY, loader

D, N, HIDDEN, CLASSES = TINY["embed_dim"], (TINY["img_size"] // TINY["patch_size"]) ** 2 + 1, 4 * TINY["embed_dim"], 5
BLOCK_PARAMS = 12 * D * D + 13 * D  # norm1, qkv, proj, norm2, fc1, fc2 with their biases


def hand_flops(blocks: int, maps: int = 0) -> int:
    """FlopCounterMode's count for the tiny ViT, by hand: 2 per multiply-add of every matmul and convolution."""
    patches = N - 1
    embed = 2 * patches * D * (3 * TINY["patch_size"] ** 2)
    block = 2 * N * D * 3 * D + 2 * 2 * N * N * D + 2 * N * D * D + 2 * 2 * N * D * HIDDEN  # qkv, QKᵀ and AV, proj, MLP
    return embed + blocks * block + maps * 2 * N * D * D + 2 * D * CLASSES


def tiny_yaml(tmp_path, evaluation: dict | None, **extra) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        "data": {"source": "synthetic", "num_images": 120, "num_classes": CLASSES, "batch_size": 16},
        **({"evaluation": evaluation} if evaluation is not None else {}), **extra}))
    return str(path)


def test_flops_and_parameters_match_a_hand_count(tiny_vit):
    result = calibrate(tiny_vit, "1->3", loader(), bias=True)
    assert count_parameters(tiny_vit) == result.parameters.original
    assert result.parameters.original - result.parameters.compressed == 2 * BLOCK_PARAMS - (D * D + D)
    assert count_parameters(result.model) == result.parameters.compressed
    assert (result.flops.original, result.flops.compressed) == (hand_flops(6), hand_flops(4, maps=1))
    assert count_flops(tiny_vit) == hand_flops(6)


def test_probe_accuracy_equals_a_ridge_fit_by_hand(tiny_vit):
    """The probe: affine ridge least squares of the features onto one-hot labels, λ = ridge·tr(FᵀF)/d on the weights
    only (the bias unpenalised), solved here from its normal equations in numpy."""
    calibration, evaluation = loader(120, batch_size=32), loader(60, seed=3, batch_size=32)
    compressed = calibrate(tiny_vit, "1->3", calibration, bias=True).model
    config = EvaluationSetConfig(data={"source": "synthetic"}, probe_ridge=1e-3)
    got = evaluate_models(tiny_vit, compressed, calibration, evaluation, config=config, num_classes=10)

    def by_hand(model: torch.nn.Module) -> int:
        def feats(batches):
            with torch.no_grad():
                rows = [(model.forward_head(model.forward_features(x), pre_logits=True), y) for x, y in batches]
            f = torch.cat([r[0] for r in rows]).double().numpy()
            return np.hstack([f, np.ones((len(f), 1))]), torch.cat([r[1] for r in rows]).numpy()

        f, y = feats(calibration)
        penalty = np.diag([1e-3 * np.trace(f[:, :D].T @ f[:, :D]) / D] * D + [0.0])
        weights = np.linalg.solve(f.T @ f + penalty, f.T @ np.eye(10)[y])
        f_test, y_test = feats(evaluation)
        return int(((f_test @ weights).argmax(axis=1) == y_test).sum())

    assert got["correct"] == {"original": by_hand(tiny_vit), "compressed": by_hand(compressed)}
    assert got["original"] == got["correct"]["original"] / 60 and got["compressed"] == got["correct"]["compressed"] / 60
    assert got["evaluation_images"] == 60 and got["probe_images"] == {"original": 120, "compressed": 120}
    assert got["correct"]["original"] > 6  # the labels carry signal: better than chance (1 in 10)


def test_compress_reports_head_accuracy_params_flops_and_a_latency_slot(tmp_path, capsys):
    out = tmp_path / "out"
    evaluation = {"data": {"source": "synthetic", "num_images": 40, "seed": 7, "num_classes": CLASSES},
                  "classifier": "head"}
    assert main(["compress", "--config", tiny_yaml(tmp_path, evaluation), "--plan", "1->3", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    images = SyntheticImages(40, 32, num_classes=CLASSES, seed=7)
    batch = torch.stack([images[i][0] for i in range(40)])
    labels = torch.tensor([images[i][1] for i in range(40)])
    original, compressed = create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY)), load_compressed(out)
    with torch.no_grad():
        correct = {name: int((model(batch).argmax(dim=1) == labels).sum())
                   for name, model in (("original", original), ("compressed", compressed))}
    accuracy = report["accuracy"]
    assert accuracy["classifier"] == "head" and accuracy["evaluation_images"] == 40 and accuracy["correct"] == correct
    assert accuracy["original"] == correct["original"] / 40 and accuracy["compressed"] == correct["compressed"] / 40
    params = report["parameters"]
    assert (params["original"], params["compressed"]) == (count_parameters(original), count_parameters(compressed))
    assert params["removed"] == 2 * BLOCK_PARAMS - (D * D + D)
    assert (report["flops"]["original"], report["flops"]["compressed"]) == (hand_flops(6), hand_flops(4, maps=1))
    assert "latency" in report and report["latency"] is None  # measured only with --benchmark; nothing is made up
    markdown = (out / "report.md").read_text()
    assert f"FLOPs per image: {hand_flops(6):,} -> {hand_flops(4, maps=1):,}" in markdown
    assert f"original {correct['original'] / 40:.4f} ({correct['original']} correct)" in markdown
    assert "- latency: not measured (`tba-fed compress --benchmark` or `tba-fed benchmark DIR` measures it)" in markdown
    assert "accuracy on 40 evaluation images" in capsys.readouterr().out


def test_compress_without_an_evaluation_set_reports_no_accuracy(tmp_path):
    out = tmp_path / "out"
    assert main(["compress", "--config", tiny_yaml(tmp_path, None), "--plan", "2->3", "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "accuracy" not in report and report["flops"]["compressed"] == hand_flops(5, maps=1)


def test_eval_flags_score_a_held_out_image_folder_with_the_probe(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 30), ("test", 12)):
        for label, shift in (("cat", 0), ("dog", 120)):
            (tmp_path / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.integers(0, 120, (20, 20, 3)) + shift, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / label / f"{i}.png")
    out = tmp_path / "out"
    flags = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]
    assert main(["compress", *flags, "--data", str(tmp_path / "train"), "--num-images", "60", "--plan", "0->1",
                 "--eval-data", str(tmp_path / "test"), "-o", str(out)]) == 0
    accuracy = json.loads((out / "report.json").read_text())["accuracy"]
    assert accuracy["classifier"] == "probe" and accuracy["evaluation_images"] == 24
    assert accuracy["original"] == accuracy["correct"]["original"] / 24 >= 0.9  # bright dogs, dark cats


@pytest.mark.parametrize("evaluation,flags,field", [
    (None, ["--eval-split", "test"], "evaluation.data.source: name the evaluation images' source"),
    (None, ["--eval-data", "synthetic", "--eval-num-images", "0"], "evaluation.data.num_images"),
    ({"data": {"source": "synthetic", "sample_rate": 0.5}}, [], "evaluation.data.sample_rate"),
    ({"data": {"source": "synthetic"}, "classifer": "head"}, [], "evaluation.classifer: unknown key"),
    ({"data": {"source": "synthetic"}, "probe_ridge": -1}, [], "evaluation.probe_ridge"),
    (None, ["--eval-data", "fashion_mnist", "--eval-split", "val"], "evaluation.data.split"),
    ({"data": {"source": "synthetic", "num_classes": CLASSES}}, [],  # the calibration images themselves
     "of its 500 images are calibration images (synthetic, split train)"),
    ({"data": {"source": "synthetic", "num_classes": CLASSES}}, ["--eval-num-images", "50"], "of its 50 images are calibration"),
    ({"data": {"source": "image_folder", "path": "nowhere"}}, [], "evaluation.data.source: image_folder: the probe"),
    ({"data": {"source": "synthetic", "batch_size": 0}}, [], "evaluation.data.batch_size"),
    ({"data": {"source": "synthetic", "seed": 3}, "classifier": "head"}, [],
     "evaluation.data: labels 0..9 are not all among the head's 5 classes"),
    ({"data": {"source": "synthetic", "seed": 3}, "classifier": "head"}, ["--model-arg", "num_classes=0"],
     "evaluation.classifier: head: this model has no classifier head"),
    ({"data": {"source": "medmnist", "path": "x.npz"}}, [], "evaluation.data.source: medmnist: the probe learns"),
    ({"data": {"source": "medmnist", "path": "x.npz"}, "classifier": "head"}, [],
     "evaluation.data.path: x.npz does not exist"),
])
def test_bad_evaluation_settings_end_in_one_line_naming_the_field(tmp_path, capsys, evaluation, flags, field):
    out = tmp_path / "out"
    assert main(["compress", "--config", tiny_yaml(tmp_path, evaluation), "--plan", "1->2", *flags,
                 "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert field in err.splitlines()[-1] and err.splitlines()[-1].startswith("tba-fed: error: ") and "Traceback" not in err
    assert not out.exists()


def test_heatmap_outlines_each_span_of_the_plan(tiny_vit):
    from tba_fed import analyze

    plan = parse_plan("0->2, 3->5", 6)
    assert span_cells(plan.spans) == [(1.5, -0.5, 1.0, 1.0), (4.5, 2.5, 1.0, 1.0)]
    similarity = analyze(tiny_vit, loader(8))
    fig = similarity_figure(similarity, "mse", plan.spans)
    drawn = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in fig.axes[0].patches]
    assert drawn == span_cells(plan.spans)
    image = fig.axes[0].images[0]  # cell (s, e) sits at x = e, y = s: the outlines enclose the spans' own cells
    assert image.get_extent() == [-0.5, 5.5, 5.5, -0.5]
    assert len(similarity_figure(similarity, "mse").axes[0].patches) == 0
    assert isinstance(similarity, SimilarityStats)


def test_compress_with_a_budget_marks_the_chosen_plan_on_the_heatmap(tmp_path):
    out = tmp_path / "out"
    assert main(["compress", "--config", tiny_yaml(tmp_path, None), "--budget-blocks", "2", "-o", str(out)]) == 0
    with Image.open(out / "similarity.png") as png:
        png.verify()
    with Image.open(out / "similarity.png") as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    assert red.sum() > 100  # the plan's outline is drawn (its coordinates: the test above)


def test_experiment_plots_accuracy_against_parameters_removed(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        "datasets": [{"name": "synth", "train": {"source": "synthetic", "num_images": 120},
                      "test": {"source": "synthetic", "num_images": 40, "seed": 1}}],
        "approximations": ["0->1", "2->4"], "seeds": [0], "calibration_images": 30, "probe_train_images": 60,
        "probe_test_images": 40, "batch_size": 20, "output": str(tmp_path / "out")}))
    out = run_experiment(load_experiment_config(path))
    with Image.open(out / ACCURACY_PLOT) as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 300
    marker = json.loads((out / "tba-fed-output.json").read_text())
    assert ACCURACY_PLOT in json.dumps(marker)  # recorded as this tool's own file
    summary = json.loads((out / "summary.json").read_text())
    lines = {container.get_label(): container.lines[0] for container in accuracy_figure(summary).axes[0].containers}
    assert set(lines) == {"synth, linear", "synth, identity"}
    for kind in ("linear", "identity"):
        rows = sorted([s for s in summary if s["kind"] in (kind, "original")], key=lambda s: s["params_removed"])
        x, y = lines[f"synth, {kind}"].get_data()
        assert list(x) == [r["params_removed"] / 1e6 for r in rows] and list(y) == [r["accuracy_mean"] for r in rows]


def _experiment(tmp_path, approximations: list[str], **extra) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY},
        "datasets": [{"name": "synth", "train": {"source": "synthetic", "num_images": 80},
                      "test": {"source": "synthetic", "num_images": 20, "seed": 1}}],
        "approximations": approximations, "seeds": [0], "calibration_images": 20, "probe_train_images": 40,
        "probe_test_images": 20, "batch_size": 20, "output": str(tmp_path / "out"), **extra}))
    return path


def test_experiment_plots_speed_up_against_blocks_removed(tmp_path):
    """One row per number of blocks removed (the first approximation removing that many), its theoretical speed-up the
    FLOP ratio counted by hand (linear maps: one d x d map per span)."""
    path = _experiment(tmp_path, ["2->4", "0->1", "1->2, 4->5", "3->4"], latency={"batch_size": 3, "repeats": 4})
    out = run_experiment(load_experiment_config(path))
    with Image.open(out / LATENCY_PLOT) as png:
        png.verify()
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200
    marker = json.loads((out / "tba-fed-output.json").read_text())
    assert LATENCY_PLOT in marker["files"] and LATENCY_FILE in marker["files"]  # this tool's own files
    latency = json.loads((out / LATENCY_FILE).read_text())
    rows = latency["rows"]
    assert [(r["blocks_removed"], r["approximation"], r["map"]) for r in rows] == [(1, "0->1", "linear"),
                                                                                   (2, "2->4", "linear")]
    hand = {1: (hand_flops(6), hand_flops(5, maps=1)), 2: (hand_flops(6), hand_flops(4, maps=1))}
    for row in rows:
        original, compressed = hand[row["blocks_removed"]]
        assert row["flops"] == {"original": original, "compressed": compressed}
        assert row["theoretical_speedup"] == original / compressed
        assert row["batch_size"] == 3 and row["original"]["calls"] == row["compressed"]["calls"] == 4
        assert row["speedup"] == pytest.approx(row["original"]["p50_ms"] / row["compressed"]["p50_ms"])
        assert row["original"]["p50_ms"] <= row["original"]["p95_ms"]
    assert latency["settings"]["batch_sizes"] == [3] and latency["settings"]["repeats"] == 4
    measured, theoretical = latency_figure(latency).axes[0].get_lines()
    assert list(measured.get_xdata()) == list(theoretical.get_xdata()) == [0, 1, 2]
    assert list(theoretical.get_ydata()) == [1.0] + [r["theoretical_speedup"] for r in rows]
    assert list(measured.get_ydata()) == [1.0] + [r["speedup"] for r in rows]


def test_an_experiment_without_latency_writes_no_latency_files(tmp_path):
    path = _experiment(tmp_path, ["0->1"], latency=None)
    out = run_experiment(load_experiment_config(path))
    assert not (out / LATENCY_PLOT).exists() and not (out / LATENCY_FILE).exists() and (out / ACCURACY_PLOT).exists()


@pytest.mark.parametrize("latency,field", [({"batch_size": 0}, "latency.batch_size"),
                                           ({"repeats": 0}, "latency.repeats"),
                                           ({"batch": 8}, "latency.batch")])
def test_bad_latency_settings_of_an_experiment_are_refused_in_one_line(tmp_path, capsys, latency, field):
    path = _experiment(tmp_path, ["0->1"], latency=latency)
    assert main(["experiment", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tba-fed: error: {field}: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
