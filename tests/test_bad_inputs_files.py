"""Bad-input campaign (issue #16, groups 3, 4 and 7): files tba-fed reads (see test_bad_inputs_config.py for the
conventions).

Every kind is refused with a TBAInputError whose field is asserted exactly (CLI: exit 2, a last stderr line
``tba-fed: error: FIELD: ...`` and no traceback; ``audit verify``: exit 1 naming every problem; ``preflight``:
a PROBLEM line), leaving every file in the test's directory byte-identical and nothing new in it (`refusal`).
The rows marked "accepted" are not refusals: the input is read with its right meaning. Each kind failed
(traceback, wrong meaning, or no refusal) on c272bf5; 293 was not run there, since c272bf5 starts
DataLoader workers without end for it.

| #   | input                                                              | refused as (field)                        |
|-----|--------------------------------------------------------------------|-------------------------------------------|
|     | **duplicate YAML keys: the last one used to win**                  |                                           |
| 201 | a site policy with ``epsilon: 1.0`` then ``epsilon: 1000.0``       | config (line, column, key); CLI privacy   |
| 202 | a key twice inside a section of a run config                       | config                                    |
| 203 | a top-level key twice in a federated run (``simulate``)            | config; no process, no output             |
| 204 | a key twice in an experiment YAML                                  | config                                    |
| 205 | the same key once plain, once quoted                               | config                                    |
| 206 | a key twice in a compressed model's manifest.yaml                  | manifest                                  |
| 207 | a key twice inside a ``--model-arg`` value                         | argparse: --model-arg                     |
| –   | a key merged in with ``<<`` and then overridden                    | accepted (YAML's meaning)                 |
|     | **non-finite and out-of-range numbers**                            |                                           |
| 208 | a site's ε budget ``.inf``                                         | privacy.epsilon                           |
| 209 | a site's max_clip ``.inf``                                         | privacy.max_clip                          |
| 210 | a run's privacy.epsilon ``.inf`` (``simulate``)                    | privacy.epsilon; nothing started          |
| 211 | ``ridge: .inf`` in ``--config`` (``compress``)                     | ridge                                     |
| 212 | ``--ridge inf``                                                    | ridge                                     |
| 213 | federation.round_timeout ``.inf``                                  | federation.round_timeout                  |
| 214 | federation.partition.alpha ``.inf``                                | federation.partition.alpha                |
| 215 | federation.psd_tolerance ``.inf``                                  | federation.psd_tolerance                  |
| 216 | evaluation.probe_ridge ``.inf``                                    | evaluation.probe_ridge                    |
| 217 | privacy.clip_scale ``.inf``                                        | privacy.clip_scale                        |
| 218 | an experiment's ridge ``.inf``                                     | ridge                                     |
| 219 | a privacy request (JSON from the server) with ε ``Infinity``       | privacy.epsilon                           |
| 220 | model.kwargs.mlp_ratio ``.nan``                                    | model.kwargs.mlp_ratio                    |
| 221 | ``preflight --expiry-days inf``                                    | argparse: --expiry-days                   |
| 222 | a run ε of 1000 (no accountant composes it; PRV exhausts memory)   | privacy.epsilon                           |
|     | **image folders: links and second names**                          |                                           |
| 223 | a symlink loop back to the data root (``compress``)                | accepted: 8 images stay 8, the link named |
| 224 | a class folder that is a link to a folder outside the root        | accepted: not a class, the link named     |
| 225 | a file link to an image outside the root                           | accepted: skipped, named                  |
| 226 | a file link to an image inside the root                            | accepted: the image counted once          |
| 227 | one file under two names (a hard link)                             | accepted: counted once                    |
| 228 | a folder link inside a class folder to another class               | accepted: skipped, named                  |
| 229 | every class folder a link                                          | data.path, naming the links               |
| 230 | a class whose only images are links                                | data.path, naming the links               |
|     | **``load_compressed``: maps checked against the rebuilt model**    |                                           |
| 231 | a map of the wrong shape                                           | maps.safetensors.span.1-2.weight          |
| 232 | a bias of the wrong shape                                          | maps.safetensors.span.1-2.bias            |
| 233 | an all-NaN map                                                     | maps.safetensors.span.1-2.weight          |
| 234 | an Inf in a bias                                                   | maps.safetensors.span.1-2.bias            |
| 235 | a map stored as float16 or int64                                   | maps.safetensors.span.1-2.weight          |
| 236 | a tensor for a span the plan does not have                         | maps.safetensors                          |
| 237 | a bias for one fitted span but not the other                       | maps.safetensors                          |
| 238 | finite float64 entries that overflow the model's float32           | maps.span.1-2                             |
| 239 | maps.safetensors truncated                                         | maps.safetensors                          |
| 240 | maps.safetensors missing                                           | maps.safetensors                          |
| 241 | maps.safetensors that is a pickle                                  | maps.safetensors                          |
| 242 | maps.safetensors that is a directory                               | maps.safetensors                          |
| 243 | a manifest without its model section                               | manifest.model                            |
| 244 | a manifest whose model has an unknown key                          | manifest.model.sneaky                     |
| 245 | a manifest with a ``!!python`` tag (nothing runs)                  | manifest                                  |
| 246 | a manifest without its plan                                        | manifest.plan                             |
| 247 | a manifest whose identity_spans is not a list                      | manifest.identity_spans                   |
| 248 | a manifest whose identity span is not in the plan                  | manifest.identity_spans                   |
| 249 | a manifest that is not UTF-8                                       | manifest                                  |
| 250 | a manifest whose model has img_size -32                            | manifest.model.kwargs.img_size            |
|     | **checkpoints (model.checkpoint)**                                 |                                           |
| 251 | a truncated .safetensors                                           | model.checkpoint                          |
| 252 | a .safetensors that is a pickle                                    | model.checkpoint                          |
| 253 | an empty .safetensors                                              | model.checkpoint                          |
| 254 | a checkpoint path that is a directory                              | model.checkpoint                          |
| 255 | a truncated .pth                                                   | model.checkpoint                          |
| 256 | a .pth that is not a pickle                                        | model.checkpoint                          |
| 257 | a .pth whose pickle would run code (nothing runs)                  | model.checkpoint                          |
| 258 | a .pth holding a list, not a state dict                            | model.checkpoint                          |
| 259 | a checkpoint with NaN weights                                      | model.checkpoint, naming the tensor       |
| 260 | ``compress --checkpoint`` of a truncated file                      | model.checkpoint (CLI)                    |
|     | **privacy ledgers (``privacy report``)**                           |                                           |
| 261 | a ledger that is ``[]``                                            | privacy.ledger                            |
| 262 | a ledger path that is a directory                                  | privacy.ledger                            |
| 263 | an entry with ``noise_multiplier: 'abc'``                          | privacy.ledger                            |
| 264 | an entry with ``noise_multiplier: 1e-300``                         | privacy.ledger                            |
| 265 | an entry with a negative σ (under-counts ε)                        | privacy.ledger                            |
| 266 | an entry with ``noise_multiplier: null``                           | privacy.ledger                            |
| 267 | an entry with ``noise_multiplier: 1e300``                          | privacy.ledger                            |
| 268 | an entry with ``noise_multiplier: true``                           | privacy.ledger                            |
| 269 | an entry with a NaN run ε                                          | privacy.ledger                            |
| 270 | an entry whose image count is a word                               | privacy.ledger                            |
| 271 | a ledger nested deeper than Python's JSON parser goes              | privacy.ledger                            |
| 272 | ``preflight`` of a site whose ledger has σ 1e-300                  | PROBLEM privacy.ledger (exit 1)           |
|     | **audit logs (``audit verify``, ``audit show``)**                  |                                           |
| 273 | a line nested deeper than Python's JSON parser goes (verify)       | the line: not a JSON entry (exit 1)       |
| 274 | the same line, ``audit show``                                      | counted among the problems                |
| 275 | a site entry without its status (``audit show``)                   | shown unreadable, counted                 |
| 276 | a server entry whose sites are a list (``--against``)              | the line: not a server entry (exit 1)     |
| 277 | a site entry without its site name (``--against``)                 | the line: not a site entry (exit 1)       |
| 278 | a site grant with σ ``'abc'`` (``audit show``)                     | shown unreadable, counted                 |
| 279 | an entry whose role is neither site nor server                     | the line (exit 1)                         |
| 280 | an audit log path that is a directory                              | audit                                     |
|     | **model kwargs and counts**                                        |                                           |
| 281 | ``img_size=-32``                                                   | model.kwargs.img_size                     |
| 282 | ``patch_size=0``                                                   | model.kwargs.patch_size                   |
| 283 | ``depth=-1``                                                       | model.kwargs.depth                        |
| 284 | ``embed_dim=0``                                                    | model.kwargs.embed_dim                    |
| 285 | ``num_heads`` that does not divide embed_dim                       | model.kwargs (timm's reason)              |
| 286 | ``drop_rate=.inf``                                                 | model.kwargs.drop_rate                    |
| 287 | ``img_size=[32, true]``                                            | model.kwargs.img_size                     |
| 288 | ``batch_size: 10**30``                                             | data.batch_size                           |
| 289 | ``num_images: 10**12`` with synthetic data                         | data.num_images                           |
| 290 | model.seed ``10**30``                                              | model.seed                                |
| 291 | data.seed ``10**30``                                               | data.seed                                 |
| 292 | num_classes ``10**30``                                             | data.num_classes                          |
| 293 | num_workers ``10**30``                                             | data.num_workers                          |
| 294 | a negative data seed with a subset of a real source                | data.seed                                 |
|     | **JSON files tba-fed reads back: a key given twice**               |                                           |
| 295 | a ledger entry giving ``noise_multiplier`` twice                   | privacy.ledger                            |
| 296 | an audit entry giving ``status`` twice (same value: hash intact)   | the line: not a JSON entry (exit 1)       |
| 297 | an output marker giving ``format`` twice                           | output (nothing touched)                  |
| 298 | a site state marker giving ``ledger`` twice                        | state                                     |
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from tba_fed import ModelConfig, calibrate, create_model, load_compressed, save_compressed
from tba_fed.audit import AuditLog, check_chain
from tba_fed.cli import main
from tba_fed.config import DataConfig, load_config
from tba_fed.data import build_dataset
from tba_fed.experiment import load_experiment_config
from tba_fed.federation.config import load_federated_config, load_site_config
from tba_fed.privacy.policy import PrivacyRequest

from conftest import TINY, loader
from refusal import refused, run_cli, unchanged

MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]
LEDGER_FORMAT = "tba-fed privacy ledger 1"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _yaml(path: Path, data: dict) -> Path:
    return _write(path, yaml.safe_dump(data))


def _one_line_error(code: int, err: str, field: str) -> str:
    """Exit 2, no traceback, and one error line (the last on stderr, after the log) naming `field`; its text."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("tba-fed: error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    assert errors[0].startswith(f"tba-fed: error: {field}: "), errors[0]
    return errors[0]


