"""Bad-input campaign (issue #6, point 5), part 1 of 3: YAML configs and CLI arguments.

Each kind is refused with a TBAInputError (CLI: exit code 2 and ``tba-fed: error: FIELD: ...``, or
argparse's exit 2 naming the flag) whose field is asserted exactly; nothing is written where the
command would write, and no file descriptor or child process is left behind (tests/refusal.py).
Numbering runs across the three parts (part 2: test_bad_inputs_data.py, part 3: test_bad_inputs_network.py).

| #  | malformed input                                              | refused as (field)                     |
|----|--------------------------------------------------------------|----------------------------------------|
| 1  | YAML syntax error                                            | config (line and column)               |
| 2  | empty YAML file                                              | config                                 |
| 3  | a list at the top level of a YAML file                       | config                                 |
| 4  | a list where a section (mapping) is expected                 | data                                   |
| 5  | a string where a number is expected                          | data.num_images                        |
| 6  | unknown key in a site's privacy policy                       | privacy.epsilom                        |
| 7  | zero, negative or out-of-range numbers (6 fields)            | data.batch_size, ridge, ...            |
| 8  | settings that contradict or lack each other (5 cases)        | model.checkpoint, data.path, ...       |
| 9  | secure aggregation with min_sites 1                          | privacy.aggregation                    |
| 10 | a directory given as a YAML file                             | config                                 |
| 11 | a binary (non UTF-8) file given as a YAML file               | config                                 |
| 12 | unreadable plan string in a federated run                    | plan (before any site is asked)        |
| 13 | overlapping spans in a simulated run                         | plan (before any process starts)       |
| 14 | identity span outside the plan                               | identity_spans                         |
| 15 | unknown model name in a federated run                        | model.name (before any site is asked)  |
| 16 | privacy ledger in a location that cannot be written          | privacy.ledger (nothing released)      |
| 17 | ``privacy report`` on a corrupt ledger                       | privacy.ledger (ledger untouched)      |
| 18 | unknown CLI flag                                             | argparse: the flag                     |
| 19 | malformed ``--model-arg`` (no ``=``, empty key, bad YAML)    | argparse: --model-arg                  |
| 20 | ``--model-arg`` the architecture does not take               | model.kwargs                           |
| 21 | a word where a flag expects a number                         | argparse: --num-images                 |
| 22 | ``--config`` file that does not exist                        | config                                 |
| 23 | ``--config`` pointing at a directory                         | config                                 |
| 24 | ``--output`` an existing non-tba-fed directory (--overwrite) | output (before data is read)           |
| 25 | ``--output`` an existing file                                | output                                 |
| 26 | ``--holdout-fraction 1.0``                                   | data.holdout_fraction                  |
| 27 | ``simulate`` with a config that does not exist               | config (no process started)            |

Also covered elsewhere and not counted here: unknown top-level/section keys (test_config.py,
test_cli.py), min_sites > num_sites and a site YAML without a ledger (test_config.py), plan spans
overlapping or reversed and a non-ViT model through the CLI (test_cli.py), plan spans out of range and an
unknown model through the CLI (test_bad_inputs_cli.py).
"""

from __future__ import annotations

import json

import pytest
import yaml

from tba_fed.config import load_config
from tba_fed.federation.config import load_federated_config, load_site_config
from tba_fed.federation.server import run_server
from tba_fed.deploy.simulate import simulate
from tba_fed.federation.site_privacy import RunSpec, open_release
from tba_fed.privacy.policy import PrivacyRequest, SitePolicy
from tba_fed.privacy.site_state import initialise

from conftest import TINY
from refusal import refused, run_cli

MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]


def _write(path, text: str):
    path.write_text(text)
    return path


def _yaml(path, data: dict):
    return _write(path, yaml.safe_dump(data))


# ------------------------------------------------------------------------------------------------ YAML

def test_1_yaml_syntax_error_gives_line_and_column(tmp_path):
    path = _write(tmp_path / "run.yaml", "model:\n  name: vit_tiny_patch16_224\ndata: {source: synthetic\n")
    with refused("config") as err:
        load_config(path)
    assert f"{path} is not valid YAML at line 4, column 1: expected ',' or '}}', but got '<stream end>'" in str(err.value)


def test_2_empty_yaml_file(tmp_path):
    path = _write(tmp_path / "site.yaml", "")
    with refused("config", fix="write the settings as a YAML mapping (see configs/)") as err:
        load_site_config(path)
    assert str(err.value).startswith(f"config: {path} is empty")


def test_3_list_at_top_level(tmp_path):
    path = _write(tmp_path / "run.yaml", "- model\n- data\n")
    with refused("config") as err:
        load_federated_config(path)
    assert str(err.value) == f"config: {path} must hold a mapping at top level, not a list"


def test_4_list_where_a_section_is_expected(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "data": ["synthetic", 20]})
    with refused("data") as err:
        load_config(path)
    assert str(err.value) == "data: Input should be a valid dictionary or instance of DataConfig"


