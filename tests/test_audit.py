"""The hash-chained audit log: every kind of tampering is named, a crash is told apart from tampering,
appends fail closed, concurrent writers keep one chain; a site's handler logs what it served or refused,
and a site log and the server log anchor each other."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

import tba_fed
from tba_fed import audit
from tba_fed.audit import GENESIS, AuditLog, AuditLogInvalid, canonical, check_chain
from tba_fed.cli import main
from tba_fed.federation.audit_check import cross_check
from tba_fed.federation.records import content_sha256, from_record, to_record
from tba_fed.federation.site_audit import SiteError, spec_sha256
from tba_fed.federation.wire import payload_sha256
from tba_fed.privacy.ledger import PrivacyLedger
from tba_fed.privacy.policy import PrivacyRequest
from tba_fed.privacy.site_state import initialise

from conftest import TINY


def _log(path: Path, n: int = 4) -> list[str]:
    return [AuditLog(path).append({"event": "round", "k": k}) for k in range(n)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _problems(path: Path, **kwargs) -> list[str]:
    return [str(p) for p in check_chain(path, **kwargs).problems]


def test_round_trip_links_every_entry(tmp_path):
    path = tmp_path / "audit.jsonl"
    heads = _log(path)
    check = check_chain(path)
    assert check.ok and check.head == heads[-1] and len(check.entries) == 4
    assert [e["seq"] for e in check.entries] == [0, 1, 2, 3] and [e["k"] for e in check.entries] == [0, 1, 2, 3]
    assert [e["prev"] for e in check.entries] == [GENESIS, *heads[:3]]
    first = json.loads(_lines(path)[0])
    assert list(first)[:3] == ["seq", "time", "prev"] and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", first["time"])
    assert first["hash"] == hashlib.sha256(canonical({k: v for k, v in first.items() if k != "hash"})).hexdigest()
    assert canonical({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'
    with pytest.raises(ValueError, match=r"event fields \['seq', 'hash'\] are reserved"):
        AuditLog(path).append({"seq": 9, "hash": "x"})


def test_an_edited_field_is_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path)
    lines = _lines(path)
    lines[1] = lines[1].replace('"k": 1', '"k": 7')
    path.write_text("".join(lines))
    assert _problems(path) == [f"{path}:2 (seq 1): hash mismatch: the entry was edited after it was written"]
    # an editor who also recomputes the entry's hash breaks the next link instead
    entry = json.loads(lines[1])
    entry["hash"] = hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()
    lines[1] = json.dumps(entry) + "\n"
    path.write_text("".join(lines))
    assert _problems(path) == [f"{path}:3 (seq 2): prev does not match the previous entry's hash: an entry was "
                               "replaced or the chain rewritten from here"]


def test_removed_and_swapped_entries_are_named(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 5)
    lines = _lines(path)
    path.write_text("".join(lines[:2] + lines[3:]))
    assert _problems(path) == [f"{path}:3 (seq 3): seq 3 where 2 was expected: 1 entry missing before it (removed) "
                               "or entries reordered"]
    path.write_text("".join([lines[0], lines[2], lines[1], *lines[3:]]))
    assert _problems(path) == [
        f"{path}:2 (seq 2): seq 2 where 1 was expected: 1 entry missing before it (removed) or entries reordered",
        f"{path}:3 (seq 1): seq 1 where 3 was expected: entries reordered or duplicated"]
    path.write_text("".join(lines[1:]))
    assert _problems(path) == [f"{path}:1 (seq 1): bad first entry: seq 1 and prev {json.loads(lines[0])['hash'][:12]}…, "
                               "expected seq 0 and prev 0000… (entries before it were removed)"]


def test_a_removed_last_entry_is_caught_only_by_an_anchor(tmp_path):
    path = tmp_path / "audit.jsonl"
    heads = _log(path)
    path.write_text("".join(_lines(path)[:-1]))
    assert _problems(path) == []  # the chain alone cannot see it
    assert _problems(path, head=heads[2]) == []  # an older head is still there
    assert _problems(path, head=heads[3]) == [f"{path}: head {heads[3][:12]}… is not in the log: it was truncated or "
                                              "rewritten after that head was recorded"]


def test_a_torn_final_line_is_a_crash_not_tampering_and_blocks_appends(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 3)
    size = path.stat().st_size
    with open(path, "ab") as handle:  # what a crash in the middle of the one write leaves
        handle.write(b'{"seq": 3, "time": "2026-')
    check = check_chain(path)
    assert check.torn and len(check.entries) == 3
    assert [str(p) for p in check.problems] == [
        f"{path}:4: torn final line: 25 bytes without a newline, the remains of an interrupted append (a crash, not "
        f"tampering). After checking it, cut it off with: truncate -s {size} {path}"]
    with pytest.raises(AuditLogInvalid, match="torn final line"):
        AuditLog(path).append({"event": "after the crash"})
    with open(path, "r+b") as handle:  # the repair the message gives
        handle.truncate(size)
    AuditLog(path).append({"event": "after the repair"})
    assert check_chain(path).ok and len(check_chain(path).entries) == 4


def test_append_after_tampering_is_refused_and_says_how_to_check(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 2)
    path.write_text(path.read_text().replace('"k": 0', '"k": 5'))
    with pytest.raises(AuditLogInvalid) as err:
        AuditLog(path).append({"event": "more"})
    assert str(err.value) == (f"audit: {path} does not verify ({path}:1 (seq 0): hash mismatch: the entry was edited "
                              f"after it was written); refusing to append to it (run `tba-fed audit verify {path}`)")
    assert len(_lines(path)) == 2


def _appender(path: str, writer: int, count: int, barrier) -> None:
    log = AuditLog(Path(path))  # one object per writer: each append checks only the other writer's new entries
    for k in range(count):
        barrier.wait(30)  # both writers race for every append: they must interleave, whatever the load
        log.append({"writer": writer, "k": k})


def test_concurrent_appends_from_two_processes_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_appender, args=(str(path), w, 40, barrier)) for w in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    check = check_chain(path)
    assert check.ok and len(check.entries) == 80
    for writer in (1, 2):  # each writer's entries in its own order, none lost
        assert [e["k"] for e in check.entries if e["writer"] == writer] == list(range(40))
    assert {e["writer"] for e in check.entries[:2]} == {1, 2}  # the barrier made them interleave


def _recomputed(line: str, **fields) -> str:
    """`line` with `fields` changed and its hash recomputed: an editor who knows the format."""
    entry = {**json.loads(line), **fields}
    entry["hash"] = hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()
    return json.dumps(entry) + "\n"


# each change made between two appends of one AuditLog object: (change, the first problem its refusal names)
CHANGES = {
    "same-length edit": (lambda lines: [lines[0], lines[1].replace('"k": 1', '"k": 7'), *lines[2:]],
                         "{path}:2 (seq 1): hash mismatch: the entry was edited after it was written"),
    "same-length edit, hash recomputed": (
        lambda lines: [lines[0], _recomputed(lines[1], k=7), *lines[2:]],
        "{path}:3 (seq 2): prev does not match the previous entry's hash: an entry was replaced or the chain rewritten "
        "from here"),
    "entry removed": (lambda lines: [*lines[:2], *lines[3:]],
                      "{path}:3 (seq 3): seq 3 where 2 was expected: 1 entry missing before it (removed) or entries "
                      "reordered"),
    "entries swapped": (lambda lines: [lines[0], lines[2], lines[1], lines[3]],
                        "{path}:2 (seq 2): seq 2 where 1 was expected: 1 entry missing before it (removed) or entries "
                        "reordered"),
    "last entry cut": (lambda lines: lines[:3],
                       "{path}: head {head12}… is not in the log: it was truncated or rewritten after that head was "
                       "recorded"),
    "cut inside the last entry": (lambda lines: [*lines[:3], lines[3][:40]],
                                  "{path}:4: torn final line: 40 bytes without a newline, the remains of an interrupted "
                                  "append (a crash, not tampering). After checking it, cut it off with: truncate -s "
                                  "{size3} {path}"),
    "torn line appended": (lambda lines: [*lines, '{"seq": 4, "time": "2026-'],
                           "{path}:5: torn final line: 25 bytes without a newline, the remains of an interrupted append "
                           "(a crash, not tampering). After checking it, cut it off with: truncate -s {size} {path}"),
    "log emptied": (lambda lines: [],
                    "{path}: head {head12}… is not in the log: it was truncated or rewritten after that head was recorded"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_two_appends_of_one_object_is_refused_and_nothing_written(tmp_path, change):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    heads = [log.append({"event": "round", "k": k}) for k in range(4)]
    lines = _lines(path)
    mutate, problem = CHANGES[change]
    changed = "".join(mutate(lines)).encode()
    path.write_bytes(changed)
    if change.startswith("same-length"):
        assert len(changed) == sum(map(len, lines))
    with pytest.raises(AuditLogInvalid) as err:
        log.append({"event": "after the change"})
    problem = problem.format(path=path, head12=heads[-1][:12], size=sum(map(len, lines)), size3=sum(map(len, lines[:3])))
    assert str(err.value) == (f"audit: {path} does not verify ({problem}); refusing to append to it "
                              f"(run `tba-fed audit verify {path}`)")
    assert path.read_bytes() == changed  # nothing written
    with pytest.raises(AuditLogInvalid):  # and it stays refused
        log.verified()


def test_a_cut_log_is_refused_by_the_object_that_verified_its_end_only(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    heads = [log.append({"k": k}) for k in range(3)]
    path.write_text("".join(_lines(path)[:2]))
    with pytest.raises(AuditLogInvalid, match=f"head {heads[2][:12]}… is not in the log"):
        log.append({"k": 3})
    # a new object (a new process) has no anchor: the chain alone cannot show a cut end (the counterpart's log does)
    assert AuditLog(path).append({"k": 3}) != heads[2] and len(check_chain(path).entries) == 3


def test_a_repaired_torn_line_and_re_serialised_entries_are_accepted(tmp_path, caplog):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    heads = [log.append({"k": k}) for k in range(3)]
    size = path.stat().st_size
    with open(path, "ab") as handle:
        handle.write(b'{"seq": 3, "ti')
    with pytest.raises(AuditLogInvalid, match="torn final line"):
        log.append({"k": 3})
    os.truncate(path, size)  # the repair `verify` prints
    heads.append(log.append({"k": 3}))
    # the same entries written without spaces: other bytes, the same hashes, so every verified entry is intact
    verified = path.stat().st_size
    path.write_text("".join(json.dumps(json.loads(line), separators=(",", ":")) + "\n" for line in _lines(path)))
    with caplog.at_level(logging.WARNING, logger="tba_fed.audit"):
        heads.append(log.append({"k": 4}))
    assert f"audit {path}: the {verified} bytes verified earlier changed, yet every entry verified then is intact" \
        in caplog.text
    check = check_chain(path)
    assert check.ok and [e["hash"] for e in check.entries] == heads and [e["k"] for e in check.entries] == list(range(5))


def test_entries_other_writers_add_between_two_appends_are_checked_and_chained(tmp_path, monkeypatch):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    heads = [log.append({"writer": "first", "k": k}) for k in range(3)]
    other = AuditLog(path)
    heads += [other.append({"writer": "other", "k": k}) for k in range(2)]
    child = ("import sys; from pathlib import Path; from tba_fed.audit import AuditLog; "
             "print(AuditLog(Path(sys.argv[1])).append({'writer': 'process', 'k': 0}))")
    env = {**os.environ, "PYTHONPATH": str(Path(tba_fed.__file__).parents[1])}
    heads.append(subprocess.run([sys.executable, "-c", child, str(path)], env=env, check=True, capture_output=True,
                                text=True).stdout.strip())
    hashed, entry_hash = [], audit.entry_hash  # which entries get hashed: not the ones an object verified before
    monkeypatch.setattr(audit, "entry_hash", lambda entry: hashed.append(entry["seq"]) or entry_hash(entry))
    heads.append(log.append({"writer": "first", "k": 3}))
    assert hashed == [3, 4, 5, 6]  # the 3 new entries, then its own
    hashed.clear()
    heads.append(other.append({"writer": "other", "k": 2}))
    assert hashed == [5, 6, 7]  # the process's and the first object's entries, then its own
    check = check_chain(path)
    assert check.ok and [e["hash"] for e in check.entries] == heads
    assert [e["seq"] for e in check.entries] == list(range(8)) and [e["prev"] for e in check.entries] == [GENESIS, *heads[:7]]
    assert [e["writer"] for e in check.entries] == ["first"] * 3 + ["other"] * 2 + ["process", "first", "other"]


def test_payload_and_content_hashes():
    a = {"x": np.arange(6, dtype=np.float64).reshape(2, 3), "n": np.array([4.0])}
    assert payload_sha256(a) == payload_sha256(dict(reversed(list(a.items()))))
    assert payload_sha256(a) != payload_sha256({**a, "x": a["x"].reshape(3, 2)})
    assert payload_sha256(a) != payload_sha256({**a, "x": a["x"].astype(np.float32)})
    assert payload_sha256(a) != payload_sha256({"y": a["x"], "n": a["n"]})
    # Flower's Array round trip (np.save / np.load) keeps the hash; meta is not part of the content
    record = ArrayRecord({k: Array(v) for k, v in a.items()})
    assert payload_sha256(from_record(record)) == payload_sha256(a)
    one = RecordDict({"statistics": to_record(a), "meta": ConfigRecord({"site": "a"}), "m": MetricRecord({"total": 3})})
    two = RecordDict({"statistics": record, "meta": ConfigRecord({"site": "a", "audit-head": "f" * 64}),
                      "m": MetricRecord({"total": 3})})
    assert content_sha256(one) == content_sha256(two)
    assert content_sha256(one) != content_sha256(RecordDict({"statistics": record, "m": MetricRecord({"total": 4})}))


def test_spec_hash_is_the_ledgers_and_identifies_unparseable_requests():
    request = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=("statistics",))
    config = {"plan": "1->2", "token-mode": "all", "privacy": request.to_json()}
    from tba_fed.privacy.policy import spec_hash

    assert spec_sha256(config, "statistics") == spec_hash(request.to_json(), "statistics", "plan=1->2", "token-mode=all")
    assert spec_sha256(config, "statistics") != spec_sha256(config, "probe")
    bad = {**config, "privacy": '{"epsilon": -1}'}
    assert spec_sha256(bad, "statistics") == spec_hash('{"epsilon": -1}', "statistics", "plan=1->2", "token-mode=all")


# ------------------------------------------------------------------------------------------ a site's handler


@pytest.fixture()
def server_identity():
    """Messages built outside a Flower run need the run and task ids a ServerApp would have (internal API)."""
    from tba_fed.federation.flower_internals import serverapp_identity

    with serverapp_identity(run_id=77):
        yield


MODEL = json.dumps({"name": "vit_tiny_patch16_224", "kwargs": TINY})


def _site(tmp_path, **policy) -> Context:
    """A production site, initialised; each of its 32 images held out with probability 0.5 (a part of fewer than
    min_images = 2 has probability 1.5e-8)."""
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"name": "hospital-a", "output": str(tmp_path / "out"),
                                    "data": {"source": "synthetic", "num_images": 32, "batch_size": 8,
                                             "holdout_fraction": 0.5},
                                    "privacy": {"min_images": 2, "ledger": str(tmp_path / "ledger.json"), **policy},
                                    "state": str(tmp_path / "state")}))
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")  # tba-fed site init
    return Context(run_id=77, node_id=5, node_config={"site-config": str(site)}, state=RecordDict(), run_config={})


def _identity_maps():
    import torch

    from tba_fed.plan import parse_plan
    from tba_fed.solver import LinearMap

    return {parse_plan("1->2", 6).spans[0]: LinearMap(torch.eye(48, dtype=torch.float64), None)}


def _request(privacy: str = "") -> Message:
    from tba_fed.federation.wire import encode_priors

    config = {"model": MODEL, "token-mode": "all", "plan": "1->2", "privacy": privacy, "profile": "production",
              **({"prior-maps": encode_priors({"linear": _identity_maps()})} if privacy else {})}
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=5, message_type="query.statistics")


def test_a_site_logs_what_it_released_and_what_it_refused(tmp_path, server_identity):
    from clients.client_app import statistics

    context = _site(tmp_path, require_dp=False)
    log = tmp_path / "out" / "audit.jsonl"
    reply = statistics(_request(), context)
    entry = check_chain(log).entries[-1]
    assert reply.content.config_records["meta"]["audit-head"] == entry["hash"] == check_chain(log).head
    assert entry["sent_sha256"] == content_sha256(reply.content)  # what the server will compute from the reply
    assert entry["request_sha256"] == content_sha256(_request().content)
    assert {k: entry[k] for k in ("role", "site", "run_id", "round", "message_type", "status", "grant")} == {
        "role": "site", "site": "hospital-a", "run_id": "77", "round": "statistics", "message_type": "query.statistics",
        "status": "ok", "grant": {"mechanism": "exact"}}
    assert entry["sent"]["statistics:calibration/1-2/gram_triu"] == [48 * 49 // 2] and len(entry["sent"]) == 14
    # a private request this site's policy refuses (ε above its budget): logged with the reason, then raised
    request = PrivacyRequest(epsilon=50.0, delta=1e-5, releases=("statistics",), clip_spans={"1->2": (1, 1, 1, 1, 1)})
    with pytest.raises(Exception, match="ε 50 exceeds the site's total budget 1"):
        statistics(_request(request.to_json()), context)
    refused = check_chain(log).entries[-1]
    assert refused["status"] == "refused" and refused["seq"] == 1 and "sent_sha256" not in refused
    assert refused["error"].startswith("PolicyRefusal: privacy.epsilon: refused by the site's privacy policy")
    assert refused["spec_sha256"] == spec_sha256(dict(_request(request.to_json()).content.config_records["config"]),
                                                 "statistics")


def test_a_private_release_quotes_the_ledger_and_a_tampered_log_stops_the_site(tmp_path, server_identity, caplog):
    from clients.client_app import probe
    from tba_fed.federation.wire import encode_maps

    context = _site(tmp_path, epsilon=8.0, releases=["probe"], allow_seeded_noise=True)
    request = PrivacyRequest(epsilon=4.0, delta=1e-5, releases=("probe",), clip_features=2.0, seed=3)
    maps = to_record(encode_maps(_identity_maps()))
    config = {"model": MODEL, "plan": "1->2", "identity-spans": "", "num-classes": 10, "privacy": request.to_json(),
              "profile": "production"}
    reply = probe(Message(RecordDict({"config": ConfigRecord(config), "maps": maps}), dst_node_id=5,
                          message_type="query.probe"), context)
    log = tmp_path / "out" / "audit.jsonl"
    entry = check_chain(log).entries[-1]
    ledger = PrivacyLedger(tmp_path / "ledger.json").entries()[-1]
    assert entry["spec_sha256"] == ledger.spec_sha256
    assert entry["grant"] == {"mechanism": "gaussian", "noise_multiplier": ledger.noise_multiplier,
                              "noise_std": ledger.noise_std, "noise": ledger.noise, "aggregation": "local",
                              "images": ledger.images, "epsilon_run": 4.0, "delta": 1e-5,
                              "payload_sha256": ledger.payload_sha256, "site_noise_multiplier": ledger.noise_multiplier,
                              "accountant": "rdp", "releases": ["probe"]}
    assert ledger.payload_sha256 is not None  # the stored payload a repeat would re-send
    assert entry["received"] == {"maps": {"sha256": payload_sha256(from_record(maps)),
                                          "arrays": {"span.1-2.weight": [48, 48]}}}
    assert reply.content.config_records["meta"]["audit-head"] == entry["hash"]
    # the site's own log was edited: it serves nothing, and spends no budget; the server learns only the field
    log.write_text(log.read_text().replace('"status": "ok"', '"status": "refused"'))
    with caplog.at_level(logging.WARNING, logger="tba_fed"), pytest.raises(SiteError) as err:
        probe(Message(RecordDict({"config": ConfigRecord({**config, "privacy": request.model_copy(
            update={"epsilon": 2.0}).to_json()}), "maps": maps}), dst_node_id=5, message_type="query.probe"), context)
    assert str(err.value) == ("audit: hospital-a could not serve this request (AuditLogInvalid); the reason is in the "
                              "site's own log (its operator reads it with tba-fed audit show)")
    assert f"AuditLogInvalid: audit: {log} does not verify ({log}:1 (seq 0): hash mismatch" in caplog.text
    assert len(PrivacyLedger(tmp_path / "ledger.json").entries()) == 1


def _counts_matching(head: str, entry: dict, *, knows_nonce: bool, counts: range = range(100_001)) -> list[int]:
    """The server's brute force of a site's image count from its audit head: it knows every other field of the
    site's entry (run id, spec and request hashes: it sent them; reply hash and schema: it received them; the
    grant's mechanism, σ and noise: the run's; the time to the second), so it hashes the entry once per count.
    Here those fields are read from the site's log; without `knows_nonce` the attacker lacks the entry's nonce."""
    known = {k: v for k, v in entry.items() if k != "hash" and (knows_nonce or k != "nonce")}
    known["grant"] = {**known["grant"], "images": "COUNT"}
    before, after = canonical(known).split(b'"COUNT"')
    return [n for n in counts if hashlib.sha256(before + str(n).encode() + after).hexdigest() == head]


def test_the_server_cannot_brute_force_a_sites_image_count_from_its_audit_head(tmp_path, server_identity):
    from clients.client_app import probe
    from tba_fed.federation.wire import encode_maps

    context = _site(tmp_path, epsilon=8.0, releases=["probe"], allow_seeded_noise=True)
    request = PrivacyRequest(epsilon=4.0, delta=1e-5, releases=("probe",), clip_features=2.0, seed=3)
    config = {"model": MODEL, "plan": "1->2", "identity-spans": "", "num-classes": 10, "privacy": request.to_json(),
              "profile": "production"}
    reply = probe(Message(RecordDict({"config": ConfigRecord(config), "maps": to_record(encode_maps(_identity_maps()))}),
                          dst_node_id=5, message_type="query.probe"), context)
    head = reply.content.config_records["meta"]["audit-head"]  # what the server receives
    entry = check_chain(tmp_path / "out" / "audit.jsonl").entries[-1]
    images = PrivacyLedger(tmp_path / "ledger.json").entries()[-1].images
    assert entry["hash"] == head and entry["grant"]["images"] == images and 0 < images <= 32
    assert _counts_matching(head, entry, knows_nonce=True) == [images]  # the enumeration finds it given every field
    assert _counts_matching(head, entry, knows_nonce=False) == []  # the server, without the nonce, finds nothing


def test_every_entry_is_salted_with_its_own_128_bit_nonce_which_no_event_can_set(tmp_path):
    path = tmp_path / "audit.jsonl"
    _log(path, 50)
    entries = check_chain(path).entries
    assert list(json.loads(_lines(path)[0]))[:4] == ["seq", "time", "prev", "nonce"]
    assert all(re.fullmatch(r"[0-9a-f]{32}", e["nonce"]) for e in entries) and len({e["nonce"] for e in entries}) == 50
    with pytest.raises(ValueError, match=r"event fields \['nonce'\] are reserved by the audit log"):
        AuditLog(path).append({"event": "round", "nonce": "0" * 32})
    assert len(_lines(path)) == 50
    # a changed nonce is an edit like any other: the entry's hash breaks, or with it recomputed, the next link
    lines = _lines(path)
    nonce = entries[1]["nonce"]
    lines[1] = lines[1].replace(nonce, nonce[::-1])
    path.write_text("".join(lines))
    assert _problems(path) == [f"{path}:2 (seq 1): hash mismatch: the entry was edited after it was written"]
    lines[1] = _recomputed(lines[1])
    path.write_text("".join(lines))
    assert _problems(path) == [f"{path}:3 (seq 2): prev does not match the previous entry's hash: an entry was "
                               "replaced or the chain rewritten from here"]


def test_a_log_written_before_nonces_verifies_and_takes_salted_entries(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    prev, lines = GENESIS, []
    for k in range(3):  # entries as tba-fed wrote them before the nonce: seq, time, prev, the event, hash
        entry = {"seq": k, "time": f"2026-01-0{k + 1}T00:00:00+00:00", "prev": prev, "event": "round", "k": k}
        entry["hash"] = prev = hashlib.sha256(canonical(entry)).hexdigest()
        lines.append(json.dumps(entry) + "\n")
    path.write_text("".join(lines))
    assert check_chain(path).ok and check_chain(path).head == prev
    head = AuditLog(path).append({"event": "round", "k": 3})
    check = check_chain(path)
    assert check.ok and check.head == head and check.entries[3]["prev"] == prev
    assert ["nonce" in e for e in check.entries] == [False, False, False, True]
    assert main(["audit", "verify", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: 4 entries, chain intact; head {head}\n"
    path.write_text("".join([lines[0].replace('"k": 0', '"k": 5'), *_lines(path)[1:]]))  # an old entry edited
    assert _problems(path) == [f"{path}:1 (seq 0): hash mismatch: the entry was edited after it was written"]


# ------------------------------------------------------------------------------------- site vs server, CLI


def _pair(tmp_path) -> tuple[Path, Path, list[str]]:
    """A site log and the server log of the same two rounds (the fields the real ones cross-check)."""
    site, server = tmp_path / "site.jsonl", tmp_path / "server.jsonl"
    heads = []
    for k, kind in enumerate(("query.statistics", "train.install")):
        request, reply = f"{k}a" * 32, f"{k}b" * 32
        heads.append(AuditLog(site).append({"role": "site", "site": "hospital-a", "run_id": "9", "round": kind,
                                            "message_type": kind, "request_sha256": request, "sent_sha256": reply,
                                            "status": "ok"}))
        AuditLog(server).append({"role": "server", "run_id": "9", "round": kind, "message_type": kind, "sent": {},
                                 "sites": {"hospital-a": {"node_id": 1, "status": "ok", "sent_sha256": request,
                                                          "received_sha256": reply, "site_head": heads[-1]}}})
    return site, server, heads


def test_the_counterparts_log_catches_truncation_of_either(tmp_path, capsys):
    site, server, heads = _pair(tmp_path)
    problems, matched = cross_check(check_chain(site), check_chain(server))
    assert problems == [] and matched == f"2 site heads and 2 site requests matched against {server}"
    assert main(["audit", "verify", str(site), "--against", str(server)]) == 0
    assert capsys.readouterr().out == (f"{site}: 2 entries, chain intact; head {heads[1]}; 2 site heads and 2 site "
                                       f"requests matched against {server}\n")
    # the site cuts its last entry: its chain still verifies alone, not against the server's record of its head
    full = site.read_text()
    site.write_text("".join(full.splitlines(keepends=True)[:1]))
    assert main(["audit", "verify", str(site)]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", str(site), "--against", str(server)]) == 1
    captured = capsys.readouterr()
    assert captured.out == (f"{site}: {server}:2 (round train.install of run 9) records hospital-a's audit head "
                            f"{heads[1][:12]}…, which is not in this log: entries were cut from its end or it was "
                            "rewritten\n")
    assert captured.err.strip().endswith("1 problem(s) found")
    # the server cuts its last entry: the site's logged request shows it (either argument order)
    site.write_text(full)
    server.write_text("".join(server.read_text().splitlines(keepends=True)[:1]))
    problems, _ = cross_check(check_chain(server), check_chain(site))
    assert [str(p) for p in problems] == [
        f"{server}: {site}:2 (seq 1) records a train.install request of run 9 (sha256 {'1a' * 6}…) that this log does "
        "not record sending: entries were cut from its end or it was edited"]
    # a site that rewrites its whole chain consistently (new reply hash) is caught by the recorded heads
    site.unlink()
    AuditLog(site).append({"role": "site", "site": "hospital-a", "run_id": "9", "round": "query.statistics",
                           "message_type": "query.statistics", "request_sha256": "0a" * 32, "sent_sha256": "ff" * 32,
                           "status": "ok"})
    problems, _ = cross_check(check_chain(site), check_chain(server))
    assert len(problems) == 1 and f"records hospital-a's audit head {heads[0][:12]}…, which is not in this log" \
        in str(problems[0])
    problems, _ = cross_check(check_chain(site), check_chain(site))
    assert "--against needs one site log and one server log" in str(problems[0])


def test_cli_verify_names_every_problem_and_show_prints_a_table(tmp_path, capsys):
    path = tmp_path / "audit.jsonl"
    heads = _log(path, 3)
    assert main(["audit", "verify", str(path), "--head", heads[1]]) == 0
    assert capsys.readouterr().out == f"{path}: 3 entries, chain intact; head {heads[2]}; anchored at {heads[1][:12]}…\n"
    lines = _lines(path)
    path.write_text(lines[0].replace('"k": 0', '"k": 1') + lines[2])
    assert main(["audit", "verify", str(path)]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{path}:1 (seq 0): hash mismatch: the entry was edited after it was written",
        f"{path}:2 (seq 2): seq 2 where 1 was expected: 1 entry missing before it (removed) or entries reordered"]
    assert main(["audit", "verify", str(tmp_path / "missing.jsonl")]) == 2
    assert f"audit: {tmp_path / 'missing.jsonl'} does not exist" in capsys.readouterr().err
    path.write_text("".join(lines))
    assert main(["audit", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"- 3 entries; head `{heads[2]}`" in out and out.count("\n| ") == 4  # header + 3 rows
