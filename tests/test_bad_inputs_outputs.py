"""Bad-input campaign (issue #16, groups 1, 2 and 6): output directories, resumed experiment rows, and what must
be refused before the first forward pass (conventions: test_bad_inputs_config.py and tests/refusal.py).

Each kind is refused with a TBAInputError of the field named below (CLI: exit code 2, one line
``tba-fed: error: FIELD: ...``, no traceback), every file in the test's directory byte-identical afterwards
(foreign files above all), no temporary directory left; the two kinds marked "recovered" are interrupted runs
that tba-fed finishes correctly instead.

| #   | input                                                                              | refused as (field)       |
|-----|------------------------------------------------------------------------------------|--------------------------|
|     | **foreign files and ``--overwrite``**                                              |                          |
| 101 | compress: a foreign manifest.yaml (Kubernetes), patient_notes.csv, a sub-folder    | output                   |
| 102 | analyze: a foreign similarity.json beside patient notes                            | output                   |
| 103 | compress: tba-fed's earlier output plus a file a user put there                    | output (names the file)  |
| 104 | compress: tba-fed's earlier output plus a sub-folder                               | output                   |
| 105 | compress: tba-fed's earlier output whose report.md a user edited                   | output (changed since)   |
| 106 | compress: tba-fed's earlier output whose report.md is now a symlink                | output (not a file)      |
| 107 | analyze: tba-fed's compressed output (it holds a similarity.json too)              | output (other kind)      |
| 108 | compress: a foreign manifest.yaml beside a marker that is not JSON                 | output (not a marker)    |
| 109 | compress: a marker of a format version this tba-fed does not write                 | output (not a marker)    |
| 110 | compress: a marker listing a file outside the directory (``../patient_notes.csv``) | output (not a marker)    |
| 111 | a file dropped into the earlier output while the new one is computed               | output, at the end       |
| 112 | a site installs maps where its output/compressed holds the hospital's own files    | output                   |
| 113 | experiment -o: another study's summary.json and table.md                           | output                   |
| 114 | experiment -o: a non-empty folder of unrelated files (no name in common)           | output                   |
| 115 | experiment -o: tba-fed's compressed output                                         | output (other kind)      |
| 116 | experiment: its own earlier output whose table.md a user edited                    | output (changed since)   |
| 117 | experiment -o: an existing file                                                    | output                   |
| 118 | demo -o: a foreign demo-federated.yaml and a foreign federated/                    | output, before any run   |
| 119 | demo -o: a foreign table1/ (refused before the federated half runs)                | output, before any run   |
|     | **resumed rows (rows.jsonl)**                                                      |                          |
| 120 | a forged row without a key (the table would say 99.90 ± 0.00)                      | output (file, line)      |
| 121 | a line with other fields (was a KeyError)                                          | output (file, line)      |
| 122 | rows of another protocol setting (calibration_images)                              | output (file, line)      |
| 123 | rows of other model weights (model.seed)                                           | output (file, line)      |
| 124 | rows of another data selection (the training set's seed and size)                  | output (file, line)      |
| 125 | a line that is not JSON, in the middle of the file                                 | output (file, line)      |
| 126 | a JSON line that is not an object                                                  | output (file, line)      |
| 127 | a deeply nested JSON line (was a RecursionError)                                   | output (file, line)      |
| 150 | a JSON line giving a key twice (the last would win)                                | output (file, line)      |
| 128 | a row of this configuration with accuracy 1.5                                      | output (line, accuracy)  |
| 129 | a row of this configuration with accuracy as a string                              | output (line, accuracy)  |
| 130 | a row of this configuration with a field run_seed never writes                     | output (line, field)     |
| 131 | a row of this configuration with accuracy NaN                                      | output (line, accuracy)  |
| 132 | rows.jsonl that is not UTF-8                                                       | output (file, line)      |
| 133 | rows.jsonl that is a directory                                                     | output                   |
| 134 | a seed with only some of its rows (was skipped: the table lacked its variants)     | recovered: seed redone   |
| 135 | a torn last line (a run killed while appending; new rows were glued to it)         | recovered: line cut off  |
| 136 | two datasets with the same name (their rows would be mixed)                        | datasets                 |
|     | **refused before the first forward pass, not after it**                            |                          |
| 137 | compress -o in a read-only directory                                               | output, before the data  |
| 138 | analyze -o under a file                                                            | output, before the data  |
| 139 | compress --overwrite of an earlier output that is itself read-only                 | output, before the data  |
| 140 | experiment -o in a read-only directory                                             | output, before the model |
| 141 | experiment -o under a file                                                         | output, before the model |
| 142 | simulate with its output under a file                                              | output, no process       |
| 143 | a federated server with its output in a read-only directory                        | output, no site asked    |
| 144 | compress --device cuda / cuda:0 / mps on a machine without that GPU                | device, before the data  |
| 145 | experiment with device: cuda on a machine without a GPU                            | device, before the model |
| 146 | simulate with device: cuda on a machine without a GPU                              | device, no process       |
| 147 | a device string torch cannot read (``cuda:x``)                                     | device, at load          |
| 148 | demo -o an existing file                                                           | output, before any run   |
| 149 | simulate where a simulated site's compressed/ folder holds a hospital's own files  | output, no process       |

Read-only directories: mode 0o555, and for root (which ignores permission bits) the test thread's effective
CAP_DAC_OVERRIDE is dropped meanwhile, so the same cases run as root and as a user.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tba_fed import LinearMap, ModelConfig, Span, create_model
from tba_fed.checkpoint import write_compressed
from tba_fed.cli import main
from tba_fed.experiment import load_experiment_config, run_experiment
from tba_fed.federation.config import load_federated_config
from tba_fed.federation.server import run_server
from tba_fed.deploy.simulate import simulate
from tba_fed.federation.site import install
from tba_fed.fileio import file_sha256

from conftest import TINY
from refusal import refused, run_cli, snapshot, unchanged

MARKER = "tba-fed-output.json"  # what tba-fed writes in every output directory it owns
MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
TINY_FLAGS = ["--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")]]
QUICK = [*TINY_FLAGS, "--num-images", "8", "--batch-size", "4"]
KUBERNETES = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: pacs-viewer\nspec:\n  replicas: 2\n"
NOTES = "patient_id,note\n4711,follow-up in 3 months\n"
EXPERIMENT = {"model": MODEL, "datasets": [{"name": "synth", "train": {"source": "synthetic", "num_images": 60},
                                            "test": {"source": "synthetic", "num_images": 20, "seed": 1}}],
              "approximations": ["0->1"], "seeds": [0], "calibration_images": 20, "probe_train_images": 30,
              "probe_test_images": 20, "batch_size": 20}


# ------------------------------------------------------------------------------------------------ helpers

def _refused_cli(argv: list[str], capsys, field: str, untouched, *, alone: bool = True) -> str:
    """Exit code 2, no traceback, and the error as one line naming `field` (`alone`: the only line on stderr,
    i.e. refused before anything was logged about the model or the data). Returns that line."""
    code, _, err = run_cli(argv, capsys, untouched)
    lines = err.splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert [line for line in lines if line.startswith("tba-fed: error:")] == [lines[-1]], err
    assert lines[-1].startswith(f"tba-fed: error: {field}: "), err
    if alone:
        assert len(lines) == 1, err
    return lines[-1]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _foreign(folder: Path, *names: str) -> Path:
    """A folder of someone else's: the named files (manifest.yaml a Kubernetes one), patient notes, a sub-folder."""
    for name in names:
        _write(folder / name, KUBERNETES if name == "manifest.yaml" else f"{name}: another study's, keep it\n")
    _write(folder / "patient_notes.csv", NOTES)
    _write(folder / "scans" / "index.txt", "scan-042\n")
    return folder


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.rglob(".*tmp-*")] + [p.name for p in folder.rglob(".*old-*")]