def _site(tmp_path: Path, privacy: dict, **extra) -> Path:
    """A development site YAML (no state directory needed) whose policy is `privacy`."""
    return _yaml(tmp_path / "site.yaml", {"name": "hospital-a", "profile": "development",
                                          "data": {"source": "synthetic", "num_images": 20},
                                          "output": str(tmp_path / "out"),
                                          "privacy": {"ledger": str(tmp_path / "ledger.json"), **privacy}, **extra})


# ------------------------------------------------------------------------------------- duplicate YAML keys

def test_201_a_site_policy_with_epsilon_twice_is_refused_not_given_the_last(tmp_path, capsys):
    site = _write(tmp_path / "site.yaml", f"""name: hospital-a
profile: development
data: {{source: synthetic, num_images: 20}}
output: {tmp_path / 'out'}
privacy:
  epsilon: 1.0
  epsilon: 1000.0
  ledger: {tmp_path / 'ledger.json'}
""")
    code, out, err = run_cli(["privacy", "report", str(site)], capsys, [tmp_path])
    assert _one_line_error(code, err, "config") == (f"tba-fed: error: config: {site} is not valid YAML at line 7, "
                                                     "column 3: found duplicate key 'epsilon'")
    assert "1000" not in out


def test_202_a_key_twice_inside_a_section_of_a_run_config(tmp_path):
    path = _write(tmp_path / "run.yaml", "model: {name: vit_tiny_patch16_224}\ndata:\n  batch_size: 8\n  seed: 1\n"
                                         "  batch_size: 64\n")
    with refused("config", untouched=[tmp_path]) as err:
        load_config(path)
    assert str(err.value) == f"config: {path} is not valid YAML at line 5, column 3: found duplicate key 'batch_size'"


