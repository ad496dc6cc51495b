"""The site's gate and state (issue #12): what each release is checked against, what the ledger records,
where the split key lives and why a missing ledger stops a site, and the secure round's threshold.

Every test drives real sites (the ClientApp, or the site functions with their own YAML) on a tiny ViT."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, RecordDict

from clients.client_app import app
from tba_fed.cli import main
from tba_fed.errors import FederationError, TBAInputError
from tba_fed.federation.config import load_federated_config
from tba_fed.deploy.preflight import preflight
from tba_fed.federation.releases import secure_statistics_round
from tba_fed.federation.run_report import privacy_markdown
from tba_fed.federation.rounds import RoundLog
from tba_fed.federation.wire import encode_priors
from tba_fed.plan import parse_plan
from tba_fed.privacy.accounting import epsilon_spent, noise_multiplier
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.site_state import KEY_FILE, MARKER, initialise

import neighbours as nb
from clientapp_grid import ClientAppGrid
from test_adversarial_server import MODEL, _failure, _message, _refused, _request, _site

pytestmark = pytest.mark.usefixtures("server_identity")


def _yaml(tmp_path: Path, name: str = "hospital-a", **changes) -> Path:
    """A production site YAML (not initialised) over 40 ordinary images."""
    data = nb.write_source("image_folder", tmp_path / "images", nb.ordinary(40))
    config = {"name": name, "output": str(tmp_path / "out"), "model": MODEL, "data": {**data, "holdout_fraction": 0.5},
              "privacy": {"epsilon": 4.0, "min_images": 2, "releases": ["statistics"],
                          "ledger": str(tmp_path / "ledger.json")},
              "state": str(tmp_path / "state"), **changes}
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_site_init_makes_the_state_once_and_keeps_its_key_private(tmp_path):
    """The state `tba-fed site init` makes (tests/test_site_kit.py runs the command)."""
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    key = tmp_path / "state" / KEY_FILE
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and len(bytes.fromhex(key.read_text().strip())) == 32
    marker = json.loads((tmp_path / "state" / MARKER).read_text())
    assert marker["ledger"] == str(tmp_path / "ledger.json") and marker["site"] == "hospital-a"
    assert PrivacyLedger(tmp_path / "ledger.json").entries() == [] and (tmp_path / "ledger.json").is_file()
    before = key.read_bytes()
    with pytest.raises(TBAInputError, match="already holds this site's state"):  # a new key would change which
        initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")  # images every release uses
    assert key.read_bytes() == before


def test_an_uninitialised_production_site_serves_nothing_and_does_not_start(tmp_path, audit_bounds, capsys):
    path = _yaml(tmp_path, connection={"superlink": "127.0.0.1:9092", "root_certificates": str(tmp_path / "ca.crt"),
                                       "auth_key": str(tmp_path / "hospital-a.key")})
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(path)}])
    _refused(grid.answer([_message("statistics", _request(audit_bounds))])[0], "state")
    assert not (tmp_path / "ledger.json").exists()
    assert main(["supernode", str(path)]) == 2  # refused before flower-supernode is started
    assert "holds no initialised site state" in capsys.readouterr().err
    assert any(line.startswith("PROBLEM state: ") for line in (c.line() for c in preflight(path)))


@pytest.mark.parametrize("how", ["deleted", "moved", "re-pointed"])
def test_a_missing_or_repointed_ledger_stops_the_site_instead_of_resetting_its_budget(tmp_path, audit_bounds, capsys, how):
    """Before the state's marker, a missing ledger read as an empty one: the budget silently started again."""
    path = _yaml(tmp_path, privacy={"epsilon": 1.0, "min_images": 2, "releases": ["statistics"],
                                    "ledger": str(tmp_path / "ledger.json")})
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(path)}])
    assert not grid.answer([_message("statistics", _request(audit_bounds, releases=("statistics",)))])[0].has_error()
    assert len(PrivacyLedger(tmp_path / "ledger.json").entries()) == 1  # the budget of 1 is spent
    if how == "deleted":
        (tmp_path / "ledger.json").unlink()
    elif how == "moved":
        (tmp_path / "ledger.json").rename(tmp_path / "ledger.old.json")
    else:  # the YAML now names a fresh ledger
        config = yaml.safe_load(path.read_text())
        config["privacy"]["ledger"] = str(tmp_path / "fresh-ledger.json")
        path.write_text(yaml.safe_dump(config))
    capsys.readouterr()
    from tba_fed.federation.flower_internals import serverapp_identity

    with serverapp_identity(run_id=2):  # a new run
        reply = grid.answer([_message("statistics", _request(audit_bounds, releases=("statistics",)))])[0]
    _refused(reply, "privacy.ledger")
    assert not (tmp_path / "fresh-ledger.json").exists() and not (tmp_path / "ledger.json").exists() or how == "re-pointed"
    assert main(["privacy", "report", str(path)]) == 2
    assert ("re-pointed ledger would reset the privacy budget" if how == "re-pointed" else
            "refusing every release (a missing ledger would reset the privacy budget)") in capsys.readouterr().err


