"""`tba-fed export`: a compressed model as stock timm weights, ONNX or a torch.export program, each checked against
the PyTorch compressed model on real images, loaded where tba_fed cannot be imported, and described by its model
card; bad input and foreign output directories refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tba_fed import TBAInputError, calibrate, create_model, load_compressed, save_compressed
from tba_fed.cli import main
from tba_fed.compressed import BlockApproximation, count_parameters
from tba_fed.config import DataConfig
from tba_fed.data import FASHION_MNIST_DIR, ArrayImages, data_config, fashion_mnist
from tba_fed.errors import TBARunError
from tba_fed.compressed import count_flops
from tba_fed.export import CARD_JSON, CARD_MD, export
from tba_fed.models import weights_sha256

from conftest import TINY, loader

PLAN = "1->2, 3->5"  # removes blocks 2, 4 and 5 of 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_config):
    """Two compressed models of the tiny ViT as `tba-fed compress` writes them: one with fitted linear maps, one
    whose spans all drop their blocks (the only kind stock timm can hold)."""
    root = tmp_path_factory.mktemp("export")
    model = create_model(tiny_config)
    out = {}
    for name, identity in (("linear", ""), ("dropped", PLAN)):
        result = calibrate(model, PLAN, loader(), loader(8, seed=1), identity=identity, source=tiny_config)
        out[name] = save_compressed(result, root / name)
    return out


@pytest.fixture(scope="module")
def images(tiny_config) -> torch.Tensor:
    """Three real test images (Fashion-MNIST, else scikit-learn's digits), preprocessed for the tiny ViT."""
    model = create_model(tiny_config)
    if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        dataset = fashion_mnist(DataConfig(source="fashion_mnist", split="test"), data_config(model))
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        dataset = ArrayImages((digits.images * 255 / 16).astype(np.uint8), digits.target, data_config(model))
    return torch.stack([dataset[i][0] for i in range(3)])


@pytest.fixture(scope="module")
def exported(dirs, tmp_path_factory):
    """Each format exported once for the module (ONNX takes seconds)."""
    root = tmp_path_factory.mktemp("exported")
    return {"onnx": export(dirs["linear"], root / "onnx", "onnx"), "pt2": export(dirs["linear"], root / "pt2", "pt2"),
            "timm": export(dirs["dropped"], root / "timm", "timm")}


def reference(directory: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_compressed(directory)(images).numpy()


def run_without_tba_fed(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that sees only the installed packages (no .pth files, so not the editable
    tba-fed install; no PYTHONPATH; not the repository), after proving that tba_fed cannot be imported there."""
    prelude = (f"import sys\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n"
               "try:\n    import tba_fed\nexcept ModuleNotFoundError:\n    pass\n"
               "else:\n    raise SystemExit('tba_fed is importable here: ' + tba_fed.__file__)\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_onnx_equals_pytorch_on_real_images_for_batches_of_1_and_3(dirs, exported, images):
    import onnx
    import onnxruntime

    path = exported["onnx"] / "model.onnx"
    graph = onnx.load(str(path))
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) >= 17
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"  # a dynamic batch axis
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = reference(dirs["linear"], images)
    for batch in (images[:1], images):
        found = session.run(None, {"images": batch.numpy()})[0]
        assert found.shape == (len(batch), TINY["num_classes"])
        assert np.abs(found - expected[: len(batch)]).max() <= 1e-4
    card = json.loads((exported["onnx"] / CARD_JSON).read_text())
    assert card["check"]["batch_sizes"] == [1, 3] and 0 <= card["check"]["max_abs_diff"] <= 1e-4
    assert f"max abs diff {card['check']['max_abs_diff']:.3g}" in (exported["onnx"] / CARD_MD).read_text()


def test_pt2_loads_with_torch_alone_and_equals_pytorch(dirs, exported, images):
    np.save(exported["pt2"].parent / "images.npy", images.numpy())
    run_without_tba_fed("import numpy as np, torch\n"
                        "model = torch.export.load('pt2/model.pt2').module()\n"
                        "images = torch.from_numpy(np.load('images.npy'))\n"
                        "np.save('pt2-out.npy', np.concatenate([model(images[:1]).numpy(), model(images).numpy()]))\n",
                        exported["pt2"].parent)
    found = np.load(exported["pt2"].parent / "pt2-out.npy")
    expected = reference(dirs["linear"], images)
    assert np.abs(found - np.concatenate([expected[:1], expected])).max() <= 1e-5


def test_timm_export_loads_in_stock_timm_without_tba_fed(dirs, exported, images):
    folder = exported["timm"]
    np.save(folder.parent / "images.npy", images.numpy())
    run_without_tba_fed(
        "import json, numpy as np, timm, torch\nfrom safetensors.torch import load_file\n"
        "config = json.load(open('timm/config.json'))\n"
        "model = timm.create_model(config['architecture'], **config['model_args']).eval()\n"
        "model.load_state_dict(load_file('timm/model.safetensors'), strict=True)\n"
        "hub = timm.create_model('local-dir:timm', pretrained=True).eval()\n"
        "images = torch.from_numpy(np.load('images.npy'))\n"
        "with torch.no_grad():\n"
        "    np.save('timm-out.npy', np.stack([model(images).numpy(), hub(images).numpy()]))\n"
        "print(len(model.blocks))\n", folder.parent)
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"] == {**TINY, "depth": 3}  # only depth differs from the base model's kwargs
    expected = reference(dirs["dropped"], images)
    found, hub = np.load(folder.parent / "timm-out.npy")
    assert np.abs(found - expected).max() <= 1e-5 and np.abs(hub - expected).max() <= 1e-5
    assert config["tba_fed"] == json.loads((folder / CARD_JSON).read_text())  # the card, in timm's config too


def test_timm_refuses_a_plan_with_linear_maps_naming_the_field_and_the_other_formats(dirs, tmp_path):
    with pytest.raises(TBAInputError) as err:
        export(dirs["linear"], tmp_path / "out", "timm")
    assert err.value.field == "format" and "1->2" in str(err.value) and "linear map" in str(err.value)
    assert "--format onnx" in str(err.value) and "--format pt2" in str(err.value) and "\n" not in str(err.value)
    assert not tmp_path.joinpath("out").exists() and list(tmp_path.iterdir()) == []


def test_a_compressed_model_is_scriptable_and_blocks_take_timm_keyword_arguments(dirs, images):
    model = load_compressed(dirs["linear"])
    assert any(isinstance(b, BlockApproximation) and b.linear is not None for b in model.blocks)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(images), model(images))
        traced = torch.jit.trace(model, images)
        assert torch.equal(traced(images[:1]), model(images[:1]))
        # timm's forward_features passes attn_mask/is_causal to every block when a mask is given
        mask = torch.ones(images.shape[0], 1, 17, 17, dtype=torch.bool)
        assert torch.allclose(model.forward_features(images, attn_mask=mask), model.forward_features(images), atol=1e-6)


def test_the_model_card_holds_the_base_weights_plan_parameters_and_flops(dirs, exported, tiny_config):
    base, compressed = create_model(tiny_config), load_compressed(dirs["linear"])
    card = json.loads((exported["onnx"] / CARD_JSON).read_text())
    assert card["base_model"]["name"] == "vit_tiny_patch16_224"
    assert card["base_model"]["weights_sha256"] == weights_sha256(base) and card["base_model"]["checkpoint_sha256"] is None
    assert card["plan"] == PLAN and [s["kind"] for s in card["spans"]] == ["linear", "linear"]
    assert card["parameters"] == {"original": count_parameters(base), "compressed": count_parameters(compressed)}
    assert card["flops"]["original"] == count_flops(base) > card["flops"]["compressed"] == count_flops(compressed) > 0
    assert card["accuracy"] is None and card["privacy"] is None
    assert list(card["files"]) == ["model.onnx"]
    markdown = (exported["onnx"] / CARD_MD).read_text()
    assert markdown.count("\n- input: ") == 1 and markdown.count("\n- plan: ") == 1
    for fact in (weights_sha256(base), PLAN, f"{count_parameters(base):,} -> {count_parameters(compressed):,}",
                 f"{card['flops']['original']:,} -> {card['flops']['compressed']:,}", "not private", "onnxruntime"):
        assert fact in markdown, fact
    timm_card = json.loads((exported["timm"] / CARD_JSON).read_text())
    assert [s["kind"] for s in timm_card["spans"]] == ["identity", "identity"]
    assert timm_card["parameters"]["compressed"] == count_parameters(base) - 3 * sum(
        p.numel() for p in base.blocks[2].parameters())


def test_a_folded_plan_exports_to_stock_timm_and_its_card_says_folded(tmp_path, tiny_config, images):
    """Folded maps live in the kept blocks' fc2 weights: the whole compressed model is stock timm, so it exports to
    timm with no span dropped, and stock timm reproduces it without tba-fed."""
    model = create_model(tiny_config)
    result = calibrate(model, PLAN, loader(), loader(8, seed=1), source=tiny_config, map_kind="folded")
    source = save_compressed(result, tmp_path / "folded")
    out = export(source, tmp_path / "timm", "timm")
    card = json.loads((out / CARD_JSON).read_text())
    assert [s["kind"] for s in card["spans"]] == ["folded", "folded"]
    assert card["parameters"]["compressed"] == count_parameters(model) - 3 * sum(
        p.numel() for p in model.blocks[2].parameters())
    np.save(tmp_path / "images.npy", images.numpy())
    np.save(tmp_path / "expected.npy", reference(source, images))
    run_without_tba_fed(
        "import json, numpy as np, timm, torch\nfrom safetensors.torch import load_file\n"
        f"cfg = json.load(open({str(out / 'config.json')!r}))\n"
        "m = timm.create_model(cfg['architecture'], **cfg['model_args']).eval()\n"
        f"m.load_state_dict(load_file({str(out / 'model.safetensors')!r}), strict=True)\n"
        "with torch.no_grad():\n"
        f"    got = m(torch.from_numpy(np.load({str(tmp_path / 'images.npy')!r}))).numpy()\n"
        f"assert np.abs(got - np.load({str(tmp_path / 'expected.npy')!r})).max() <= 1e-5\n", tmp_path)


def test_a_pinned_checkpoint_is_named_in_the_card(tmp_path, tiny_config):
    from safetensors.torch import save_file

    from tba_fed.fileio import file_sha256

    weights = tmp_path / "weights.safetensors"
    save_file(create_model(tiny_config).state_dict(), str(weights))
    source = tiny_config.model_copy(update={"checkpoint": weights, "sha256": file_sha256(weights)})
    result = calibrate(create_model(source), "2->3", loader(8), identity="2->3", source=source)
    out = export(save_compressed(result, tmp_path / "compressed"), tmp_path / "out", "timm")
    card = json.loads((out / CARD_JSON).read_text())
    assert card["base_model"]["checkpoint_sha256"] == file_sha256(weights) and "checkpoint" in card["base_model"]["weights"]
    assert file_sha256(weights) in (out / CARD_MD).read_text()


def test_a_private_federated_run_exports_with_its_accuracy_and_epsilon(tmp_path, server_identity):
    """The server's own output (run_server against in-process sites, as test_server_rounds runs it)."""
    from tba_fed.federation.config import load_federated_config
    from tba_fed.federation.server import run_server

    from test_server_rounds import MODEL, InProcessGrid

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": MODEL.model_dump(mode="json"), "plan": PLAN, "federation": {"num_sites": 3, "min_sites": 2, "round_timeout": 5},
        "evaluation": {"enabled": True}, "privacy": {"epsilon": 4.0, "seed": 11, "public_images": 32},
        "output": str(tmp_path / "server")}))
    report = run_server(InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good"}, images=40), load_federated_config(path))
    out = export(tmp_path / "server", tmp_path / "exported", "pt2")
    card = json.loads((out / CARD_JSON).read_text())
    assert card["source"]["federated"] and card["plan"] == PLAN
    assert card["privacy"]["epsilon"] == 4.0 and card["privacy"]["delta"] == report["privacy"]["delta"]
    assert card["accuracy"]["compressed"] == report["evaluation"]["pooled"]["compressed"]
    assert card["check"]["max_abs_diff"] <= 1e-5
    markdown = (out / CARD_MD).read_text()
    assert "(ε, δ) = (4, 1e-05)" in markdown and "a federated run" in markdown and "not private" not in markdown
    assert f"{report['evaluation']['pooled']['compressed']:.4f} compressed" in markdown


@pytest.mark.parametrize("make,field", [
    (lambda tmp: tmp / "missing", "input"),
    (lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0], "input"),
    (lambda tmp: (tmp / "empty", (tmp / "empty").mkdir())[0], "input"),
])
def test_what_is_not_a_compressed_model_is_refused_in_one_line(tmp_path, capsys, make, field):
    source = make(tmp_path)
    with pytest.raises(TBAInputError) as err:
        export(source, tmp_path / "out", "pt2")
    assert err.value.field == field and err.value.fix
    assert main(["export", str(source), "--format", "pt2", "-o", str(tmp_path / "out")]) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith(f"tba-fed: error: {field}: ") and stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