_CAP_DAC_OVERRIDE = 1


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _capabilities(change: int | None = None) -> int:
    """This thread's effective capabilities (low word); set to `change` first if given."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0, ctypes.get_errno()
    if change is not None:
        data[0].effective = change
        assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()
    return data[0].effective


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Nothing can be created in or removed from `folder` by this test, even as root (see the docstring)."""
    folder.chmod(0o555)
    saved = _capabilities() if os.geteuid() == 0 else None
    if saved is not None:
        _capabilities(saved & ~(1 << _CAP_DAC_OVERRIDE))
    try:
        with pytest.raises(PermissionError):
            (folder / ".probe").touch()
        yield
    finally:
        if saved is not None:
            _capabilities(saved)
        folder.chmod(0o755)


def _no_gpu(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an Apple GPU")


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    """A compress output of a budget run (it holds similarity.json too)."""
    out = tmp_path_factory.mktemp("compressed") / "out"
    assert main(["compress", *QUICK, "--budget-blocks", "1", "-o", str(out)]) == 0
    return out


@pytest.fixture()
def earlier(compressed, tmp_path) -> Path:
    """A copy of that output in this test's directory."""
    return Path(shutil.copytree(compressed, tmp_path / "out"))


def _experiment_yaml(folder: Path, **changes) -> Path:
    path = folder / "experiment.yaml"
    path.write_text(yaml.safe_dump({**EXPERIMENT, **changes, "output": str(folder / "exp")}))
    return path


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """A finished experiment: one seed, rows original, 0->1 linear, 0->1 identity."""
    folder = tmp_path_factory.mktemp("experiment")
    return run_experiment(load_experiment_config(_experiment_yaml(folder)))


@pytest.fixture()
def resumed(experiment, tmp_path) -> tuple[Path, Path]:
    """A copy of the finished experiment in this test's directory and the config that wrote it."""
    shutil.copytree(experiment, tmp_path / "exp")
    return _experiment_yaml(tmp_path), tmp_path / "exp" / "rows.jsonl"


# ------------------------------------------------------------------------------------------------ group 1

def test_101_compress_overwrite_refuses_a_foreign_manifest(tmp_path, capsys):
    out = _foreign(tmp_path / "deploy", "manifest.yaml")
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(out), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert line == (f"tba-fed: error: output: {out} is not empty and holds no {MARKER}, so it is not a tba-fed output; "
                    "refusing to touch it (choose an empty or new output path)")


def test_102_analyze_overwrite_refuses_a_foreign_similarity_json(tmp_path, capsys):
    out = _foreign(tmp_path / "study", "similarity.json")
    line = _refused_cli(["analyze", *QUICK, "-o", str(out), "--overwrite"], capsys, "output", [tmp_path])
    assert f"holds no {MARKER}, so it is not a tba-fed output" in line


def test_103_a_file_added_to_an_earlier_output_is_never_deleted(earlier, tmp_path, capsys):
    _write(earlier / "patient_notes.csv", NOTES)
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(earlier), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert line == (f"tba-fed: error: output: {earlier} holds patient_notes.csv, which tba-fed did not write there; "
                    "refusing to touch it (move them out, or choose another output path)")


def test_104_a_sub_folder_added_to_an_earlier_output(earlier, tmp_path, capsys):
    _write(earlier / "review" / "comments.txt", "looks fine\n")
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(earlier), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert "holds review, which tba-fed did not write there" in line


def test_105_an_edited_report_is_not_replaced(earlier, tmp_path, capsys):
    _write(earlier / "report.md", "# our review of the compression\n")
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(earlier), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert line == (f"tba-fed: error: output: {earlier / 'report.md'} was changed since tba-fed wrote it (its sha256 "
                    f"differs from the one in {MARKER}); refusing to replace it (move it out to keep it, or choose "
                    "another output path)")


def test_106_a_listed_name_that_is_now_a_symlink(earlier, tmp_path, capsys):
    target = _write(tmp_path / "patient_notes.csv", NOTES)
    (earlier / "report.md").unlink()
    (earlier / "report.md").symlink_to(target)
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(earlier), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert f"{earlier / 'report.md'} is not a regular file, so tba-fed did not write it" in line
    assert (earlier / "report.md").is_symlink()


def test_107_analyze_does_not_replace_a_compressed_model(earlier, tmp_path, capsys):
    assert (earlier / "similarity.json").is_file() and (earlier / "maps.safetensors").is_file()
    line = _refused_cli(["analyze", *QUICK, "-o", str(earlier), "--overwrite"], capsys, "output", [tmp_path])
    assert line == (f"tba-fed: error: output: {earlier} holds a compressed model written by tba-fed, not a similarity "
                    "analysis; refusing to touch it (choose another output path, or move that output away first)")


@pytest.mark.parametrize("marker,why", [
    ("{'format': 'tba-fed/compressed/1'", "JSONDecodeError"),                                                # 108
    (json.dumps({"format": "tba-fed/compressed/2", "files": {}}),                                          # 109
     "format 'tba-fed/compressed/2'; this tba-fed writes 'tba-fed/compressed/1'"),
    (json.dumps({"format": "tba-fed/compressed/1", "files": {"../patient_notes.csv": "0" * 64,             # 110
                                                             "manifest.yaml": None}}),
     "files must map the names of the files in the directory to their sha256"),
], ids=["108-not-json", "109-future-version", "110-names-outside"])
def test_108_109_110_markers_tba_fed_did_not_write(tmp_path, capsys, marker, why):
    _write(tmp_path / "patient_notes.csv", NOTES)
    out = _foreign(tmp_path / "deploy", "manifest.yaml")
    _write(out / MARKER, marker)
    line = _refused_cli(["compress", *QUICK, "--plan", "1->2", "-o", str(out), "--overwrite"], capsys, "output",
                        [tmp_path])
    assert line.startswith(f"tba-fed: error: output: {out / MARKER} is not a tba-fed marker (") and why in line
    assert line.endswith(f"; refusing to touch {out} (choose an empty or new output path)")


def _maps() -> dict:
    return {Span(1, 2): LinearMap(torch.eye(48, dtype=torch.float64), torch.zeros(48, dtype=torch.float64))}


def test_111_a_file_dropped_into_the_earlier_output_during_the_work(tmp_path):
    out = write_compressed(tmp_path / "out", _maps(), {"plan": "1->2"})
    before = snapshot(out)

    def meanwhile(folder: Path) -> None:  # called while the new output is being written, after the first check
        _write(out / "patient_notes.csv", NOTES)

    with refused("output", untouched=[]) as err:
        write_compressed(out, _maps(), {"plan": "1->2", "ridge": 1e-3}, overwrite=True, extra=meanwhile)
    assert str(err.value).startswith(f"output: {out} holds patient_notes.csv, which tba-fed did not write there")
    assert snapshot(out) == {**before, "patient_notes.csv": NOTES.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the new output discarded, nothing half-written


def test_112_a_site_never_replaces_its_hospitals_own_files(tmp_path):
    site = SimpleNamespace(name="hospital-a", profile="development", output=tmp_path / "site")
    _foreign(site.output / "compressed", "manifest.yaml")
    model = create_model(ModelConfig.model_validate(MODEL))
    with refused("output", untouched=[tmp_path]) as err:
        install(model, site, _maps(), {"model": MODEL, "plan": "1->2"})
    assert f"{site.output / 'compressed'} is not empty and holds no {MARKER}" in str(err.value)


def test_113_experiment_refuses_another_studys_results(tmp_path, capsys):
    study = _foreign(tmp_path / "study", "summary.json", "table.md")
    line = _refused_cli(["experiment", str(_experiment_yaml(tmp_path)), "-o", str(study)], capsys, "output",
                        [tmp_path])
    assert f"{study} is not empty and holds no {MARKER}" in line


def test_114_experiment_refuses_a_folder_of_unrelated_files(tmp_path, capsys):
    folder = tmp_path / "papers"
    _write(folder / "draft.tex", "\\section{Results}\n")
    _refused_cli(["experiment", str(_experiment_yaml(tmp_path)), "-o", str(folder)], capsys, "output", [tmp_path])


def test_115_experiment_refuses_a_compressed_model(earlier, tmp_path, capsys):
    line = _refused_cli(["experiment", str(_experiment_yaml(tmp_path)), "-o", str(earlier)], capsys, "output",
                        [tmp_path])
    assert f"{earlier} holds a compressed model written by tba-fed, not an experiment" in line


def test_116_experiment_keeps_a_table_a_user_edited(resumed, tmp_path, capsys):
    config, rows = resumed
    _write(rows.parent / "table.md", "| our own table |\n")
    line = _refused_cli(["experiment", str(config)], capsys, "output", [tmp_path])
    assert f"{rows.parent / 'table.md'} was changed since tba-fed wrote it" in line


def test_117_experiment_output_is_a_file(tmp_path, capsys):
    out = _write(tmp_path / "results", "a file")
    line = _refused_cli(["experiment", str(_experiment_yaml(tmp_path)), "-o", str(out)], capsys, "output", [tmp_path])
    assert line == f"tba-fed: error: output: {out} exists and is not a directory (choose another output path)"


def test_118_demo_refuses_foreign_files_before_writing_anything(tmp_path, capsys, no_process):
    demo = _write(tmp_path / "demo" / "demo-federated.yaml", "# our own federation settings\n").parent
    _foreign(demo / "federated")
    line = _refused_cli(["demo", "-o", str(demo)], capsys, "output", [tmp_path])
    assert f"{demo / 'federated'} is not empty and holds no {MARKER}" in line


def test_119_demo_refuses_a_foreign_table_before_the_federated_run(tmp_path, capsys, monkeypatch):
    import tba_fed.deploy.simulate as simulation

    def started(*args, **kwargs):
        raise AssertionError("the demo started its federated run")

    monkeypatch.setattr(simulation, "simulate", started)
    _foreign(tmp_path / "demo" / "table1", "table.md")
    line = _refused_cli(["demo", "-o", str(tmp_path / "demo")], capsys, "output", [tmp_path])
    assert f"{tmp_path / 'demo' / 'table1'} is not empty and holds no {MARKER}" in line


# ------------------------------------------------------------------------------------------------ group 2

def _lines(rows: Path) -> list[dict]:
    return [json.loads(line) for line in rows.read_text().splitlines()]


def _replace_rows(rows: Path, lines: list[str | bytes]) -> None:
    rows.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))