def test_203_a_top_level_key_twice_in_a_federated_run_starts_nothing(tmp_path, capsys):
    path = _write(tmp_path / "run.yaml", yaml.safe_dump({"model": MODEL, "plan": "1->2",
                                                         "output": str(tmp_path / "server")}) + "plan: 0->5\n")
    code, _, err = run_cli(["simulate", str(path)], capsys, [tmp_path])
    assert "found duplicate key 'plan'" in _one_line_error(code, err, "config")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]


def test_204_a_key_twice_in_an_experiment_yaml(tmp_path):
    path = _write(tmp_path / "table1.yaml", "model: {name: vit_tiny_patch16_224}\nseeds: [0]\nseeds: [0, 1, 2]\n"
                                            "datasets: [{name: s, train: {source: synthetic}, test: {source: synthetic}}]\n")
    with refused("config", untouched=[tmp_path]) as err:
        load_experiment_config(path)
    assert "found duplicate key 'seeds'" in str(err.value)


def test_205_the_same_key_once_plain_once_quoted(tmp_path):
    site = _write(tmp_path / "site.yaml", "name: h\nprofile: development\ndata: {source: synthetic}\noutput: out\n"
                                          f"privacy: {{epsilon: 1.0, \"epsilon\": 1000.0, ledger: {tmp_path}/l.json}}\n")
    with refused("config", untouched=[tmp_path]) as err:
        load_site_config(site)
    assert "found duplicate key 'epsilon'" in str(err.value)


def test_206_a_key_twice_in_a_manifest(tmp_path, compressed):
    folder = _copy(compressed, tmp_path)
    manifest = folder / "manifest.yaml"
    manifest.write_text(manifest.read_text() + "plan: 0->5\n")
    with refused("manifest", untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert "found duplicate key 'plan'" in str(err.value)


def test_207_a_key_twice_inside_a_model_arg_value(tmp_path, capsys):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--model-arg", "img_size={a: 1, a: 2}", "--plan", "1->2",
                         "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith("error: argument --model-arg: img_size: cannot read the value "
                                         "'{a: 1, a: 2}' at line 1, column 8: found duplicate key 'a' "
                                         "(see tba-fed compress --help)")


def test_a_key_merged_in_and_then_overridden_keeps_its_yaml_meaning(tmp_path):
    path = _write(tmp_path / "run.yaml", "model: {name: vit_tiny_patch16_224}\ndata:\n  <<: {batch_size: 8, seed: 3}\n"
                                         "  batch_size: 4\n")
    config = load_config(path)
    assert (config.data.batch_size, config.data.seed) == (4, 3)


# --------------------------------------------------------------------------------- non-finite numbers

def test_208_a_site_budget_of_infinity(tmp_path, capsys):
    code, _, err = run_cli(["privacy", "report", str(_site(tmp_path, {"epsilon": float("inf")}))], capsys, [tmp_path])
    assert _one_line_error(code, err, "privacy.epsilon") == "tba-fed: error: privacy.epsilon: Input should be a finite number"


def test_209_a_site_max_clip_of_infinity(tmp_path):
    site = _site(tmp_path, {"max_clip": float("inf")})
    with refused("privacy.max_clip", untouched=[tmp_path]):
        load_site_config(site)


def test_210_a_run_epsilon_of_infinity_starts_nothing(tmp_path, capsys):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", "output": str(tmp_path / "server"),
                                         "privacy": {"epsilon": float("inf")}})
    code, _, err = run_cli(["simulate", str(path)], capsys, [tmp_path])
    _one_line_error(code, err, "privacy.epsilon")


def test_211_ridge_infinity_in_a_config_file(tmp_path, capsys):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", "ridge": float("inf"),
                                         "data": {"num_images": 16}, "output": str(tmp_path / "out")})
    code, _, err = run_cli(["compress", "--config", str(path)], capsys, [tmp_path])
    assert _one_line_error(code, err, "ridge") == "tba-fed: error: ridge: Input should be a finite number"


def test_212_ridge_infinity_as_a_flag(tmp_path, capsys):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--num-images", "16", "--ridge", "inf", "--plan", "1->2",
                         "-o", str(tmp_path / "out")], capsys, [tmp_path])
    _one_line_error(code, err, "ridge")


@pytest.mark.parametrize("section,field", [
    ({"federation": {"round_timeout": float("inf")}}, "federation.round_timeout"),        # 213
    ({"federation": {"partition": {"alpha": float("inf")}}}, "federation.partition.alpha"),  # 214
    ({"federation": {"psd_tolerance": float("inf")}}, "federation.psd_tolerance"),        # 215
    ({"evaluation": {"probe_ridge": float("inf")}}, "evaluation.probe_ridge"),            # 216
    ({"privacy": {"epsilon": 1.0, "clip_scale": float("inf")}}, "privacy.clip_scale"),    # 217
])
def test_213_217_infinite_federation_settings(tmp_path, section, field):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", **section})
    with refused(field, untouched=[tmp_path]) as err:
        load_federated_config(path)
    assert str(err.value) == f"{field}: Input should be a finite number"


