"""Bad-input campaign, part 7: every CLI command and every flag it takes.

The commands are read from the parser itself, so a command or flag added later is covered (or fails
`test_401_the_campaign_knows_every_command`) without anyone remembering this file. Each case runs the real
entry point (`tba_fed.cli.main`) in a scratch directory and asserts: the exit code (2 for bad input; 1 for the
checkers, `preflight` and `audit verify`, whose contract is a report of problems), no traceback, the error as
one line that names the flag, field or file, and no file in the directory created, changed or removed.

| #   | bad input                                                              | refused as                            |
|-----|------------------------------------------------------------------------|---------------------------------------|
| 401 | a command the campaign does not know (guards the list below)           | the test fails                        |
| 402 | an unknown flag, for every command                                     | argparse: unrecognized arguments      |
| 403 | no positional argument, for every command that needs one               | argparse: arguments are required      |
| 404 | a word where a typed flag expects a number/KEY=VALUE/hash, every flag  | argparse: the flag                    |
| 405 | a value outside a flag's choices, every flag with choices              | argparse: the flag                    |
| 406 | a YAML/log argument that does not exist, every command taking one      | config / audit (the path)             |
| 407 | a directory where the YAML/log file goes, every command                | config / audit (the path)             |
| 408 | bytes that are not UTF-8 where the YAML/log goes, every command        | config / audit (the path)             |
| 409 | an empty YAML file, every command taking a YAML                        | config (the path)                     |
| 410 | ``--output``/``-o`` naming an existing file, every command with it     | output                                |
| 411 | ``--config`` missing, a directory, not UTF-8 (compress, analyze)       | config                                |
| 412 | ``audit verify --against`` a log that does not exist                   | audit (the path)                      |
| 413 | ``compress`` with neither ``--plan`` nor a budget                      | plan (before the model is built)      |
| 414 | an unreadable plan, a span beyond the model, unreadable identity spans | plan, identity_spans                  |
| 415 | ``--ridge`` NaN or negative                                            | ridge                                 |
| 416 | ``--num-images``/``--batch-size`` zero or negative                     | data.num_images, data.batch_size      |
| 417 | ``--sample-rate`` 2, ``--holdout-fraction`` 1.5                        | data.sample_rate, data.holdout_fraction |
| 418 | ``--data-seed`` negative, ``--model-seed`` beyond 32 bits              | data.seed, model.seed                 |
| 419 | ``--device tpu``, ``--device cuda`` on a machine without a GPU         | device                                |
| 420 | ``--budget-blocks -1``, ``--budget-params 0``                          | budget.blocks, budget.params          |
| 421 | ``--checkpoint`` missing or of an unknown file type                    | model.checkpoint                      |
| 422 | ``--data`` naming nothing, a file, a folder without class sub-folders  | data.path                             |
| 423 | ``--model-arg depth=-1``, ``num_heads=7`` (does not divide the width)  | model.kwargs.depth, model.kwargs      |
| 424 | ``--model`` naming no timm architecture                                | model.name                            |
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tba_fed.cli import build_parser

from refusal import run_cli, snapshot

# Every leaf command and the positional arguments that make an otherwise valid call of it.
POSITIONALS = {
    "analyze": [], "compress": [], "experiment": ["config"], "simulate": ["config"], "preflight": ["config"],
    "superlink": ["config"], "supernode": ["config"], "submit": ["config"], "privacy report": ["site_config"],
    "site init": ["dir"], "audit verify": ["log"], "audit show": ["log"], "prepare": [], "demo": [],
    "export": ["compressed"], "benchmark": ["compressed"], "connect": ["config"], "status": ["config"],
}
# Flags argparse requires, given with every call that is otherwise valid (export's positional is a directory).
REQUIRED_FLAGS = {"export": ["--format", "pt2", "--output", "out"],
                  "site init": ["--name", "hospital-a", "--superlink", "127.0.0.1:9092", "--ca", "ca.crt", "--data",
                                "folder", "--model", "vit_tiny_patch16_224", "--epsilon", "4"]}
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING) ")
CHECKERS = {"preflight", "audit verify", "status"}  # report problems with exit 1 by contract
TINY = ["--model", "vit_tiny_patch16_224", "--model-arg", "depth=2", "--model-arg", "img_size=32",
        "--model-arg", "patch_size=16", "--data", "synthetic", "--num-images", "8"]


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:  # argparse has no public walk over sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(leaf_commands(sub, (*prefix, name)))
    return found or {" ".join(prefix): parser}


COMMANDS = leaf_commands(build_parser())


def assert_refused(argv: list[str], named: str, capsys, tmp_path: Path, code: int = 2) -> str:
    """`argv` exits with `code`, no traceback, one error line naming `named`, and the directory untouched.
    Returns what was written to stderr (the log and the error)."""
    before = snapshot(tmp_path)
    got, out, err = run_cli(argv, capsys)
    assert snapshot(tmp_path) == before, f"{argv} changed files"
    assert "Traceback" not in out + err, err[-3000:]
    assert got == code, (argv, got, out[-1000:], err[-1000:])
    if code == 2:
        errors = [line for line in err.splitlines() if re.match(r"tba-fed( [a-z]+)*: error: ", line)]
        assert len(errors) == 1 and named in errors[0], (argv, err[-2000:])
        others = [line for line in err.splitlines() if line and line != errors[0] and not LOG_LINE.match(line)]
        assert not others, (argv, err[-2000:])  # nothing but log lines and the error: no usage block
    else:  # a checker: its report names the input, and says how many problems
        assert named in out and ("PROBLEM" in out or "problem" in err), (out, err)
    return err


@pytest.fixture(autouse=True)
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TBA_FED_CACHE", str(tmp_path / "cache"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "binary.yaml").write_bytes(b"\x00\xff\xfe\x80")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "file.txt").write_text("someone's notes\n")
    (tmp_path / "run.yaml").write_text("model: {name: vit_tiny_patch16_224}\n")


def test_401_the_campaign_knows_every_command():
    assert set(COMMANDS) == set(POSITIONALS), "add the new command to POSITIONALS (and its bad inputs here)"


def _valid_positionals(command: str) -> list[str]:
    return ["run.yaml" for _ in POSITIONALS[command]] + REQUIRED_FLAGS.get(command, [])


@pytest.mark.parametrize("command", sorted(POSITIONALS))
def test_402_an_unknown_flag(command, capsys, tmp_path):
    assert_refused([*command.split(), *_valid_positionals(command), "--no-such-flag"], "--no-such-flag",
                   capsys, tmp_path)


@pytest.mark.parametrize("command", sorted(c for c, p in POSITIONALS.items() if p))
def test_403_a_missing_positional_argument(command, capsys, tmp_path):
    assert_refused(command.split(), "the following arguments are required", capsys, tmp_path)


def _flags(kind: str) -> list[tuple[str, str]]:
    """(command, flag) for every optional flag whose value argparse checks: by a type ('typed') or by choices."""
    cases = []
    for command, parser in COMMANDS.items():
        for action in parser._actions:
            if not action.option_strings or action.nargs == 0:
                continue
            if kind == "choices" and action.choices is not None:
                cases.append((command, action.option_strings[-1]))
            if kind == "typed" and action.choices is None and action.type not in (None, str, Path):
                cases.append((command, action.option_strings[-1]))
    return cases


@pytest.mark.parametrize(("command", "flag"), _flags("typed"))
def test_404_a_word_where_a_typed_flag_expects_a_value(command, flag, capsys, tmp_path):
    assert_refused([*command.split(), *_valid_positionals(command), flag, "abc"], f"argument {flag}", capsys, tmp_path)


@pytest.mark.parametrize(("command", "flag"), _flags("choices"))
def test_405_a_value_outside_the_choices(command, flag, capsys, tmp_path):
    assert_refused([*command.split(), *_valid_positionals(command), flag, "nope"], f"argument {flag}", capsys, tmp_path)


POSITIONAL_COMMANDS = sorted(c for c, p in POSITIONALS.items() if p and c != "site init")  # its DIR may be new


@pytest.mark.parametrize("command", POSITIONAL_COMMANDS)
@pytest.mark.parametrize("path", ["missing.yaml", "folder", "binary.yaml"])
def test_406_to_408_a_positional_file_missing_a_directory_or_not_text(command, path, capsys, tmp_path):
    """The audit checker reads a non-text log as a torn line: a problem it reports (exit 1), not a crash."""
    code = 1 if command in CHECKERS and not (command == "audit verify" and path != "binary.yaml") else 2
    if command == "audit show" and path == "binary.yaml":
        got, out, err = run_cli([*command.split(), path], capsys)  # shows what it can and counts the problem
        assert got == 0 and "1 problems" in out and "Traceback" not in err
        return
    assert_refused([*command.split(), path, *REQUIRED_FLAGS.get(command, [])], path, capsys, tmp_path, code)


@pytest.mark.parametrize("path", ["binary.yaml", "file.txt"])
def test_408_site_init_into_a_file(path, capsys, tmp_path):
    assert_refused(["site", "init", path, *REQUIRED_FLAGS["site init"]], f"DIR: {tmp_path / path} is not a directory",
                   capsys, tmp_path)


@pytest.mark.parametrize("command", sorted(c for c, p in POSITIONALS.items()
                                            if p and not c.startswith("audit") and c not in ("export", "benchmark",
                                                                                             "site init")))
def test_409_an_empty_yaml_file(command, capsys, tmp_path):
    assert_refused([*command.split(), "empty.yaml"], "empty.yaml is empty", capsys, tmp_path,
                   1 if command in CHECKERS else 2)


def _commands_with(flag: str) -> list[str]:
    return sorted(c for c, p in COMMANDS.items() if any(flag in a.option_strings for a in p._actions))


@pytest.mark.parametrize("command", _commands_with("--output"))
def test_410_output_naming_an_existing_file(command, capsys, tmp_path):
    extra = {"compress": [*TINY, "--plan", "0->1"], "analyze": TINY, "export": ["folder", "--format", "pt2"],
             "benchmark": ["folder"]}.get(command, [])
    if command == "experiment":
        (tmp_path / "experiment.yaml").write_text(
            "model: {name: vit_tiny_patch16_224, kwargs: {depth: 2, img_size: 32, patch_size: 16}}\n"
            "datasets: [{name: s, train: {source: synthetic, num_images: 8}, test: {source: synthetic, num_images: 8}}]\n"
            "approximations: [\"0->1\"]\nseeds: [0]\ncalibration_images: 4\nprobe_train_images: 4\n"
            "probe_test_images: 4\n")
        extra = ["experiment.yaml"]
    assert_refused([*command.split(), *extra, "--output", "file.txt"], "output: ", capsys, tmp_path)


@pytest.mark.parametrize("command", ["compress", "analyze"])
@pytest.mark.parametrize("path", ["missing.yaml", "folder", "binary.yaml"])
def test_411_config_flag_missing_a_directory_or_not_text(command, path, capsys, tmp_path):
    assert_refused([command, "--config", path], f"config: {path}", capsys, tmp_path)


def test_412_against_a_log_that_does_not_exist(capsys, tmp_path):
    (tmp_path / "audit.jsonl").write_text("")
    assert_refused(["audit", "verify", "audit.jsonl", "--against", "missing.jsonl"], "missing.jsonl", capsys, tmp_path)


def test_413_compress_without_plan_or_budget_is_refused_before_the_model_is_built(capsys, tmp_path):
    err = assert_refused(["compress", *TINY], "plan: give a plan or a budget", capsys, tmp_path)
    assert "parameters" not in err and "images" not in err  # no model built (it logs its size), no image read


@pytest.mark.parametrize(("flags", "named"), [
    (["--plan", "garbage"], "plan: cannot read span 'garbage'"),                                       # 414
    (["--plan", "1->9"], "plan: span 1->9 needs"),                                                     # 414
    (["--plan", "0->1", "--identity-spans", "zz"], "identity_spans: cannot read span 'zz'"),           # 414
    (["--plan", "0->1", "--ridge", "nan"], "ridge: "),                                                 # 415
    (["--plan", "0->1", "--ridge", "-1"], "ridge: "),                                                  # 415
    (["--plan", "0->1", "--num-images", "-5"], "data.num_images: "),                                   # 416
    (["--plan", "0->1", "--batch-size", "0"], "data.batch_size: "),                                    # 416
    (["--plan", "0->1", "--sample-rate", "2"], "data.sample_rate: "),                                  # 417
    (["--plan", "0->1", "--holdout-fraction", "1.5"], "data.holdout_fraction: "),                      # 417
    (["--plan", "0->1", "--data-seed", "-1"], "data.seed: "),                                          # 418
    (["--plan", "0->1", "--model-seed", str(2**40)], "model.seed: "),                                  # 418
    (["--plan", "0->1", "--device", "tpu"], "device: "),                                               # 419
    (["--plan", "0->1", "--device", "cuda"], "device: cuda: torch sees no CUDA GPU"),                  # 419
    (["--budget-blocks", "-1"], "budget.blocks: "),                                                    # 420
    (["--budget-params", "0"], "budget.params: "),                                                     # 420
    (["--plan", "0->1", "--checkpoint", "missing.safetensors"], "model.checkpoint: missing.safetensors"),  # 421
    (["--plan", "0->1", "--checkpoint", "file.txt"], "model.checkpoint: "),                            # 421
    (["--plan", "0->1", "--data", "nowhere"], "data.path: nowhere"),                                   # 422
    (["--plan", "0->1", "--data", "file.txt"], "data.path: file.txt"),                                 # 422
    (["--plan", "0->1", "--data", "folder"], "data.path: "),                                           # 422
    (["--plan", "0->1", "--model-arg", "depth=-1"], "model.kwargs.depth: "),                           # 423
    (["--plan", "0->1", "--model-arg", "num_heads=7"], "model.kwargs: "),                              # 423
    (["--plan", "0->1", "--model", "no_such_vit"], "model.name: unknown timm model 'no_such_vit'"),    # 424
])
def test_414_to_424_compress_flags_with_values_of_the_wrong_meaning(flags, named, capsys, tmp_path):
    if flags[-1] == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    assert_refused(["compress", *TINY, *flags], named, capsys, tmp_path)