def _rows_refused(config: Path, rows: Path, capsys, tmp_path, line_number: int, message: str) -> str:
    line = _refused_cli(["experiment", str(config)], capsys, "output", [tmp_path], alone=False)
    assert line.startswith(f"tba-fed: error: output: {rows} line {line_number}"), line
    assert message in line, line
    return line


def test_120_a_forged_row_without_a_key(resumed, tmp_path, capsys):
    config, rows = resumed
    forged = {"dataset": "synth", "seed": 0, "approximation": "original", "kind": "original", "accuracy": 0.999,
              "calibration_images": 20, "probe_train_images": 30, "probe_test_images": 20, "params_removed": 0,
              "paper_params_removed": 0, "params": 1}
    _replace_rows(rows, [json.dumps(forged)])
    _rows_refused(config, rows, capsys, tmp_path, 1, "line 1: key: Field required (remove that line to redo its seed, "
                                                     "or give the run another output directory)")


def test_121_a_line_with_other_fields(resumed, tmp_path, capsys):
    config, rows = resumed
    _replace_rows(rows, [json.dumps(r) for r in _lines(rows)] + [json.dumps({"dataset": "synth", "seed": 0})])
    _rows_refused(config, rows, capsys, tmp_path, 4, "line 4: key: Field required")


@pytest.mark.parametrize("changes", [
    {"calibration_images": 25},                                                                               # 122
    {"model": {**MODEL, "seed": 1}},                                                                          # 123
    {"datasets": [{**EXPERIMENT["datasets"][0], "train": {"source": "synthetic", "num_images": 70, "seed": 3}}]},  # 124
], ids=["122-protocol", "123-weights", "124-data-selection"])
def test_122_123_124_rows_of_another_configuration(resumed, tmp_path, capsys, changes):
    _, rows = resumed
    config = _experiment_yaml(tmp_path, **changes)
    line = _rows_refused(config, rows, capsys, tmp_path, 1, "holds a row of another configuration (dataset 'synth': "
                                                            "other model weights, data selection or protocol settings)")
    assert line.endswith("(give this configuration another output directory, or rerun the one that wrote it)")