def test_a_corrupt_manifest_is_refused_naming_the_field(dirs, tmp_path):
    import shutil

    source = tmp_path / "compressed"
    shutil.copytree(dirs["linear"], source)
    manifest = yaml.safe_load((source / "manifest.yaml").read_text())
    (source / "manifest.yaml").write_text(yaml.safe_dump({**manifest, "plan": "4->2"}))
    with pytest.raises(TBAInputError) as err:
        export(source, tmp_path / "out", "onnx")
    assert err.value.field.startswith("manifest.plan")
    assert not (tmp_path / "out").exists()


def test_an_unknown_format_is_refused(dirs, tmp_path, capsys):
    with pytest.raises(TBAInputError) as err:
        export(dirs["linear"], tmp_path / "out", "tflite")
    assert err.value.field == "format" and "timm, onnx, pt2" in err.value.fix
    with pytest.raises(SystemExit) as code:
        main(["export", str(dirs["linear"]), "--format", "tflite", "-o", str(tmp_path / "out")])
    assert code.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_outputs_are_new_directories_or_tba_feds_own_export(dirs, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        assert main(["export", str(dirs["dropped"]), "--format", "timm", "-o", str(foreign), *flags]) == 2
        assert "tba-fed: error: output: " in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    # a compressed model is tba-fed's, but not an export: never replaced by one
    assert main(["export", str(dirs["dropped"]), "--format", "timm", "-o", str(dirs["linear"]), "--overwrite"]) == 2
    assert "holds a compressed model written by tba-fed, not an exported model" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["export", str(dirs["dropped"]), "--format", "timm", "-o", str(out)]) == 0
    assert "timm export written to" in capsys.readouterr().out
    assert main(["export", str(dirs["dropped"]), "--format", "pt2", "-o", str(out)]) == 2  # exists: --overwrite
    assert main(["export", str(dirs["dropped"]), "--format", "pt2", "-o", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [CARD_MD, "model.pt2", CARD_JSON, "tba-fed-output.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]  # no temporary directory left


def test_an_export_that_does_not_match_the_compressed_model_leaves_nothing(dirs, tmp_path, monkeypatch):
    import tba_fed.export as export_module

    monkeypatch.setattr(export_module, "TORCH_TOLERANCE", -1.0)
    with pytest.raises(TBARunError, match="differs from the PyTorch compressed model"):
        export(dirs["linear"], tmp_path / "out", "pt2")
    assert list(tmp_path.iterdir()) == []
