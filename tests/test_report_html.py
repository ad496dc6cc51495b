"""report.html of a run (compress, a federated server) and of a site: the numbers of report.json and of the
ledger in the page, plots embedded, nothing fetched from anywhere; then the same pages in real headless Chromium
(slow): no console error, no request but the page itself and its data: images, the numbers in the rendered DOM,
a screenshot written."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tba_fed.audit import AuditLog, check_chain
from tba_fed.cli import main
from tba_fed.federation.config import load_federated_config
from tba_fed.federation.flower_internals import serverapp_identity
from tba_fed.federation.server import run_server
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.report_html import run_page

from test_cli import TINY_FLAGS
from test_server_rounds import MODEL, InProcessGrid


class Page(HTMLParser):
    """Every tag with its attributes, the text of each element with an id, and the table cells."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.by_id: dict[str, str] = {}
        self.cells: list[str] = []
        self._open: list[tuple[str, str | None, list[str]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag not in ("img", "meta", "br"):
            self._open.append((tag, attributes.get("id"), []))

    def handle_endtag(self, tag):
        while self._open:
            name, ident, parts = self._open.pop()
            text = "".join(parts).strip()
            if ident:
                self.by_id[ident] = text
            if name in ("td", "th"):
                self.cells.append(text)
            if self._open:
                self._open[-1][2].append("".join(parts))
            if name == tag:
                break

    def handle_data(self, data):
        self.text.append(data)
        if self._open:
            self._open[-1][2].append(data)

    def images(self) -> dict[str, Image.Image]:
        found = {}
        for tag, attrs in self.tags:
            if tag == "img":
                src = attrs["src"] or ""
                assert src.startswith("data:image/png;base64,"), src[:80]
                found[attrs.get("id") or ""] = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        return found


def assert_self_contained(html: str, page: Page) -> None:
    """No script, no stylesheet or frame from elsewhere, no URL: the page opens offline and tells nobody."""
    assert "http://" not in html and "https://" not in html
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe", "object", "embed", "base")]
    for tag, attrs in page.tags:
        for name in ("src", "href", "action", "poster"):
            assert attrs.get(name) is None or str(attrs[name]).startswith("data:"), (tag, name, attrs[name])


@pytest.fixture(scope="module")
def private_run(tmp_path_factory):
    """A private federated budget run with evaluation, 3 good sites and one whose
    statistics reply is an error: real server, real sites
    (the ClientApp's routing in process, as in test_server_rounds)."""
    tmp_path = tmp_path_factory.mktemp("private-run")
    with serverapp_identity(run_id=1):
        grid = InProcessGrid(tmp_path, {1: "good", 2: "good", 3: "good", 4: "crash"}, images=120)
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump({
            "model": MODEL.model_dump(mode="json"), "budget": {"blocks": 2},
            "federation": {"num_sites": 4, "min_sites": 2, "round_timeout": 300},
            "evaluation": {"enabled": True}, "privacy": {"epsilon": 8.0, "seed": 3, "public_images": 32},
            "output": str(tmp_path / "server")}))
        report = run_server(grid, load_federated_config(path))
    return tmp_path, report, grid


def test_a_private_federated_run_writes_a_self_contained_report_html_with_its_numbers(private_run):
    tmp_path, report, _ = private_run
    html = (tmp_path / "server" / "report.html").read_text()
    page = Page(html)
    assert_self_contained(html, page)
    assert "report.html" in json.loads((tmp_path / "server" / "tba-fed-output.json").read_text())["files"]
    images = page.images()
    assert set(images) == {"heatmap", "privacy-utility"}
    assert all(image.format == "PNG" and image.size[0] >= 400 and image.size[1] >= 300 for image in images.values())
    assert page.by_id["plan"] == report["plan"]
    assert page.by_id["epsilon"] == "8"
    assert page.by_id["calibration-images"] == str(report["calibration_images"])
    assert page.by_id["accuracy-compressed"] == f"{report['evaluation']['pooled']['compressed']:.4f}"
    assert page.by_id["accuracy-original"] == f"{report['evaluation']['pooled']['original']:.4f}"
    for span in report["spans"]:
        assert f"{span['holdout_relative_error']:.4g}" in page.cells
        assert f"{span['identity_holdout_relative_error']:.4g}" in page.cells
    ratios = [s["holdout_relative_error"] / s["identity_holdout_relative_error"] for s in report["spans"]
              if s["identity_holdout_relative_error"] > 0]
    assert ratios, "no span has a point on the privacy-utility curve"
    for ratio in ratios:  # in the fit table and again as the run's point on the curve
        assert page.cells.count(f"{ratio:.3f}") == 2
    statistics = next(r for r in report["federation"]["rounds"] if r["name"] == "statistics")["sites"]
    failed = statistics["site-4"]["status"]
    assert failed != "ok" and "disk failure" in statistics["site-4"]["reason"]
    assert f"{failed} (statistics)" in page.cells and "disk failure" in "".join(page.text)
    for name in ("site-1", "site-2", "site-3"):
        assert str(statistics[name]["images"]) in page.cells
    chain = check_chain(tmp_path / "server.audit.jsonl")
    assert page.by_id["audit-status"] == "chain intact"
    assert chain.entries[-2]["hash"] in html  # the head when the report was written; the result entry follows it


def test_text_a_site_chose_is_escaped_not_markup(private_run):
    _, report, _ = private_run
    hostile = json.loads(json.dumps(report))
    rnd = hostile["federation"]["rounds"][0]
    rnd["sites"]["<script>alert(1)</script>"] = {"status": "failed", "reason": '<img src="https://x.example/a.png">'}
    html = run_page(hostile)
    page = Page(html)
    assert not [tag for tag, _ in page.tags if tag == "script"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    assert [attrs["src"][:5] for tag, attrs in page.tags if tag == "img"] == ["data:"]  # the curve; no heatmap without similarity


def test_compress_writes_report_html_beside_report_md_with_the_plan_outlined(tmp_path):
    out = tmp_path / "out"
    assert main(["compress", *TINY_FLAGS, "--data", "synthetic", "--num-images", "16", "--budget-blocks", "2",
                 "-o", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    page = Page(html)
    assert_self_contained(html, page)
    assert page.by_id["plan"] == report["plan"] and set(page.images()) == {"heatmap"}
    assert page.by_id["params-compressed"] == f"{report['parameters']['compressed']:,}"
    assert "Not private" in html and "Sites' contributions" not in html
    assert {"report.html", "report.md", "report.json"} <= set(json.loads((out / "tba-fed-output.json").read_text())["files"])


def _site_yaml(tmp_path: Path, ledger: Path, audit: Path) -> Path:
    path = tmp_path / "site-1.yaml"
    path.write_text(yaml.safe_dump({"name": "site-1", "profile": "development", "data": {"source": "synthetic", "num_images": 8},
                                    "output": str(tmp_path / "site-1-out"), "audit": str(audit),
                                    "privacy": {"epsilon": 20.0, "ledger": str(ledger), "require_dp": False}}))
    return path


def _site_audit(path: Path) -> None:
    log = AuditLog(path)
    for status in ("ok", "ok", "refused"):
        log.append({"role": "site", "site": "site-1", "run_id": "1", "round": "statistics",
                    "message_type": "query.statistics", "status": status, "request_sha256": "a" * 64,
                    "sent_sha256": "b" * 64 if status == "ok" else None})


def test_a_site_writes_its_report_html_with_epsilon_spent_against_its_budget(private_run, tmp_path, capsys):
    _, report, grid = private_run
    ledger = PrivacyLedger(grid.sites[1].policy.ledger)
    _site_audit(tmp_path / "audit.jsonl")
    out = tmp_path / "site-report.html"
    assert main(["privacy", "report", str(_site_yaml(tmp_path, ledger.path, tmp_path / "audit.jsonl")),
                 "--html", str(out)]) == 0
    html = out.read_text()
    page = Page(html)
    assert_self_contained(html, page)
    spent = ledger.spent(1e-5)
    assert spent > 0 and page.by_id["epsilon-spent"] == f"{spent:.4f}"
    assert page.by_id["epsilon-budget"] == "20" and page.by_id["epsilon-remaining"] == f"{20 - spent:.4f}"
    entries = ledger.entries()
    assert [e.release for e in entries] == ["similarity", "statistics", "probe", "accuracy"]
    assert entries[0].run_id in page.cells and "similarity, statistics, probe, accuracy" in page.cells
    assert f"{entries[0].noise_multiplier:.4g}" in page.cells and str(entries[1].images) in page.cells
    assert page.by_id["audit-status"] == "chain intact" and "ok 2, refused 1" in html
    assert f"site report written to {out}" in capsys.readouterr().out


def test_a_site_report_names_a_tampered_audit_log_and_never_replaces_a_foreign_file(private_run, tmp_path, capsys):
    _, _, grid = private_run
    audit = tmp_path / "audit.jsonl"
    _site_audit(audit)
    lines = audit.read_text().splitlines()
    lines[1] = lines[1].replace('"status": "ok"', '"status": "refused"')
    audit.write_text("\n".join(lines) + "\n")
    site = _site_yaml(tmp_path, grid.sites[2].policy.ledger, audit)
    out = tmp_path / "report.html"
    assert main(["privacy", "report", str(site), "--html", str(out)]) == 0
    page = Page(out.read_text())
    assert page.by_id["audit-status"] == "does NOT verify" and "hash mismatch" in out.read_text()
    assert main(["privacy", "report", str(site), "--html", str(out)]) == 0  # its own earlier page: replaced
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>my notes</p>")
    capsys.readouterr()
    assert main(["privacy", "report", str(site), "--html", str(foreign)]) == 2
    assert foreign.read_text() == "<p>my notes</p>"
    assert "--html: " in capsys.readouterr().err


@pytest.mark.slow
def test_the_reports_open_in_headless_chromium_without_errors_and_show_their_numbers(private_run, tmp_path):
    """Real browser (Debian's chromium): no console error or exception, nothing requested but the page and its data:
    images, every image decoded, the key numbers in the rendered DOM, a full-page screenshot written."""
    from browser import visit

    run_dir, report, grid = private_run
    _site_audit(tmp_path / "audit.jsonl")
    ledger = PrivacyLedger(grid.sites[3].policy.ledger)
    site_page = tmp_path / "site.html"
    assert main(["privacy", "report", str(_site_yaml(tmp_path, ledger.path, tmp_path / "audit.jsonl")),
                 "--html", str(site_page)]) == 0
    pages = {"run": run_dir / "server" / "report.html", "site": site_page}
    expected = {"run": [report["plan"], f"{report['evaluation']['pooled']['compressed']:.4f}", "site-4", "disk failure",
                        "chain intact", f"{report['spans'][0]['holdout_relative_error']:.4g}"],
                "site": [f"{ledger.spent(1e-5):.4f}", "site-1", "chain intact", "ok 2, refused 1"]}
    for name, page in pages.items():
        shot = tmp_path / f"{name}.png"
        seen = visit(page, shot)
        assert seen.errors == [], seen.errors
        assert all(url == page.absolute().as_uri() or url.startswith("data:") for url in seen.requests), \
            [url[:80] for url in seen.requests]
        assert all(image["complete"] and image["width"] > 0 for image in seen.images), seen.images
        assert len(seen.images) == (2 if name == "run" else 0)
        for number in expected[name]:
            assert number in seen.text, (name, number)
        with Image.open(shot) as image:
            assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 600
            assert len(image.convert("L").getcolors(1 << 16) or []) > 10  # a rendered page, not a blank one