@pytest.mark.parametrize("bad,message", [
    (b'{"dataset": "synth", "seed": 0, "accuracy": 0.9', "line 2 is not a JSON row (JSONDecodeError: "),  # 125
    (b'["synth", 0, "original", 0.999]', "line 2 is not a row (a JSON object)"),                        # 126
    (b"[" * 100_000 + b"]" * 100_000, "line 2 is not a JSON row (RecursionError: "),                    # 127
    (b'{"dataset": "synth", "dataset": "other", "seed": 0}',                                            # 150
     "line 2 is not a JSON row (ValueError: key 'dataset' given twice)"),
], ids=["125-not-json", "126-not-an-object", "127-deeply-nested", "150-a-key-twice"])
def test_125_126_127_lines_that_are_not_rows(resumed, tmp_path, capsys, bad, message):
    config, rows = resumed
    first, *others = rows.read_bytes().splitlines()
    _replace_rows(rows, [first, bad, *others])
    _rows_refused(config, rows, capsys, tmp_path, 2, message)


@pytest.mark.parametrize("change,message", [
    ({"accuracy": 1.5}, "line 1: accuracy: Input should be less than or equal to 1"),                   # 128
    ({"accuracy": "0.9"}, "line 1: accuracy: Input should be a valid number"),                          # 129
    ({"approved_by": "dr. x"}, "line 1: approved_by: Extra inputs are not permitted"),                  # 130
    ({"accuracy": float("nan")}, "line 1: accuracy: Input should be a finite number"),                  # 131
], ids=["128-out-of-range", "129-string", "130-extra-field", "131-nan"])
def test_128_to_131_malformed_rows_with_this_configurations_key(resumed, tmp_path, capsys, change, message):
    config, rows = resumed
    first, *others = _lines(rows)
    _replace_rows(rows, [json.dumps({**first, **change})] + [json.dumps(r) for r in others])
    _rows_refused(config, rows, capsys, tmp_path, 1, message)