def test_5_string_where_a_number_is_expected(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "data": {"num_images": "many"}})
    with refused("data.num_images") as err:
        load_config(path)
    assert "Input should be a valid integer" in str(err.value)


def test_6_unknown_key_in_a_site_policy(tmp_path):
    path = _yaml(tmp_path / "site.yaml", {"name": "h", "data": {"source": "synthetic"}, "output": "out",
                                          "privacy": {"epsilom": 1.0, "ledger": "ledger.json"}})
    with refused("privacy.epsilom", fix="check the spelling against the documented keys") as err:
        load_site_config(path)
    assert str(err.value).startswith("privacy.epsilom: unknown key")


@pytest.mark.parametrize("override,field,message", [
    ({"data": {"batch_size": 0}}, "data.batch_size", "Input should be greater than or equal to 1"),
    ({"ridge": -1.0}, "ridge", "Input should be greater than or equal to 0"),
    ({"data": {"holdout_fraction": 1.5}}, "data.holdout_fraction", "Input should be less than 1"),
    ({"federation": {"round_timeout": 0}}, "federation.round_timeout", "Input should be greater than 0"),
    ({"federation": {"num_sites": -2, "min_sites": 1}}, "federation.num_sites", "Input should be greater than or equal to 1"),
    ({"privacy": {"epsilon": -1.0}}, "privacy.epsilon", "Input should be greater than 0"),
])
def test_7_zero_negative_or_out_of_range_numbers(tmp_path, override, field, message):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", **override})
    with refused(field) as err:
        load_federated_config(path)
    assert str(err.value) == f"{field}: {message}"


@pytest.mark.parametrize("settings,field,message", [
    ({"model": {**MODEL, "pretrained": True, "checkpoint": "w.safetensors"}}, "model.checkpoint",
     "set either pretrained or checkpoint, not both"),
    ({"data": {"source": "image_folder"}}, "data.path", "source image_folder needs path"),
    ({"data": {"split": "val"}}, "data.split", "split val exists only for medmnist, not synthetic"),
    ({"budget": {"metric": "mse"}}, "budget.blocks", "give exactly one of blocks or params"),
    ({"plan": "1->2", "budget": {"blocks": 1}}, "plan", "set either plan or budget, not both"),
])
def test_8_contradicting_or_incomplete_settings_name_their_field(tmp_path, settings, field, message):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, **settings})
    with refused(field) as err:
        load_config(path)
    assert str(err.value) == f"{field}: {message}"


def test_9_secure_aggregation_with_one_site(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->2", "federation": {"num_sites": 3, "min_sites": 1},
                                         "privacy": {"epsilon": 1.0, "aggregation": "secure"}})
    with refused("privacy.aggregation", fix="set federation.min_sites to 2 or more, or aggregation: local") as err:
        load_federated_config(path)
    assert "secure aggregation needs federation.min_sites >= 2" in str(err.value)


def test_10_directory_given_as_config(tmp_path):
    with refused("config", fix="give the YAML file inside it") as err:
        load_site_config(tmp_path)
    assert str(err.value).startswith(f"config: {tmp_path} is a directory")


def test_11_binary_file_given_as_config(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(128, 256)))
    with refused("config") as err:
        load_config(path)
    assert str(err.value).startswith(f"config: {path} cannot be read (") and "codec can't decode" in str(err.value)


class NoSitesGrid:
    """A grid the run must never reach: every call is a failure of the test."""

    def get_node_ids(self):
        raise AssertionError("the run contacted the grid before refusing its config")

    send_and_receive = get_node_ids


@pytest.mark.parametrize("settings,field,fix", [
    ({"plan": "1-2"}, "plan", 'write spans as "s->e", e.g. "1->2, 4->5"'),                                  # 12
    ({"plan": "1->2", "identity_spans": "3->4"}, "identity_spans", None),                                  # 14
    ({"model": {"name": "vit_nonexistent"}, "plan": "1->2"}, "model.name",                                 # 15
     "see timm.list_models('vit*'), or use an offline model: dinov2-s-imgfocus"),
])
def test_12_14_15_federated_run_refused_before_any_site_is_asked(tmp_path, settings, field, fix):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "federation": {"num_sites": 2, "round_timeout": 600},
                                         "output": str(tmp_path / "server"), **settings})
    with refused(field, fix=fix, untouched=[tmp_path]):
        run_server(NoSitesGrid(), load_federated_config(path))


def test_13_overlapping_spans_refused_before_any_process_starts(tmp_path):
    path = _yaml(tmp_path / "run.yaml", {"model": MODEL, "plan": "1->3, 2->4", "output": str(tmp_path / "out")})
    with refused("plan", fix="make the spans disjoint", untouched=[tmp_path]) as err:
        simulate(path)
    assert str(err.value) == "plan: spans 1->3 and 2->4 overlap (make the spans disjoint)"


