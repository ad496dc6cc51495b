"""Bad-input campaign (issue #16), failing sites and the CLI's last line: what a site's failure lets reach the
server and the report, and what a user sees when a command fails.

A site that cannot serve a request answers with a failure reply (its name, a status and one data-free line);
the server writes every site's reason as one line (no traceback, colour code or path) and a round short of
``min_sites`` ends ``tba-fed simulate`` with one line naming the sites and their reasons. The CLI prints
every anticipated error as ``tba-fed: error: ...`` (exit 2 for bad input, 1 for a failed run), and an
unexpected one as a line naming the file that holds its traceback. Each case asserts the exit code or
error, no traceback where the user reads, the site or field named, and (tests/refusal.py) nothing outside
the tool's outputs changed. Numbering continues parts 1-3 (test_bad_inputs_config.py, _data.py, _network.py).

| #   | bad input                                                                | what the user gets                         |
|-----|--------------------------------------------------------------------------|--------------------------------------------|
| 301 | a simulated site's image folder holds a file that is not an image       | run completes; report: site-N, error,      |
|     | (min_sites below the number of sites)                                    | data.path and a fixed line, no path        |
| 302 | the same, min_sites = num_sites                                          | exit 1, one line: both sites, the reason   |
| 303 | a deployed site whose image folder vanished                              | failure reply naming hospital-a, data.path |
| 304 | a Flower error reply quoting Ray's traceback (colour codes, a chained    | one line: the site's text if written to    |
|     | cause with a patient's path), an exception of another kind, a multi-line | leave it, else the exception's class;      |
|     | error of Flower's own (a crashed ClientApp)                              | Flower's own reasons on one line           |
| 305 | a failure reply carrying arrays, an unknown status, a reason with line   | rejected (failure, failure.status); one    |
|     | breaks, colour codes and pipes                                           | table row, pipes escaped                   |
| 306 | an unexpected exception in a CLI command (a bug planted in one)          | exit 1, one line naming the traceback's    |
|     |                                                                          | file; -v prints the traceback              |
| 307 | Flower's log with a ServerApp's chained traceback and a Ray task's one   | frames left out, each exception's line     |
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Error, Message, RecordDict
from PIL import Image
from ray.exceptions import RayTaskError

from clients import client_app
from tba_fed.audit import check_chain
from tba_fed.errors import FederationError, TBAInputError
from tba_fed.federation.envelope import echo
from tba_fed.federation.flower_internals import ClientAppException
from tba_fed.federation.records import to_record
from tba_fed.federation.rounds import RoundLog, exchange
from tba_fed.federation.run_report import federation_markdown

from clientapp_grid import ClientAppGrid
from conftest import TINY
from refusal import unchanged
from test_bad_inputs_network import ScriptedGrid, _valid

MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
PATIENT = "patient-4711-smith.png"
WITHHELD = ("{field}: hospital-a could not serve this request ({kind}); the reason is in the site's own log "
            "(its operator reads it with tba-fed audit show)")
ANSI = re.compile(r"\x1b\[")


def _withheld(site: str, field: str = "data.path", kind: str = "TBAInputError") -> str:
    return WITHHELD.replace("hospital-a", site).format(field=field, kind=kind)


def _clean(text: str, *secrets: str) -> None:
    """No traceback, colour code or secret in `text`."""
    assert "Traceback" not in text and not ANSI.search(text), text[-3000:]
    for secret in secrets:
        assert secret not in text, secret


# ------------------------------------------------------------------------------------- 301-302 simulations

def _simulation(tmp_path: Path, min_sites: int) -> Path:
    """Two simulated sites over one image folder (two wards of 12 scans) that also holds a file that is not an
    image: whichever site it falls to fails when it reads it. Returns the run YAML."""
    for ward in ("ward-1", "ward-2"):
        (tmp_path / "images" / ward).mkdir(parents=True)
        for k in range(12):
            pixels = np.random.default_rng(k + 100 * len(ward)).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / ward / f"patient-{ward}-{k:02d}.png")
    (tmp_path / "images" / "ward-1" / PATIENT).write_bytes(b"not a PNG: the scanner cut the transfer")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": "vit_tiny_patch16_224", "kwargs": TINY}, "plan": "1->2",
        "data": {"source": "image_folder", "path": str(tmp_path / "images"), "holdout_fraction": 0.2, "batch_size": 8,
                 "seed": 3},
        "federation": {"num_sites": 2, "min_sites": min_sites, "round_timeout": 120, "min_images_per_site": 1},
        "output": str(tmp_path / "out")}))
    return path


def _simulate(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """`tba-fed simulate` as a user runs it, nothing but its outputs (out, out-sites, out.audit.jsonl) written."""
    with unchanged([tmp_path / "images", tmp_path / "run.yaml"]):
        return subprocess.run([sys.executable, "-m", "tba_fed.cli", *flags, "simulate", str(tmp_path / "run.yaml")],
                              capture_output=True, text=True, timeout=900)


def _failed_site(tmp_path: Path) -> str:
    """The simulated site that refused, by its own audit log, which holds the file's path (the detail stays there)."""
    failed = []
    for log in sorted((tmp_path / "out-sites").glob("site-*/audit.jsonl")):
        for entry in check_chain(log).entries:
            if entry["status"] != "ok":
                assert entry["error"].startswith(f"TBAInputError: data.path: {tmp_path / 'images' / 'ward-1' / PATIENT}")
                failed.append(entry["site"])
    assert len(failed) == 1, failed
    return failed[0]