def test_132_rows_that_are_not_utf8(resumed, tmp_path, capsys):
    config, rows = resumed
    _replace_rows(rows, [bytes(range(128, 256))])
    _rows_refused(config, rows, capsys, tmp_path, 1, "line 1 is not a JSON row (UnicodeDecodeError: ")


def test_133_rows_jsonl_is_a_directory(resumed, tmp_path, capsys):
    config, rows = resumed
    rows.unlink()
    _write(rows / "part-0.jsonl", "{}\n")
    line = _refused_cli(["experiment", str(config)], capsys, "output", [tmp_path])
    assert f"{rows} is not a regular file, so tba-fed did not write it" in line


def _table_cells(folder: Path) -> list[tuple]:
    return sorted((s["approximation"], s["kind"], s["seeds"]) for s in json.loads((folder / "summary.json").read_text()))


COMPLETE = [("0->1", "identity", 1), ("0->1", "linear", 1), ("original", "original", 1)]


def test_134_a_seed_with_only_some_rows_is_redone(resumed):
    config, rows = resumed
    _replace_rows(rows, [json.dumps(_lines(rows)[0])])  # only the original's row: the others were never written
    run_experiment(load_experiment_config(config))
    assert _table_cells(rows.parent) == COMPLETE
    assert len(_lines(rows)) == 1 + 3 and "| 0->1 | linear |" in (rows.parent / "table.md").read_text()