def test_16_ledger_that_cannot_be_written_refuses_the_release(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the ledger's directory should be")
    policy = SitePolicy(epsilon=4.0, min_images=1, ledger=blocker / "ledger.json")
    request = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=("statistics",))
    fix = "set privacy.ledger to a path in a directory this site's user can write"
    with refused("privacy.ledger", fix=fix, untouched=[tmp_path]) as err, \
            open_release(policy, RunSpec("7", request), "statistics", {"calibration": 50}, site_name="h", parts=()):
        pass
    assert f"{blocker / 'ledger.json.releases'} cannot be written (" in str(err.value)


# ------------------------------------------------------------------------------------------------ CLI

def test_17_privacy_report_on_a_corrupt_ledger(tmp_path, capsys):
    ledger = tmp_path / "ledger.json"
    initialise(tmp_path / "state", "h", ledger)  # an initialised site whose ledger was corrupted since
    capsys.readouterr()  # what initialising logged
    _write(ledger, '{"format": "tba-fed privacy ledger 1", "entries": [{"run_id": 1}')
    site = _yaml(tmp_path / "site.yaml", {"name": "h", "data": {"source": "synthetic"}, "output": str(tmp_path / "out"),
                                          "privacy": {"epsilon": 1.0, "ledger": str(ledger)},
                                          "state": str(tmp_path / "state")})
    code, _, err = run_cli(["privacy", "report", str(site)], capsys, untouched=[tmp_path])
    assert code == 2
    assert err.startswith(f"tba-fed: error: privacy.ledger: {ledger} is unreadable (")
    assert err.rstrip().endswith("(restore the ledger from backup; never delete it to reset a budget)")


def test_18_unknown_flag(tmp_path, capsys):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--plann", "1->2", "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert code == 2 and "error: unrecognized arguments: --plann 1->2" in err


@pytest.mark.parametrize("value,message", [
    ("img_size", "expected KEY=VALUE, got 'img_size'"),
    ("=32", "expected KEY=VALUE, got '=32'"),
    ("img_size=[32", "img_size: cannot read the value '[32'"),
])
def test_19_malformed_model_arg(tmp_path, capsys, value, message):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--model-arg", value, "--plan", "1->2", "-o", str(tmp_path / "out")],
                     capsys, [tmp_path])
    assert code == 2 and f"error: argument --model-arg: {message}" in err


def test_20_model_arg_the_architecture_does_not_take(tmp_path, capsys):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--model-arg", "depthh=3", "--plan", "1->2", "-o", str(tmp_path / "out")],
                     capsys, [tmp_path])
    assert code == 2 and err.startswith("tba-fed: error: model.kwargs: not accepted by vit_tiny_patch16_224: ")
    assert "depthh" in err


def test_21_word_where_a_number_is_expected(tmp_path, capsys):
    code, _, err = run_cli(["analyze", *TINY_FLAGS, "--num-images", "many", "-o", str(tmp_path / "out")], capsys, [tmp_path])
    assert code == 2 and "error: argument --num-images: invalid int value: 'many'" in err


def test_22_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(["compress", "--config", str(tmp_path / "missing.yaml")], capsys, [tmp_path])
    assert code == 2 and err == f"tba-fed: error: config: {tmp_path / 'missing.yaml'} does not exist\n"


def test_23_directory_as_config_file(tmp_path, capsys):
    code, _, err = run_cli(["analyze", "--config", str(tmp_path)], capsys, [tmp_path])
    assert code == 2 and err == f"tba-fed: error: config: {tmp_path} is a directory (give the YAML file inside it)\n"


def test_24_output_not_made_by_tba_fed_is_refused_before_data_is_read(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    _write(out / "thesis.tex", "years of work")
    # the data path does not exist either: the output is refused first, before any work
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--data", str(tmp_path / "no-images"), "--plan", "1->2", "-o", str(out),
                      "--overwrite"], capsys, [tmp_path])
    assert code == 2
    assert err == (f"tba-fed: error: output: {out} is not empty and holds no tba-fed-output.json, so it is not a "
                   "tba-fed output; refusing to touch it (choose an empty or new output path)\n")


def test_25_output_is_an_existing_file(tmp_path, capsys):
    out = _write(tmp_path / "out", "a file")
    code, _, err = run_cli(["analyze", *TINY_FLAGS, "-o", str(out)], capsys, [tmp_path])
    assert code == 2
    assert err == f"tba-fed: error: output: {out} exists and is not a directory (choose another output path)\n"


def test_26_holdout_fraction_of_one(tmp_path, capsys):
    code, _, err = run_cli(["compress", *TINY_FLAGS, "--holdout-fraction", "1.0", "--plan", "1->2", "-o", str(tmp_path / "o")],
                     capsys, [tmp_path])
    assert code == 2 and err == "tba-fed: error: data.holdout_fraction: Input should be less than 1\n"


def test_27_simulate_with_a_missing_config_starts_nothing(tmp_path, capsys):
    code, _, err = run_cli(["simulate", str(tmp_path / "run.yaml")], capsys, [tmp_path])
    assert code == 2 and err == f"tba-fed: error: config: {tmp_path / 'run.yaml'} does not exist\n"
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"