@pytest.mark.slow  # tba-fed simulate: Flower's simulation engine
def test_301_a_simulated_sites_unreadable_image_is_reported_by_site_name_in_one_line(tmp_path):
    """On c272bf5 the report named the site node-<Flower id> and its reason was a Ray traceback of the site's
    exception with colour codes and the image's full path."""
    _simulation(tmp_path, min_sites=1)
    done = _simulate(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    [statistics] = [r for r in report["federation"]["rounds"] if r["name"] == "statistics"]
    [(name, failed)] = [(site, entry) for site, entry in statistics["sites"].items() if entry["status"] != "ok"]
    assert re.fullmatch(r"site-[01]", name) and failed["status"] == "error", (name, failed)
    assert failed["reason"] == _withheld(name)
    assert "Traceback" not in done.stdout + done.stderr  # nothing raised anywhere: none even in Flower's log
    assert _failed_site(tmp_path) == name
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"| {name} | error |" in markdown and _withheld(name) in markdown
    for text in (markdown, json.dumps(report)):
        _clean(text, PATIENT, "4711", "ward-1", str(tmp_path), "node-")
    table = [line for line in markdown.splitlines() if line.startswith("| statistics")]
    assert len(table) == 2 and all(line.count("|") == 8 for line in table)


@pytest.mark.slow  # tba-fed simulate: Flower's simulation engine
def test_302_a_round_short_of_min_sites_ends_with_one_line_naming_the_sites_and_reasons(tmp_path):
    """On c272bf5: "the federated run failed (flwr exit code 0): no new report in ...; see the log above", after
    Ray's and the ServerApp's tracebacks."""
    _simulation(tmp_path, min_sites=2)
    done = _simulate(tmp_path)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("tba-fed: error: the federated run failed: round statistics: 1 valid replies, min_sites "
                           "is 2. "), last
    name = _failed_site(tmp_path)
    other = {"site-0": "site-1", "site-1": "site-0"}[name]
    assert f"{name}: error ({_withheld(name)})" in last and f"{other}: ok" in last
    _clean(done.stderr, PATIENT, "4711", "flwr exit code", "see the log above")
    # Flower's own log, streamed on stdout: the ServerApp's exception is there as its line, without frames
    assert "Traceback (most recent call last)" not in done.stdout
    assert "(traceback left out; tba-fed -v shows it)" in done.stdout
    assert "tba_fed.errors.FederationError: round statistics: 1 valid replies" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing half-written


# ------------------------------------------------------------------------------------- 303-305 the server

def _site(tmp_path: Path) -> dict[str, str]:
    """A deployed site in the development profile whose folder holds four patients' scans; its node config."""
    scans = tmp_path / "images" / "ward-3"
    scans.mkdir(parents=True)
    for k in range(4):
        pixels = np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(scans / f"patient-47{k:02d}-jones.png")
    config = {"name": "hospital-a", "profile": "development", "output": str(tmp_path / "out"),
              "data": {"source": "image_folder", "path": str(tmp_path / "images"), "batch_size": 8,
                       "holdout_fraction": 0.0},
              "privacy": {"require_dp": False, "min_images": 2, "ledger": str(tmp_path / "ledger.json")}}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return {"site-config": str(path)}


def _statistics() -> RecordDict:
    return RecordDict({"config": ConfigRecord({"model": json.dumps(MODEL), "token-mode": "all", "plan": "1->2",
                                               "profile": "development", "privacy": ""})})


def test_303_a_deployed_site_whose_image_folder_vanished_answers_with_its_name_and_field(tmp_path, server_identity):
    """On c272bf5 the site's exception reached the server with the folder's path, and the site as node-100."""
    node = _site(tmp_path)
    with unchanged([tmp_path / "site.yaml"]):
        (tmp_path / "images" / "ward-3").rename(tmp_path / "moved")
        (tmp_path / "images").rmdir()
        grid = ClientAppGrid(client_app.app, node_configs=[node])
        log = RoundLog("statistics", {})
        with pytest.raises(FederationError) as err:
            exchange(grid, grid.get_node_ids(), "query.statistics", _statistics, lambda reply: reply, log, timeout=5,
                     min_sites=1)
    assert log.sites["hospital-a"]["status"] == "error" and grid.raised == {}
    assert log.sites["hospital-a"]["reason"] == _withheld("hospital-a")
    assert str(err.value) == f"round statistics: 0 valid replies, min_sites is 1. hospital-a: error ({_withheld('hospital-a')})"
    _clean(str(err.value), str(tmp_path), "images")
    [entry] = check_chain(tmp_path / "out" / "audit.jsonl").entries  # the detail stays at the site
    assert entry["error"] == f"TBAInputError: data.path: {tmp_path / 'images'} is not a directory (give a folder with " \
                             "one sub-folder of images per class, or a flat folder of images (unlabeled))"


def _ray_reason(err: Exception) -> str:
    """Flower's error reason for `err` raised in a ClientApp in a simulation: the Ray actor wraps it in a
    ClientAppException (flwr/simulation/ray_transport/ray_actor.py), Ray in a RayTaskError quoting the
    traceback with colour codes, and the simulation engine quotes that (flwr/server/superlink/fleet/vce/vce_api.py)."""
    try:
        try:
            raise err
        except Exception as ex:
            raise ClientAppException(str(ex)) from ex
    except ClientAppException as wrapped:
        raised = RayTaskError("ClientAppActor.run", traceback.format_exc(), wrapped, proctitle="ray::ClientAppActor.run",
                              pid=5131, ip="192.0.2.2", actor_repr="<ClientAppActor object>").as_instanceof_cause()
    return str(type(raised)) + ":<'" + str(raised) + "'>"


def _patient_error() -> OSError:
    try:
        raise OSError(f"/srv/scans/{PATIENT}: input/output error")
    except OSError as err:
        return err


def _chained_site_error() -> Exception:
    from tba_fed.federation.site_audit import SiteError

    try:
        raise _patient_error()
    except OSError as cause:
        try:
            raise TBAInputError("data.path", f"/srv/scans/{PATIENT} cannot be read") from cause
        except TBAInputError as err:
            return SiteError("hospital-a", err)  # what the secure round's site lets leave it


@pytest.mark.parametrize("code,reason,expected", [
    (2, lambda: _ray_reason(_chained_site_error()), "site error 2: " + _withheld("hospital-a")),
    (2, lambda: _ray_reason(_patient_error()),
     "site error 2: its ClientApp raised OSError, whose text is not shown here (it may quote the site's data); the "
     "site's own log has it"),
    (2, lambda: f"<class 'RuntimeError'>:<'CUDA out of memory after 17 images ({PATIENT})'>",
     "site error 2: its ClientApp raised RuntimeError, whose text is not shown here (it may quote the site's data); "
     "the site's own log has it"),
    (8, lambda: "Error: ClientApp crashed\n\x1b[31m- exit code 137.\x1b[0m\n| killed |",
     "site error 8: Error: ClientApp crashed - exit code 137. | killed |"),
])
def test_304_a_flower_error_reply_becomes_one_line_holding_only_what_may_leave_a_site(server_identity, code, reason,
                                                                                      expected):
    """On c272bf5 the reason was Flower's text as it came: Ray's traceback over many lines, its colour codes, the
    chained cause's file name."""
    text = reason()
    grid = ScriptedGrid(lambda node, msg: [Message(Error(code=code, reason=text), reply_to=msg)])
    log = RoundLog("statistics", {7: "hospital-a"})
    with pytest.raises(FederationError):
        exchange(grid, [7], "query.statistics", lambda: RecordDict({"config": ConfigRecord({})}), lambda r: r, log,
                 timeout=5, min_sites=1)
    assert log.sites["hospital-a"] == {"node_id": 7, "bytes_sent": 0, "status": "error", "reason": expected}
    _clean(expected, PATIENT, "4711", "17 images")


def _failure(node: int, msg: Message, **records) -> Message:
    """A failure reply as a site sends it (its name, the echo, the failure record), with `records` added or
    replacing its own."""
    content = {"meta": ConfigRecord({"site": f"site-{node}", **echo(msg)}),
               "failure": ConfigRecord({"status": "error", "reason": "data: cannot serve"}), **records}
    return Message(RecordDict(content), reply_to=msg)


@pytest.mark.parametrize("records,field", [
    ({"statistics": to_record(_valid("statistics"))}, "failure"),  # c272bf5 summed these arrays
    ({"failure": ConfigRecord({"status": "ok", "reason": "fine"})}, "failure.status"),
])
def test_305_a_failure_reply_that_carries_more_or_claims_another_status_is_rejected(server_identity, records, field):
    grid = ScriptedGrid(lambda node, msg: [_failure(node, msg, **records)])
    log = RoundLog("statistics", {})
    with pytest.raises(FederationError):
        exchange(grid, [1], "query.statistics", lambda: RecordDict({"config": ConfigRecord({})}), lambda r: r, log,
                 timeout=5, min_sites=1)
    assert log.sites["site-1"]["status"] == "rejected" and log.sites["site-1"]["reason"].startswith(f"{field}: ")


def test_305_a_failure_reason_with_line_breaks_colour_codes_and_pipes_is_one_table_row(server_identity):
    """On c272bf5 a reason's line breaks and pipes went into report.md as they were, breaking its table."""
    hostile = "data: line one\n\x1b[31mline two\x1b[0m | not a column |\r\n"
    grid = ScriptedGrid(lambda node, msg: [_failure(node, msg, failure=ConfigRecord({"status": "error",
                                                                                      "reason": hostile}))])
    log = RoundLog("statistics", {})
    with pytest.raises(FederationError):
        exchange(grid, [1], "query.statistics", lambda: RecordDict({"config": ConfigRecord({})}), lambda r: r, log,
                 timeout=5, min_sites=1)
    assert log.sites["site-1"]["reason"] == "data: line one line two | not a column |"
    markdown = federation_markdown({"sites_connected": 1, "maps_sha256": "0" * 64,
                                    "rounds": [{"name": "statistics", "seconds": 1.0, "sites": log.sites}]}, "development")
    [row] = [line for line in markdown.splitlines() if line.startswith("| statistics")]
    assert row.endswith("| data: line one line two \\| not a column \\| |") and row.count("|") - row.count("\\|") == 8


# ------------------------------------------------------------------------------------- 306-307 the CLI

BUG = """
import sys
import tba_fed.cli as cli

def run_privacy_report(site_config, html=None):  # stands in for a bug reached by some input nobody anticipated
    {}.get("site").get("name")

cli.run_privacy_report = run_privacy_report
raise SystemExit(cli.main())
"""


def test_306_an_unexpected_exception_is_one_line_naming_the_file_with_its_traceback(tmp_path):
    """A bug in a command (here planted in `privacy report`, since every input found to reach one is now refused
    cleanly: a ledger holding ``[]`` was one, on c272bf5) gives one line naming a crash file, not a traceback. The
    crash report goes to $TBA_FED_CACHE/crashes, the tool's own directory."""
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "h", "profile": "development", "data": {"source": "synthetic"},
                                    "output": str(tmp_path / "out"), "privacy": {"epsilon": 1.0}}))
    env = {**os.environ, "TBA_FED_CACHE": str(tmp_path / "cache")}
    runs = []
    with unchanged([site]):
        for flags in ((), ("-v",)):
            runs.append(subprocess.run([sys.executable, "-c", BUG, *flags, "privacy", "report", str(site)],
                                       capture_output=True, text=True, timeout=300, env=env))
    assert "Traceback" not in runs[0].stderr and runs[0].stderr.strip().count("\n") == 0, runs[0].stderr[-3000:]
    reports = sorted((tmp_path / "cache" / "crashes").iterdir())
    assert len(reports) == 2 and all(stat.S_IMODE(r.stat().st_mode) == 0o600 for r in reports)
    for done in runs:
        assert done.returncode == 1 and done.stdout == ""
        last = done.stderr.strip().splitlines()[-1]
        found = re.fullmatch(r"tba-fed: error: unexpected AttributeError: 'NoneType' object has no attribute 'get' "
                             r"\(a bug in tba-fed: the traceback is in (\S+); tba-fed -v prints it; please report it\)",
                             last)
        assert found and Path(found[1]) in reports, last
        written = Path(found[1]).read_text()
        assert written.startswith("tba-fed ") and f"command: tba-fed {'-v ' if '-v' in done.args else ''}privacy " \
                                                    f"report {site}\n" in written
        assert "Traceback (most recent call last):" in written and written.rstrip().endswith(
            "AttributeError: 'NoneType' object has no attribute 'get'")
    assert "Traceback (most recent call last):" in runs[1].stderr  # -v shows it as well