def test_135_a_torn_last_line_is_cut_off_and_its_seed_redone(resumed, caplog):
    config, rows = resumed
    data = rows.read_bytes()
    rows.write_bytes(data[: len(data) - 40])  # the last row half-written, without its newline
    caplog.set_level("WARNING", logger="tba_fed.experiment")
    run_experiment(load_experiment_config(config))
    assert len(_lines(rows)) == 2 + 3  # every line a row: none glued to the torn one
    assert _table_cells(rows.parent) == COMPLETE
    assert f"{rows} line 3: incomplete (a run interrupted while writing it): cut off, its seed is redone" in caplog.text


def test_136_two_datasets_with_the_same_name(tmp_path, capsys):
    twice = [EXPERIMENT["datasets"][0],
             {**EXPERIMENT["datasets"][0], "train": {"source": "synthetic", "num_images": 60, "seed": 5}}]
    line = _refused_cli(["experiment", str(_experiment_yaml(tmp_path, datasets=twice))], capsys, "datasets", [tmp_path])
    assert line == ("tba-fed: error: datasets: the name 'synth' is given to two datasets: their rows and columns would "
                    "be mixed (give each dataset its own name)")


# ------------------------------------------------------------------------------------------------ group 6

MISSING_DATA = "no-such-images"  # refused as data.path if the command got as far as reading the data