def test_each_release_is_checked_against_the_images_it_summarises(tmp_path, audit_bounds):
    """A site with many calibration images and few held out: the statistics (whose held-out sums summarise those
    few) and the accuracy release (held-out images only) are refused; similarity and probe are served. On
    c272bf5 every release was checked against the calibration count."""
    # about 10 of 200 held out by the site's secret key (random at site init): none held out has probability
    # 0.95**200 = 3.5e-5, 30 or more 9e-8 (the test needs 0 < held out < min_images < calibration)
    data = nb.write_source("image_folder", tmp_path / "images", nb.ordinary(200))
    config = {"name": "hospital-a", "output": str(tmp_path / "out"), "model": MODEL,
              "data": {**data, "holdout_fraction": 0.05},
              "privacy": {"epsilon": 40.0, "min_images": 30, "releases": list(nb.RELEASES),
                          "ledger": str(tmp_path / "ledger.json")},
              "state": str(tmp_path / "state")}
    (tmp_path / "site.yaml").write_text(yaml.safe_dump(config))
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")  # tba-fed site init
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(tmp_path / "site.yaml")}])
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    for kind in ("similarity", "probe"):
        assert not grid.answer([_message(kind, _request(audit_bounds))])[0].has_error(), kind
    for kind in ("statistics", "accuracy"):
        reply = grid.answer([_message(kind, _request(audit_bounds))])[0]
        _refused(reply, "privacy.min_images")
        assert "the held-out part of this release would summarise fewer images than the site's minimum per release " \
               "(30)" in _failure(reply)
        assert re.findall(r"\d+", _failure(reply)) == ["30"]  # the policy's minimum; never the count
    assert [e.release for e in ledger.entries()] == ["similarity", "probe"]
    assert 0 < len(load_site(tmp_path / "site.yaml")[1]) < 30  # the held-out part the site selected


def test_the_ledger_records_what_each_release_summarises_and_the_noise_this_site_applied(tmp_path, audit_bounds):
    sites = [_site(tmp_path, "hospital-a", 1, epsilon=40.0)]
    grid = ClientAppGrid(app, node_configs=sites)
    for kind in ("similarity", "statistics", "probe", "accuracy"):
        assert not grid.answer([_message(kind, _request(audit_bounds))])[0].has_error(), kind
    entries = {e.release: e for e in PrivacyLedger(tmp_path / "hospital-a" / "ledger.json").entries()}
    site = load_site(tmp_path / "hospital-a.yaml")
    calibration, held_out = (len(part) for part in site)
    assert calibration + held_out == 40 and held_out > 0
    assert {k: e.images for k, e in entries.items()} == {"similarity": calibration, "statistics": calibration + held_out,
                                                          "probe": calibration, "accuracy": held_out}
    sigma = noise_multiplier(1.0, 1e-5, 4)
    assert all(e.noise_multiplier == pytest.approx(sigma) and e.site_noise_multiplier == pytest.approx(sigma)
               and e.accountant == "rdp" and e.releases == nb.RELEASES for e in entries.values())


def load_site(path: Path):
    """The calibration and held-out parts a site selects (with its own key)."""
    from tba_fed import ModelConfig, create_model
    from tba_fed.data import build_dataset, calibration_split
    from tba_fed.federation.config import load_site_config
    from tba_fed.federation.site import site_key

    site = load_site_config(path)
    return calibration_split(build_dataset(site.data, create_model(ModelConfig.model_validate(MODEL))), site.data,
                             site_key(site))


def test_a_dropped_site_leaves_the_server_no_sum_over_fewer_sites_than_the_noise_is_split_across(tmp_path, audit_bounds):
    """Three sites split the noise (σ/√3 each); one fails at the masked-vector stage. With Flower's default
    reconstruction threshold (2 of 3) the two others' key shares let the server unmask their sum, which carries
    only 0.816 σ, before min_sites refuses it; with the threshold at noise_sites (3) no share is sent."""
    sites = [_site(tmp_path, f"hospital-{k}", k) for k in range(3)]
    broken = yaml.safe_load(Path(sites[2]["site-config"]).read_text())
    broken["data"]["path"] = str(tmp_path / "gone")  # this site fails when it reads its images
    Path(sites[2]["site-config"]).write_text(yaml.safe_dump(broken))
    grid = ClientAppGrid(app, node_configs=sites)
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": MODEL, "plan": nb.PLAN, "output": str(tmp_path / "server"),
                                   "profile": "production", "privacy": {"epsilon": 1.0, "aggregation": "secure"},
                                   "federation": {"num_sites": 3, "min_sites": 3, "round_timeout": 10,
                                                  "max_images_per_site": 64}}))
    config = load_federated_config(run)
    request = _request(audit_bounds, aggregation="secure", noise_sites=3)
    settings = {"model": json.dumps(MODEL), "token-mode": "all", "profile": "production", "plan": nb.PLAN,
                "privacy": request.to_json(), "prior-maps": encode_priors(nb.priors(48))}
    with pytest.raises(FederationError):
        secure_statistics_round(grid, grid.get_node_ids(), config, request, parse_plan(nb.PLAN, 6), 48,
                                RecordDict({"config": ConfigRecord(settings)}), RoundLog("statistics", {}))
    shares = [r for r in grid.received if r.has_content() and r.content.config_records.get("secaggplus_configs", {})
              .get("shares")]
    assert shares == []  # no site handed over a key share: no sum was unmasked


def test_reports_say_which_adjacency_the_epsilon_is_under():
    sigma = noise_multiplier(1.0, 1e-5, 1)
    replace_one = epsilon_spent([(sigma / 2, 1)], 1e-5)
    report = {"privacy": {"epsilon": 1.0, "delta": 1e-5, "accountant": "rdp", "releases": ["statistics"],
                          "noise_multiplier": sigma, "epsilon_replace_one": replace_one,
                          "aggregation": "local noise at each site", "sites_summed": 3, "noise": "secure", "spans": {}}}
    text = privacy_markdown(report)
    assert "under add/remove-one-image adjacency; under replace-one adjacency the same noise gives ε ≤ " \
           f"{replace_one:.3g}" in text
    # σ calibrated for ε = 1 (RDP) gives 2.13 by RDP (1.97 by PRV) when one image may be replaced by another
    assert replace_one == pytest.approx(2.129, abs=1e-3)