def test_218_an_experiment_ridge_of_infinity(tmp_path):
    path = _yaml(tmp_path / "table1.yaml", {"model": MODEL, "ridge": float("inf"), "datasets": [
        {"name": "synthetic", "train": {"source": "synthetic"}, "test": {"source": "synthetic"}}]})
    with refused("ridge", untouched=[tmp_path]):
        load_experiment_config(path)


def test_219_a_privacy_request_with_infinite_epsilon():
    with refused("privacy.epsilon"):
        PrivacyRequest.from_json('{"epsilon": Infinity, "delta": 1e-5, "releases": ["statistics"]}')


def test_220_a_nan_model_kwarg(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": {**MODEL, "kwargs": {**TINY, "mlp_ratio": float("nan")}}})
    with refused("model.kwargs.mlp_ratio", untouched=[tmp_path]) as err:
        load_config(path)
    assert str(err.value) == "model.kwargs.mlp_ratio: nan is not a finite number"


def test_221_preflight_with_infinite_expiry_days(tmp_path, capsys):
    code, _, err = run_cli(["preflight", str(_site(tmp_path, {})), "--expiry-days", "inf"], capsys, [tmp_path])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].endswith("error: argument --expiry-days: 'inf' is not a positive finite number of days "
                                         "(see tba-fed preflight --help)")


def test_222_a_run_epsilon_no_accountant_can_compose(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", "privacy": {"epsilon": 1000.0,
                                                                                   "accountant": "prv"}})
    with refused("privacy.epsilon", untouched=[tmp_path]) as err:
        load_federated_config(path)
    assert str(err.value) == "privacy.epsilon: Input should be less than or equal to 100"


# ------------------------------------------------------------------------------ image folders and links