def test_137_compress_in_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        line = _refused_cli(["compress", *QUICK, "--data", str(tmp_path / MISSING_DATA), "--plan", "1->2", "-o",
                             str(locked / "out")], capsys, "output", [tmp_path])
    assert line == (f"tba-fed: error: output: {locked} is not writable (Permission denied: {locked}) (give a directory "
                    "this user can create files in)")


def test_138_analyze_under_a_file(tmp_path, capsys):
    blocker = _write(tmp_path / "results", "a file")
    line = _refused_cli(["analyze", *QUICK, "--data", str(tmp_path / MISSING_DATA), "-o", str(blocker / "sim")],
                        capsys, "output", [tmp_path])
    assert line == (f"tba-fed: error: output: {blocker} is not writable (Not a directory: {blocker}) (give a directory "
                    "this user can create files in)")


def test_139_overwrite_of_an_earlier_output_that_is_read_only(earlier, tmp_path, capsys):
    with read_only(earlier):
        line = _refused_cli(["compress", *QUICK, "--data", str(tmp_path / MISSING_DATA), "--plan", "1->2", "-o",
                             str(earlier), "--overwrite"], capsys, "output", [tmp_path])
    assert line.startswith(f"tba-fed: error: output: {earlier} is not writable (Permission denied: {earlier})")


def test_140_experiment_in_a_read_only_directory(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    config = _experiment_yaml(tmp_path, model={"name": "vit_nonexistent"})  # refused as model.name if it got there
    with read_only(locked):
        line = _refused_cli(["experiment", str(config), "-o", str(locked / "exp")], capsys, "output", [tmp_path])
    assert line.startswith(f"tba-fed: error: output: {locked / 'exp'} is not writable (Permission denied: {locked})")


def test_141_experiment_under_a_file(tmp_path, capsys):
    blocker = _write(tmp_path / "results", "a file")
    config = _experiment_yaml(tmp_path, model={"name": "vit_nonexistent"})
    line = _refused_cli(["experiment", str(config), "-o", str(blocker / "exp")], capsys, "output", [tmp_path])
    assert line.startswith(f"tba-fed: error: output: {blocker / 'exp'} is not writable (Not a directory: {blocker})")


@pytest.fixture()
def no_process(monkeypatch):
    """A simulation that gets as far as starting Flower fails the test at once."""
    import tba_fed.deploy.simulate as simulation

    def started(*args, **kwargs):
        raise AssertionError("a Flower process was started")

    monkeypatch.setattr(simulation, "local_superlink", started)


def _run_yaml(tmp_path: Path, **settings) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL, "plan": "1->2", "data": {"source": "synthetic", "num_images": 16},
                                    "federation": {"num_sites": 2, "round_timeout": 60}, **settings}))
    return path


def test_142_simulate_with_its_output_under_a_file(tmp_path, no_process):
    blocker = _write(tmp_path / "results", "a file")
    config = _run_yaml(tmp_path, output=str(blocker / "server"))
    with refused("output", fix="give a directory this user can create files in", untouched=[tmp_path]):
        simulate(config)


class NoSitesGrid:
    """A grid the server must never reach: every call fails the test."""

    def get_node_ids(self):
        raise AssertionError("the server used the grid before refusing its output")

    send_and_receive = get_node_ids
    run = property(get_node_ids)