def test_307_tracebacks_in_flowers_log_are_cut_to_the_exceptions_lines():
    """`tba-fed simulate` and `submit` relay Flower's log through this unless -v: a failed ServerApp's chained
    traceback and a Ray task's quoted one leave only the lines that say what was raised."""
    from tba_fed.deploy.processes import without_tracebacks
    from tba_fed.federation.site_audit import SiteError

    try:
        try:
            raise _chained_site_error()
        except SiteError as err:
            raise FederationError("round statistics: 0 valid replies, min_sites is 1. hospital-a: error (...)") from err
    except FederationError as err:
        server = "\x1b[91mERROR \x1b[0m:     " + "".join(traceback.format_exception(err))
    ray = "\x1b[91mERROR \x1b[0m:     " + _ray_reason(_chained_site_error()).split(":<'", 1)[1][:-2] + "\n"
    log = ["INFO : round 1\n", *server.splitlines(keepends=True), "INFO : next\n", *ray.splitlines(keepends=True),
           "INFO : done\n"]
    kept = list(without_tracebacks(log))
    assert kept[0] == "INFO : round 1\n" and kept[-1] == "INFO : done\n" and "INFO : next\n" in kept
    assert not [line for line in kept if "File " in line or line.startswith(" ") or "Traceback" in line], kept
    assert kept.count("ERROR :     (traceback left out; tba-fed -v shows it)\n") == 2
    raised = [line.split(":", 1)[0] for line in kept if not line.startswith(("INFO", "ERROR"))]
    assert raised == ["tba_fed.federation.site_audit.SiteError", "tba_fed.errors.FederationError",  # the ServerApp's
                      "tba_fed.federation.site_audit.SiteError", "flwr.clientapp.client_app.ClientAppException",
                      "Exception ClientAppException occurred. Message"]  # Ray's, with the site's line twice
    assert all(_withheld("hospital-a") in line for line in kept if "SiteError" in line or "Message:" in line)