def _images(folder: Path, count: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{seed}-{i}.png")


@pytest.fixture(scope="module")
def model():
    return create_model(ModelConfig(**MODEL))


def _dataset(root: Path, model) -> list[str]:
    return sorted(os.path.relpath(path, root) for path, _ in build_dataset(DataConfig(source="image_folder", path=root),
                                                                         model).samples)


def test_223_a_symlink_loop_does_not_multiply_the_images(tmp_path, capsys):
    root = tmp_path / "images"
    _images(root / "benign", seed=0)
    _images(root / "malignant", seed=1)
    (root / "benign" / "loop").symlink_to("..")
    out = tmp_path / "out"
    with unchanged([root]):
        code = main(["compress", *TINY_FLAGS, "--data", str(root), "--holdout-fraction", "0", "--plan", "1->2",
                     "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "data: 8 calibration and 0 held-out images" in err
    assert f"skipped (never followed, never counted twice): {root / 'benign' / 'loop'}" in err
    assert yaml.safe_load((out / "manifest.yaml").read_text())["calibration_images"] == 8


def test_224_a_class_folder_linked_from_outside_is_not_a_class(tmp_path, model, caplog):
    _images(tmp_path / "images" / "benign")
    _images(tmp_path / "elsewhere" / "other-study", seed=5)
    (tmp_path / "images" / "malignant").symlink_to(tmp_path / "elsewhere" / "other-study")
    with unchanged([tmp_path]):
        assert _dataset(tmp_path / "images", model) == [f"benign/0-{i}.png" for i in range(4)]
    assert str(tmp_path / "images" / "malignant") in caplog.text


def test_225_a_file_link_to_an_image_outside_the_root_is_skipped(tmp_path, model, caplog):
    _images(tmp_path / "images" / "a")
    _images(tmp_path / "elsewhere", seed=5)
    (tmp_path / "images" / "a" / "outside.png").symlink_to(tmp_path / "elsewhere" / "5-0.png")
    with unchanged([tmp_path]):
        assert _dataset(tmp_path / "images", model) == [f"a/0-{i}.png" for i in range(4)]
    assert str(tmp_path / "images" / "a" / "outside.png") in caplog.text


def test_226_a_file_link_to_an_image_inside_the_root_counts_it_once(tmp_path, model, caplog):
    _images(tmp_path / "images" / "a")
    (tmp_path / "images" / "a" / "again.png").symlink_to("0-0.png")
    with unchanged([tmp_path]):
        assert _dataset(tmp_path / "images", model) == [f"a/0-{i}.png" for i in range(4)]
    assert str(tmp_path / "images" / "a" / "again.png") in caplog.text


def test_227_one_file_under_two_names_counts_once(tmp_path, model, caplog):
    _images(tmp_path / "images" / "a")
    os.link(tmp_path / "images" / "a" / "0-1.png", tmp_path / "images" / "a" / "9-copy.png")
    with unchanged([tmp_path]):
        assert _dataset(tmp_path / "images", model) == [f"a/0-{i}.png" for i in range(4)]
    assert str(tmp_path / "images" / "a" / "9-copy.png") in caplog.text


def test_228_a_folder_link_inside_a_class_to_another_class_is_skipped(tmp_path, model, caplog):
    _images(tmp_path / "images" / "a")
    _images(tmp_path / "images" / "b", seed=1)
    (tmp_path / "images" / "a" / "more").symlink_to("../b")
    with unchanged([tmp_path]):
        assert _dataset(tmp_path / "images", model) == [*(f"a/0-{i}.png" for i in range(4)),
                                                        *(f"b/1-{i}.png" for i in range(4))]
    assert str(tmp_path / "images" / "a" / "more") in caplog.text


def test_229_every_class_folder_a_link_is_refused_naming_them(tmp_path, model):
    _images(tmp_path / "elsewhere" / "x")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x").symlink_to(tmp_path / "elsewhere" / "x")
    fix = "put images in one sub-folder per class, or directly in the folder if unlabeled (calibration only)"
    with refused("data.path", fix=fix, untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="image_folder", path=tmp_path / "images"), model)
    assert str(err.value).endswith(f"(skipped, never followed: {tmp_path / 'images' / 'x'}) ({fix})")


def test_230_a_class_whose_only_images_are_links_is_refused_naming_them(tmp_path, model):
    _images(tmp_path / "images" / "a")
    _images(tmp_path / "elsewhere", seed=5)
    (tmp_path / "images" / "b").mkdir()
    (tmp_path / "images" / "b" / "x.png").symlink_to(tmp_path / "elsewhere" / "5-0.png")
    with refused("data.path", untouched=[tmp_path]) as err:
        build_dataset(DataConfig(source="image_folder", path=tmp_path / "images"), model)
    assert "Found no valid file for the classes b" in str(err.value)
    assert f"(skipped, never followed: {tmp_path / 'images' / 'b' / 'x.png'})" in str(err.value)


# ------------------------------------------------------------------------------------ load_compressed

@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    """A compressed tiny ViT: a fitted span with bias (1->2), an identity span (3->4)."""
    config = ModelConfig(**MODEL)
    result = calibrate(create_model(config), "1->2, 3->4", loader(), identity="3->4", source=config)
    return save_compressed(result, tmp_path_factory.mktemp("compressed") / "model")


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def _maps(folder: Path, change) -> None:
    tensors = load_file(str(folder / "maps.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "maps.safetensors"))


def _manifest(folder: Path, old: str, new: str) -> None:
    path = folder / "manifest.yaml"
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))


W, B = "span.1-2.weight", "span.1-2.bias"


@pytest.mark.parametrize("change,field,message", [
    (lambda t: t.update({W: torch.zeros(10, 10, dtype=torch.float64)}), f"maps.safetensors.{W}",       # 231
     "shape (10, 10), expected (48, 48)"),
    (lambda t: t.update({B: torch.zeros(3, dtype=torch.float64)}), f"maps.safetensors.{B}",            # 232
     "shape (3,), expected (48,)"),
    (lambda t: t.update({W: torch.full((48, 48), float("nan"), dtype=torch.float64)}),                 # 233
     f"maps.safetensors.{W}", "contains NaN or Inf"),
    (lambda t: t[B].__setitem__(5, float("inf")), f"maps.safetensors.{B}", "contains NaN or Inf"),     # 234
    (lambda t: t.update({W: t[W].half()}), f"maps.safetensors.{W}", "dtype float16, expected float64"),  # 235
    (lambda t: t.update({W: t[W].long()}), f"maps.safetensors.{W}", "dtype int64, expected float64"),    # 235
    (lambda t: t.update({"span.0-1.weight": torch.eye(48, dtype=torch.float64)}), "maps.safetensors",  # 236
     "missing keys [], unexpected keys ['span.0-1.weight']"),
])
def test_231_236_maps_that_do_not_fit_the_rebuilt_model(tmp_path, compressed, change, field, message):
    folder = _copy(compressed, tmp_path)
    _maps(folder, change)
    with refused(field, untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value) == f"{field}: {message}"


@pytest.fixture(scope="module")
def two_spans(tmp_path_factory) -> Path:
    config = ModelConfig(**MODEL)
    result = calibrate(create_model(config), "1->2, 3->4", loader(), source=config)
    return save_compressed(result, tmp_path_factory.mktemp("two-spans") / "model")


def test_237_a_bias_for_one_fitted_span_but_not_the_other(tmp_path, two_spans):
    folder = _copy(two_spans, tmp_path)
    _maps(folder, lambda t: t.pop("span.3-4.bias"))
    with refused("maps.safetensors", untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value) == "maps.safetensors: missing keys ['span.3-4.bias'], unexpected keys []"


def test_238_finite_entries_that_overflow_the_model_dtype(tmp_path, compressed):
    folder = _copy(compressed, tmp_path)
    _maps(folder, lambda t: t.update({W: torch.full((48, 48), 1e100, dtype=torch.float64)}))
    with refused("maps.span.1-2", untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value) == "maps.span.1-2: entries of up to 1e+100 overflow the model's torch.float32"


FIX = "give a directory that tba-fed compress or a site's install wrote, unmodified"


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "is not a readable safetensors file ("),           # 239
    (lambda p: p.unlink(), "does not exist"),                                                           # 240
    (lambda p: torch.save({"w": torch.zeros(2)}, p), "is not a readable safetensors file ("),          # 241
    (lambda p: (p.unlink(), p.mkdir()), "is a directory, not a file"),                                  # 242
])
def test_239_242_a_maps_file_that_is_not_safetensors(tmp_path, compressed, damage, message):
    folder = _copy(compressed, tmp_path)
    damage(folder / "maps.safetensors")
    with refused("maps.safetensors", fix=FIX, untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value).startswith(f"maps.safetensors: {folder / 'maps.safetensors'} {message}")


@pytest.mark.parametrize("old,new,field,message", [
    ("model:", "modle:", "manifest.model", "Field required"),                                          # 243
    ("  seed: 0\n", "  seed: 0\n  sneaky: 1\n", "manifest.model.sneaky", "unknown key"),               # 244
    ("plan: 1->2, 3->4\n", "", "manifest.plan", "Field required"),                                     # 246
    ("identity_spans:\n- 3->4\n", "identity_spans: 7\n", "manifest.identity_spans", "Input should be a valid list"),
    ("identity_spans:\n- 3->4\n", "identity_spans:\n- 0->1\n", "manifest.identity_spans", "0->1 not in the plan "  # 248
     "1->2, 3->4"),
    ("  img_size: 32\n", "  img_size: -32\n", "manifest.model.kwargs.img_size",                        # 250
     "-32 is not a positive integer or a pair of them"),
])
def test_243_250_a_manifest_that_cannot_rebuild_the_model(tmp_path, compressed, old, new, field, message):
    folder = _copy(compressed, tmp_path)
    _manifest(folder, old, new)
    with refused(field, fix=FIX, untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value) == f"{field}: {folder / 'manifest.yaml'}: {message} ({FIX})"