def test_143_server_output_in_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    config = load_federated_config(_run_yaml(tmp_path, output=str(locked / "server")))
    with read_only(locked), refused("output", untouched=[tmp_path]) as err:
        run_server(NoSitesGrid(), config)
    assert str(err.value).startswith(f"output: {locked} is not writable (Permission denied: {locked})")


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_144_compress_on_a_gpu_this_machine_lacks(tmp_path, capsys, device):
    _no_gpu(device)
    line = _refused_cli(["compress", *QUICK, "--data", str(tmp_path / MISSING_DATA), "--plan", "1->2", "--device", device,
                         "-o", str(tmp_path / "out")], capsys, "device", [tmp_path])
    assert line.endswith("(use --device cpu (device: cpu), or auto for the GPU when there is one)")
    assert line.startswith(f"tba-fed: error: device: {device}: torch sees no ")


def test_145_experiment_on_a_gpu_this_machine_lacks(tmp_path, capsys):
    _no_gpu("cuda")
    config = _experiment_yaml(tmp_path, device="cuda", model={"name": "vit_nonexistent"})
    line = _refused_cli(["experiment", str(config)], capsys, "device", [tmp_path])
    assert line.startswith("tba-fed: error: device: cuda: torch sees no CUDA GPU on this machine")


def test_146_simulate_on_a_gpu_this_machine_lacks(tmp_path, no_process):
    _no_gpu("cuda")
    config = _run_yaml(tmp_path, device="cuda", output=str(tmp_path / "server"))
    with refused("device", untouched=[tmp_path]) as err:
        simulate(config)
    assert str(err.value).startswith("device: cuda: torch sees no CUDA GPU on this machine")


def test_147_a_device_torch_cannot_read(tmp_path, capsys):
    line = _refused_cli(["compress", *QUICK, "--data", str(tmp_path / MISSING_DATA), "--plan", "1->2", "--device",
                         "cuda:x", "-o", str(tmp_path / "out")], capsys, "device", [tmp_path])
    assert line == "tba-fed: error: device: Value error, unknown device 'cuda:x': use cpu, cuda, cuda:N or auto"


def test_148_demo_output_is_a_file(tmp_path, capsys, no_process):
    out = _write(tmp_path / "demo", "a file")
    line = _refused_cli(["demo", "-o", str(out)], capsys, "output", [tmp_path])
    assert line.startswith(f"tba-fed: error: output: {out} is not writable (Not a directory: {out})")


def test_149_simulate_never_installs_over_a_sites_own_files(tmp_path, no_process):
    _foreign(tmp_path / "server-sites" / "site-1" / "compressed", "manifest.yaml")
    config = _run_yaml(tmp_path, output=str(tmp_path / "server"))
    with refused("output", fix="choose an empty or new output path", untouched=[tmp_path]) as err:
        simulate(config)
    assert str(err.value).startswith(f"output: {tmp_path / 'server-sites' / 'site-1' / 'compressed'} is not empty and "
                                     f"holds no {MARKER}")


# ------------------------------------------------------------------------------------------------ accepted

def test_overwrite_replaces_only_tba_feds_own_earlier_output(earlier, tmp_path, capsys):
    """The case --overwrite is for: the earlier output replaced whole, nothing left beside it, and the new marker
    lists every file with its sha256."""
    _write(tmp_path / "patient_notes.csv", NOTES)  # beside the output, not in it: untouched
    with unchanged([tmp_path / "patient_notes.csv"]):
        assert main(["compress", *QUICK, "--plan", "2->3", "-o", str(earlier), "--overwrite"]) == 0
    marker = json.loads((earlier / MARKER).read_text())
    assert marker["format"] == "tba-fed/compressed/1"
    assert marker["files"] == {p.name: file_sha256(p) for p in earlier.iterdir() if p.name != MARKER}
    assert sorted(marker["files"]) == ["manifest.yaml", "maps.safetensors", "report.html", "report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "patient_notes.csv"]
    _no_temporaries(tmp_path)


def test_an_experiment_resumes_in_its_own_directory_and_rows_carry_their_key(resumed, caplog):
    config, rows = resumed
    before = rows.read_bytes()
    caplog.set_level("INFO", logger="tba_fed.experiment")
    run_experiment(load_experiment_config(config))
    assert "synth seed 0: already done, skipped" in caplog.text and rows.read_bytes() == before
    assert len({row["key"] for row in _lines(rows)}) == 1
    assert json.loads((rows.parent / MARKER).read_text())["files"]["rows.jsonl"] is None