def test_245_a_manifest_with_a_python_tag_runs_nothing(tmp_path, compressed):
    folder = _copy(compressed, tmp_path)
    marker = tmp_path / "PWNED"
    _manifest(folder, "plan: 1->2, 3->4", f"plan: !!python/object/apply:os.system ['touch {marker}']")
    with refused("manifest", fix=FIX, untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" \
        in str(err.value)
    assert not marker.exists()


def test_249_a_manifest_that_is_not_utf8(tmp_path, compressed):
    folder = _copy(compressed, tmp_path)
    (folder / "manifest.yaml").write_bytes(b"format: tba-fed/compressed\nplan: \xff\xfe\n")
    with refused("manifest", fix=FIX, untouched=[tmp_path]) as err:
        load_compressed(folder)
    assert str(err.value).startswith(f"manifest: {folder / 'manifest.yaml'} cannot be read (")


# ------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """The tiny ViT's weights as .safetensors and .pth."""
    folder = tmp_path_factory.mktemp("weights")
    state = {k: v.contiguous() for k, v in create_model(ModelConfig(**MODEL)).state_dict().items()}
    save_file(state, str(folder / "vit.safetensors"))
    torch.save(state, folder / "vit.pth")
    return {"safetensors": folder / "vit.safetensors", "pth": folder / "vit.pth", "state": state}


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("name,make,message", [
    ("cut.safetensors", lambda w, p: p.write_bytes(w["safetensors"].read_bytes()[:5000]),              # 251
     "is not a readable safetensors file ("),
    ("pickle.safetensors", lambda w, p: p.write_bytes(w["pth"].read_bytes()),                          # 252
     "is not a readable safetensors file ("),
    ("empty.safetensors", lambda w, p: p.write_bytes(b""), "is not a readable safetensors file ("),    # 253
    ("folder.safetensors", lambda w, p: p.mkdir(), "is a directory, not a file"),                      # 254
    ("cut.pth", lambda w, p: p.write_bytes(w["pth"].read_bytes()[:5000]),                              # 255
     "is not a readable PyTorch weights file"),
    ("text.pth", lambda w, p: p.write_text("weights, honest"), "is not a readable PyTorch weights file"),  # 256
    ("code.pth", lambda w, p: torch.save({"x": _RunsCode(p.parent / "PWNED")}, p),                      # 257
     "is not a readable PyTorch weights file"),
    ("list.pth", lambda w, p: torch.save([1, 2, 3], p), "holds a list, not a state dict of tensors"),   # 258
    ("nan.safetensors", lambda w, p: save_file({**w["state"], "blocks.0.attn.qkv.weight":                  # 259
                                                torch.full((144, 48), float("nan"))}, str(p)),
     "tensor blocks.0.attn.qkv.weight contains NaN or Inf"),
])
def test_251_259_a_checkpoint_that_is_not_weights(tmp_path, weights, name, make, message):
    path = tmp_path / name
    make(weights, path)
    with refused("model.checkpoint", untouched=[tmp_path]) as err:
        create_model(ModelConfig(**MODEL, checkpoint=path))
    assert message in str(err.value) and str(path) in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_260_compress_with_a_truncated_checkpoint(tmp_path, capsys, weights):
    path = tmp_path / "vit.safetensors"
    path.write_bytes(weights["safetensors"].read_bytes()[:5000])
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--checkpoint", str(path), "--num-images", "16", "--plan", "1->2",
                         "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert f"{path} is not a readable safetensors file (" in _one_line_error(code, err, "model.checkpoint")


# ------------------------------------------------------------------------------------------- ledgers

def _entry(**change) -> dict:
    """A ledger entry as tba-fed writes it (the fields every version has), with `change` applied."""
    return {"run_id": "run-1", "release": "statistics", "spec_sha256": "0" * 64, "mechanism": "gaussian",
            "noise_multiplier": 2.0, "noise_std": {"gram": 1.0}, "noise": "secure", "aggregation": "local",
            "images": 300, "epsilon_run": 1.0, "delta": 1e-5, "time": "2026-01-01T00:00:00+00:00", **change}


def _ledger_text(*entries: dict) -> str:
    return json.dumps({"format": LEDGER_FORMAT, "entries": list(entries)})


LEDGER_FIX = "(restore the ledger from backup; never delete it to reset a budget)"


@pytest.mark.parametrize("text,reason", [
    ("[]", "Input should be an object"),                                                               # 261
    (_ledger_text(_entry(noise_multiplier="abc")), "entries.0.noise_multiplier: Input should be a valid number"),
    (_ledger_text(_entry(noise_multiplier=1e-300)),                                                     # 264
     "entries.0.noise_multiplier: Input should be greater than or equal to 0.06"),
    (_ledger_text(_entry(noise_multiplier=-1.0)),                                                       # 265
     "entries.0.noise_multiplier: Input should be greater than or equal to 0.06"),
    (_ledger_text(_entry(noise_multiplier=None)), "entries.0.noise_multiplier: Input should be a valid number"),
    (_ledger_text(_entry(noise_multiplier=1e300)),                                                      # 267
     "entries.0.noise_multiplier: Input should be less than or equal to 1000000"),
    (_ledger_text(_entry(noise_multiplier=True)), "entries.0.noise_multiplier: Input should be a valid number"),
    (_ledger_text(_entry(), _entry(run_id="run-2", epsilon_run=float("nan"))),                         # 269
     "entries.1.epsilon_run: Input should be a finite number"),
    (_ledger_text(_entry(images="many")), "entries.0.images: Input should be a valid integer"),         # 270
    ('{"format": "' + LEDGER_FORMAT + '", "entries": ' + "[" * 100_000 + "]" * 100_000 + "}",          # 271
     "RecursionError: maximum recursion depth exceeded"),
    (_ledger_text(_entry()).replace('"noise_multiplier": 2.0', '"noise_multiplier": 50.0, "noise_multiplier": 2.0'),
     "ValueError: key 'noise_multiplier' given twice"),                                                 # 295
])
def test_261_271_privacy_report_on_a_ledger_that_is_not_one(tmp_path, capsys, text, reason):
    ledger = _write(tmp_path / "ledger.json", text)
    code, out, err = run_cli(["privacy", "report", str(_site(tmp_path, {}))], capsys, [tmp_path])
    line = _one_line_error(code, err, "privacy.ledger")
    assert line.startswith(f"tba-fed: error: privacy.ledger: {ledger} is unreadable (")
    assert reason in line and line.endswith(f"); refusing to release anything {LEDGER_FIX}")
    assert out == ""


def test_262_a_ledger_path_that_is_a_directory(tmp_path, capsys):
    (tmp_path / "ledger.json").mkdir()
    code, _, err = run_cli(["privacy", "report", str(_site(tmp_path, {}))], capsys, [tmp_path])
    assert _one_line_error(code, err, "privacy.ledger") == (
        f"tba-fed: error: privacy.ledger: {tmp_path / 'ledger.json'} is unreadable (Is a directory); refusing to "
        f"release anything {LEDGER_FIX}")


def test_272_preflight_of_a_site_whose_ledger_has_a_vanishing_sigma(tmp_path, capsys):
    _write(tmp_path / "ledger.json", _ledger_text(_entry(noise_multiplier=1e-300)))
    site = _site(tmp_path, {"min_images": 1}, model=MODEL)
    code, out, err = run_cli(["preflight", str(site)], capsys, [tmp_path])
    assert code == 1 and "Traceback" not in err
    assert [line.split(" is unreadable (")[0] for line in out.splitlines() if line.startswith("PROBLEM")] == [
        f"PROBLEM privacy.ledger: {tmp_path / 'ledger.json'}"]


# ------------------------------------------------------------------------------------------ audit logs

def _site_event(**change) -> dict:
    return {"role": "site", "site": "hospital-a", "run_id": "9", "round": "query.statistics",
            "message_type": "query.statistics", "request_sha256": "0a" * 32, "sent_sha256": "0b" * 32, "status": "ok",
            **change}


def _server_event(**change) -> dict:
    return {"role": "server", "run_id": "9", "round": "query.statistics", "message_type": "query.statistics",
            "sent": {}, "sites": {"hospital-a": {"node_id": 1, "status": "ok", "sent_sha256": "0a" * 32,
                                                 "received_sha256": "0b" * 32}}, **change}


def _log(path: Path, *events: dict) -> Path:
    for event in events:
        AuditLog(path).append(event)
    return path


DEEP = b"[" * 100_000 + b"]" * 100_000 + b"\n"


def test_273_a_line_nested_too_deep_is_a_problem_of_the_log(tmp_path, capsys):
    log = _log(tmp_path / "audit.jsonl", _site_event())
    with log.open("ab") as handle:
        handle.write(DEEP)
    code, out, err = run_cli(["audit", "verify", str(log)], capsys, [tmp_path])
    assert code == 1 and "Traceback" not in err
    assert out.splitlines() == [f"{log}:2: not a JSON entry (edited or corrupted)"]


def test_296_an_audit_entry_giving_a_key_twice_is_a_problem_of_the_log(tmp_path, capsys):
    """The hash covers the parsed entry, so a duplicated key with the same value left the chain intact on c272bf5;
    a reader keeping the first value instead of the last would see another entry."""
    log = _log(tmp_path / "audit.jsonl", _site_event())
    log.write_text(log.read_text().replace('"status": "ok"', '"status": "ok", "status": "ok"', 1))
    code, out, err = run_cli(["audit", "verify", str(log)], capsys, [tmp_path])
    assert code == 1 and "Traceback" not in err
    assert out.splitlines() == [f"{log}:1: not a JSON entry (edited or corrupted)"]


def test_297_an_output_marker_giving_a_key_twice_is_not_tba_feds(tmp_path):
    from tba_fed.fileio import MARKER, check_output_dir

    out = tmp_path / "out"
    _write(out / "notes.txt", "kept\n")
    _write(out / MARKER, '{"format": "tba-fed/experiment/1", "format": "tba-fed/compressed/1", "files": {"notes.txt": null}}')
    with refused("output", untouched=[tmp_path]) as info:
        check_output_dir(out, kind="compressed", overwrite=True)
    assert "key 'format' given twice" in str(info.value)


def test_298_a_site_state_marker_giving_a_key_twice(tmp_path):
    from tba_fed.privacy.site_state import MARKER, initialise, open_state

    state, ledger = tmp_path / "state", tmp_path / "ledger.json"
    initialise(state, "hospital-a", ledger)
    marker = json.loads((state / MARKER).read_text())
    text = json.dumps(marker)
    (state / MARKER).write_text(text.replace('"ledger": ', f'"ledger": {json.dumps(str(tmp_path / "other.json"))}, '
                                                           '"ledger": ', 1))
    with refused("state", untouched=[tmp_path]) as info:
        open_state(state, "hospital-a", ledger)
    assert "key 'ledger' given twice" in str(info.value)


def test_274_audit_show_counts_a_line_nested_too_deep(tmp_path, capsys):
    log = _write(tmp_path / "audit.jsonl", DEEP.decode())
    code, out, err = run_cli(["audit", "show", str(log)], capsys, [tmp_path])
    assert code == 0 and "Traceback" not in err
    assert "- 0 entries; head `" + "0" * 64 + "`; 1 problems (run `tba-fed audit verify`)" in out


@pytest.mark.parametrize("event,message", [
    (_site_event(status=None), "not a site entry as tba-fed writes it (status: Input should be a valid string)"),  # 275
    (_site_event(grant={"mechanism": "gaussian", "noise_multiplier": "abc"}),                                     # 278
     "not a site entry as tba-fed writes it (grant.noise_multiplier: Input should be a valid number)"),
])
def test_275_278_audit_show_of_entries_that_do_not_fit(tmp_path, capsys, event, message):
    log = _log(tmp_path / "audit.jsonl", _site_event(), event)
    code, out, err = run_cli(["audit", "show", str(log)], capsys, [tmp_path])
    assert code == 0 and "Traceback" not in err
    assert "; 1 problems (run `tba-fed audit verify`)" in out
    rows = [line for line in out.splitlines() if line.startswith("| 1 | ")]
    assert len(rows) == 1 and rows[0].endswith("| | | | unreadable | | see `tba-fed audit verify` |")
    code, out, _ = run_cli(["audit", "verify", str(log)], capsys, [tmp_path])
    assert code == 1 and out.splitlines() == [f"{log}:2 (seq 1): {message}"]


@pytest.mark.parametrize("site_events,server_events,bad,message", [
    ([_site_event()], [_server_event(sites=[1, 2])], "server",                                                   # 276
     "not a server entry as tba-fed writes it (sites: Input should be a valid dictionary)"),
    ([_site_event(site=None)], [_server_event()], "site",                                                        # 277
     "not a site entry as tba-fed writes it (site: Input should be a valid string)"),
])
def test_276_277_verify_against_entries_that_do_not_fit(tmp_path, capsys, site_events, server_events, bad, message):
    site, server = _log(tmp_path / "site.jsonl", *site_events), _log(tmp_path / "server.jsonl", *server_events)
    code, out, err = run_cli(["audit", "verify", str(site), "--against", str(server)], capsys, [tmp_path])
    assert code == 1 and "Traceback" not in err
    assert out.splitlines()[0] == f"{site if bad == 'site' else server}:1 (seq 0): {message}"
    assert "--against needs one site log and one server log" in out.splitlines()[1]


def test_279_an_entry_whose_role_is_neither_site_nor_server(tmp_path, capsys):
    log = _log(tmp_path / "audit.jsonl", _site_event(), {"role": {"admin": True}})
    code, out, err = run_cli(["audit", "verify", str(log)], capsys, [tmp_path])
    assert code == 1 and "Traceback" not in err
    assert out.splitlines() == [f"{log}:2 (seq 1): role \"{{'admin': True}}\" is neither site nor server"]


def test_280_an_audit_log_that_is_a_directory(tmp_path, capsys):
    code, _, err = run_cli(["audit", "show", str(tmp_path)], capsys, [tmp_path])
    assert _one_line_error(code, err, "audit") == (f"tba-fed: error: audit: {tmp_path} is a directory (give the path "
                                                   "of an audit log (audit.jsonl))")
    with refused("audit", untouched=[tmp_path]):
        check_chain(tmp_path)


# --------------------------------------------------------------------------------- model kwargs, counts

@pytest.mark.parametrize("arg,field,message", [
    ("img_size=-32", "model.kwargs.img_size", "-32 is not a positive integer or a pair of them"),      # 281
    ("patch_size=0", "model.kwargs.patch_size", "0 is not a positive integer or a pair of them"),      # 282
    ("depth=-1", "model.kwargs.depth", "-1 is not a positive integer"),                                # 283
    ("embed_dim=0", "model.kwargs.embed_dim", "0 is not a positive integer"),                          # 284
    ("num_heads=5", "model.kwargs", "vit_tiny_patch16_224 cannot be built with"),                     # 285
    ("drop_rate=.inf", "model.kwargs.drop_rate", "inf is not a finite number"),                        # 286
    ("img_size=[32, true]", "model.kwargs.img_size", "[32, True] is not a positive integer or a pair of them"),
])
def test_281_287_model_kwargs_refused_before_timm_builds_anything(tmp_path, capsys, arg, field, message):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--model-arg", arg, "--num-images", "16", "--plan", "1->2",
                         "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert _one_line_error(code, err, field).startswith(f"tba-fed: error: {field}: {message}")


BIG = 10**30


@pytest.mark.parametrize("settings,field", [
    ({"data": {"batch_size": BIG}}, "data.batch_size"),                                                 # 288
    ({"data": {"source": "synthetic", "num_images": 10**12}}, "data.num_images"),                       # 289
    ({"model": {**MODEL, "seed": BIG}}, "model.seed"),                                                  # 290
    ({"data": {"seed": BIG}}, "data.seed"),                                                             # 291
    ({"data": {"num_classes": BIG}}, "data.num_classes"),                                               # 292
    ({"data": {"num_workers": BIG}}, "data.num_workers"),                                               # 293
])
def test_288_293_counts_no_machine_holds(tmp_path, capsys, settings, field):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", "output": str(tmp_path / "out"), **settings})
    code, _, err = run_cli(["compress", "--config", str(path)], capsys, [tmp_path])
    assert _one_line_error(code, err, field).startswith(f"tba-fed: error: {field}: Input should be less than")


def test_294_a_negative_data_seed_with_a_subset_of_a_real_source(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "scans.npz", train_images=rng.integers(0, 255, (30, 12, 12), dtype=np.uint8),
             train_labels=rng.integers(0, 3, (30, 1)))
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--data", str(tmp_path / "scans.npz"), "--num-images", "10",
                         "--data-seed", "-5", "--plan", "1->2", "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert _one_line_error(code, err, "data.seed") == ("tba-fed: error: data.seed: Input should be greater than or "
                                                       "equal to 0")
