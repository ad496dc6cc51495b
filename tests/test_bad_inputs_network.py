"""Bad-input campaign (issue #6, point 5), part 3 of 3: network messages (see part 1 for the conventions).

Replies are corrupted at random (hypothesis) from valid encodings of every kind of reply a site sends
(exact span statistics, private span releases, similarity, probe); every mutation must be refused by the
decoder with the exact wire key as the field, so it can never be summed. The server loop
(`rounds.exchange`, `run_server` with the in-process grid of test_server_rounds.py) must reject replies
that do not answer the request they are taken for.

| #  | malformed message                                                   | refused as (field / reason)              |
|----|---------------------------------------------------------------------|------------------------------------------|
| 42 | wrong keys: a key dropped, renamed or added (4 reply kinds)         | statistics / similarity / probe          |
| 43 | wrong dtype: float32, float16, ints, complex, bool (4 reply kinds)  | KIND.KEY: dtype ..., expected float64    |
| 44 | wrong shape, any rank (4 reply kinds)                               | KIND.KEY: shape ...                      |
| 45 | NaN or ±Inf anywhere (4 reply kinds)                                | KIND.KEY: contains NaN or Inf            |
| 46 | huge values, 1e150 < abs <= float64 max (4 reply kinds)             | KIND.KEY: ... exceeds 1e+150             |
| 47 | negative or fractional counts (tokens, images)                      | KIND.KEY: ... not a non-negative integer |
| 48 | non-PSD Gram matrix (exact statistics and probe)                    | KIND.PREFIX/gram_triu                    |
| 49 | probe class counts negative, fractional or not summing to images    | probe.MODEL/class_counts                 |
| 50 | several of 42-46 at once                                            | the first offending key                  |
| 51 | duplicate replies from one node                                     | duplicate reply (all its replies)        |
| 52 | a reply answering another round                                     | meta.round                               |
| 53 | a reply answering another run                                       | meta.run-id                              |
| 54 | a reply without meta, or meta without the echo                      | meta / meta.round                        |
| 55 | two nodes claiming one site name                                    | meta.site (the second)                   |
| 56 | accuracy counts negative, fractional or above the total             | accuracy                                 |
| 57 | install checksum of other maps                                      | install.checksum                         |
| 58 | probe heads from the server: wrong key, shape, dtype, NaN, huge     | heads.MODEL/weight, ...                  |
| 59 | maps from the server: missing, extra key, shape, dtype, NaN         | maps.span.S-E.weight, ...                |
| 60 | prior maps text: not JSON, bad base64, wrong length, unknown span   | prior-maps, prior-maps.span.S-E.weight   |
| 61 | privacy request: not JSON, unknown key, ε <= 0, Inf clip, repeats   | privacy, privacy.epsilon, ...            |
| 62 | another model than the site declares: name, kwargs, pretrained,     | model (before any weight, image, budget) |
|    | checkpoint, sha256 other or dropped, seed of a random init          |                                          |
| 63 | model text in a request: not JSON, unknown key, empty name, bad pin | model, model.NAME, model.sha256          |

Also covered elsewhere: faulty sites excluded from a run (test_server_rounds.py), 62 through the ClientApp
with its audit log, ledger and output (test_site_model.py).
"""

from __future__ import annotations

import base64
import gc
import json
import re
import weakref
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from tba_fed import LinearMap, ModelConfig, Span, ViTAdapter, solve_plan
from tba_fed.calibrate import collect_span_stats
from tba_fed.federation.config import load_federated_config
from tba_fed.federation.envelope import echo
from tba_fed.federation.records import to_record
from tba_fed.federation.flower_internals import NodeInfo
from tba_fed.federation.rounds import RoundLog, Rounds, exchange
from tba_fed.federation.server import run_server
from tba_fed.federation.site import cached_model
from tba_fed.federation.site_context import SiteContext
from tba_fed.federation.site_admission import admitted_model
from tba_fed.federation.wire import (decode_heads, decode_maps, decode_priors, decode_private_spans, decode_probe,
                                     decode_similarity, decode_spans, encode_heads, encode_maps, encode_priors,
                                     encode_probe, encode_similarity, encode_spans, private_span_shapes, unpack_symmetric)
from tba_fed.plan import parse_plan
from tba_fed.privacy.policy import PrivacyRequest
from tba_fed.probe import ProbeHead, ProbeStats
from tba_fed.stats import SimilarityStats, SpanStats

from answering_grid import AnsweringGrid
from cluster import assert_maps_equal
from conftest import TINY, loader
from refusal import refused
from test_server_rounds import InProcessGrid, server_identity  # noqa: F401 - the fixture gives messages a run id

DIM, CLASSES, BLOCKS = 4, 3, 4
SPANS = (Span(0, 1), Span(2, 3))
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)  # reproducible, writes nothing


def _rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@cache
def _valid(kind: str) -> dict[str, np.ndarray]:
    """A valid encoded reply of each kind, tiny (dim 4), from real accumulators."""
    if kind == "statistics":
        per_split = {}
        for i, split in enumerate(("calibration", "holdout")):
            per_split[split] = {}
            for span in SPANS:
                acc = SpanStats.zeros(DIM)
                x = torch.randn(12, DIM, generator=_rng(i * 10 + span.start), dtype=torch.float64)
                acc.update(x, x @ torch.randn(DIM, DIM, generator=_rng(7), dtype=torch.float64), images=3)
                per_split[split][span] = acc
        return encode_spans(per_split)
    if kind == "private":
        gen = np.random.default_rng(0)
        return {k: gen.standard_normal(shape) for k, shape in private_span_shapes(SPANS, DIM).items()}
    if kind == "similarity":
        acc = SimilarityStats.zeros(BLOCKS)
        acc.update([torch.randn(10, DIM, generator=_rng(b)) for b in range(BLOCKS)], images=2)
        return encode_similarity(acc)
    stats = {}
    for which, seed in (("original", 1), ("compressed", 2)):
        acc = ProbeStats.zeros(DIM, CLASSES)
        acc.update(torch.randn(9, DIM, generator=_rng(seed)), torch.arange(9) % CLASSES)
        stats[which] = acc
    return encode_probe(stats)


DECODERS = {
    "statistics": lambda a: decode_spans(a, SPANS, DIM),
    "private": lambda a: decode_private_spans(a, SPANS, DIM),
    "similarity": lambda a: decode_similarity(a, BLOCKS),
    "probe": lambda a: decode_probe(a, DIM, CLASSES),
}
FIELD_PREFIX = {"statistics": "statistics", "private": "statistics", "similarity": "similarity", "probe": "probe"}
COUNT_KEYS = {kind: [k for k in _valid(kind) if k.rsplit("/", 1)[-1] in ("tokens", "images")]
              for kind in ("statistics", "similarity", "probe")}
DTYPES = [np.float32, np.float16, np.int64, np.int32, np.uint8, np.complex128, np.bool_]
HUGE = st.floats(min_value=1.0001e150, max_value=np.finfo(np.float64).max) | st.floats(
    max_value=-1.0001e150, min_value=-np.finfo(np.float64).max)


def test_every_valid_reply_decodes():
    """The control: what the mutations start from is accepted."""
    for kind, decode in DECODERS.items():
        decode(dict(_valid(kind)))


@st.composite
def corrupted(draw, kind: str, mutation: str, avoid: frozenset[str] = frozenset()):
    """(arrays, the field the refusal must name, a fragment of its message, the key touched) after one `mutation`."""
    arrays = {k: v.copy() for k, v in _valid(kind).items()}
    prefix = FIELD_PREFIX[kind]
    key = draw(st.sampled_from(sorted(set(arrays) - avoid)))
    if mutation == "keys":
        how = draw(st.sampled_from(["drop", "rename", "add"]))
        if how == "drop":
            del arrays[key]
            return arrays, prefix, f"missing keys ['{key}']", key
        if how == "rename":
            new = key + draw(st.sampled_from(["_", ".bak", "/0", " "]))
            arrays[new] = arrays.pop(key)
            return arrays, prefix, f"missing keys ['{key}'], unexpected keys ['{new}']", key
        new = draw(st.text("abcxyz/_-.", min_size=1, max_size=12).filter(lambda k: k not in arrays))
        arrays[new] = np.zeros(draw(st.integers(0, 3)))
        return arrays, prefix, f"unexpected keys ['{new}']", new
    value = arrays[key]
    if mutation == "dtype":
        dtype = np.dtype(draw(st.sampled_from(DTYPES)))
        arrays[key] = value.astype(dtype)
        return arrays, f"{prefix}.{key}", f"dtype {dtype}, expected float64", key
    if mutation == "shape":
        shape = draw(st.lists(st.integers(0, 5), max_size=3).map(tuple).filter(lambda s: s != value.shape))
        arrays[key] = np.zeros(shape)
        return arrays, f"{prefix}.{key}", f"shape {shape}, expected {value.shape}", key
    flat = value.reshape(-1).copy()
    index = draw(st.integers(0, flat.size - 1))
    if mutation == "nonfinite":
        flat[index] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        message = "contains NaN or Inf"
    elif mutation == "huge":
        flat[index] = draw(HUGE)
        message = "exceeds 1e+150"
    else:
        raise ValueError(mutation)
    arrays[key] = flat.reshape(value.shape)
    return arrays, f"{prefix}.{key}", message, key


@pytest.mark.parametrize("kind", list(DECODERS))
@pytest.mark.parametrize("mutation", ["keys", "dtype", "shape", "nonfinite", "huge"])  # 42-46
def test_42_46_every_corruption_of_a_reply_is_refused_naming_the_key(kind, mutation):
    @PROPERTY
    @given(case=corrupted(kind, mutation))
    def check(case):
        arrays, field, message, _ = case
        with refused(field, fds=False) as err:
            DECODERS[kind](arrays)
        assert message in str(err.value)

    check()


@pytest.mark.parametrize("kind", list(COUNT_KEYS))
@PROPERTY
@given(data=st.data())
def test_47_negative_or_fractional_counts_are_refused(kind, data):
    arrays = dict(_valid(kind))
    key = data.draw(st.sampled_from(COUNT_KEYS[kind]))
    count = data.draw(st.integers(-10**9, -1).map(float) | st.floats(0.001, 1e6).filter(lambda c: c != int(c)))
    arrays[key] = np.array([count])
    with refused(f"{FIELD_PREFIX[kind]}.{key}", fds=False) as err:
        DECODERS[kind](arrays)
    assert f"count {count} is not a non-negative integer" in str(err.value)


@pytest.mark.parametrize("kind", ["statistics", "probe"])
@PROPERTY
@given(data=st.data())
def test_48_a_gram_that_is_not_positive_semi_definite_is_refused(kind, data):
    """G - t v vᵀ with vᵀ(G - t v vᵀ)v < 0: an eigenvalue far below -1e-9 λmax, so no tolerance saves it."""
    arrays = dict(_valid(kind))
    key = data.draw(st.sampled_from([k for k in arrays if k.endswith("gram_triu")]))
    gram = unpack_symmetric(arrays[key], key)
    v = np.array(data.draw(st.lists(st.floats(-1, 1), min_size=DIM, max_size=DIM).filter(
        lambda xs: np.linalg.norm(xs) > 0.1)))
    v /= np.linalg.norm(v)
    margin = data.draw(st.floats(1e-6, 10.0))
    t = v @ gram @ v + margin * (1 + np.linalg.eigvalsh(gram)[-1])
    arrays[key] = (gram - t * np.outer(v, v))[np.triu_indices(DIM)]
    with refused(f"{FIELD_PREFIX[kind]}.{key}", fds=False) as err:
        DECODERS[kind](arrays)
    assert "not positive semi-definite" in str(err.value)


@PROPERTY
@given(data=st.data())
def test_49_probe_class_counts_must_be_integers_summing_to_the_images(data):
    arrays = dict(_valid("probe"))
    which = data.draw(st.sampled_from(["original", "compressed"]))
    counts = arrays[f"{which}/class_counts"].copy()
    index = data.draw(st.integers(0, CLASSES - 1))
    counts[index] = data.draw(st.sampled_from([-counts[index] - 1, counts[index] + 0.5, counts[index] + 1]))
    arrays[f"{which}/class_counts"] = counts
    with refused(f"probe.{which}/class_counts", fds=False) as err:
        DECODERS["probe"](arrays)
    assert f"are not non-negative integers summing to the {int(arrays[f'{which}/images'][0])} images" in str(err.value)


@pytest.mark.parametrize("kind", list(DECODERS))
@PROPERTY
@given(data=st.data())
def test_50_several_corruptions_at_once_are_refused(kind, data):
    """Mutations stacked on distinct keys: refused, naming one of the keys they touched (or the key set)."""
    arrays, used, fields = dict(_valid(kind)), set(), set()
    for mutation in data.draw(st.lists(st.sampled_from(["dtype", "shape", "nonfinite", "huge"]), min_size=2, max_size=4)):
        mutated, field, _, key = data.draw(corrupted(kind, mutation, avoid=frozenset(used)))
        arrays[key], fields = mutated[key], fields | {field}
        used.add(key)
    with pytest.raises(Exception) as err:
        DECODERS[kind](arrays)
    assert type(err.value).__name__ == "TBAInputError" and err.value.field in fields


# ------------------------------------------------------------------------------------ the server's loop

def _reply(node: int, content: RecordDict):
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda: False, content=content)


class ScriptedGrid(AnsweringGrid):
    """Answers every message with what `script(node, msg)` returns: a list of replies (real sites' encodings)."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def answer(self, messages):
        return [reply for msg in messages for reply in self.script(msg.metadata.dst_node_id, msg)]


def _statistics_reply(node: int, msg, **meta):
    """A valid statistics reply from site `node`, its meta echo overridden by `meta` (None removes a key)."""
    record = {"site": f"site-{node}", **echo(msg), **meta}
    return _reply(node, RecordDict({"meta": ConfigRecord({k: v for k, v in record.items() if v is not None}),
                                    "statistics": to_record(_valid("statistics"))}))


def _exchange(answer, nodes=(1, 2, 3), names=None) -> tuple[dict, RoundLog]:
    log = RoundLog("statistics", names if names is not None else {})
    accepted = exchange(ScriptedGrid(answer), list(nodes), "query.statistics",
                        lambda: RecordDict({"config": ConfigRecord({"plan": "0->1, 2->3"})}),
                        lambda content: decode_spans({k: v.numpy() for k, v in content.array_records["statistics"].items()},
                                                     SPANS, DIM), log, timeout=5, min_sites=1)
    return accepted, log


def test_51_every_reply_of_a_node_that_answered_twice_is_discarded():
    accepted, log = _exchange(lambda node, msg: [_statistics_reply(node, msg)] * (2 if node == 2 else 1))
    assert sorted(accepted) == ["site-1", "site-3"] and log.nodes == [1, 3]
    assert log.sites["site-2"]["status"] == "rejected"
    assert log.sites["site-2"]["reason"] == "duplicate reply: 2 replies to one request, all discarded"


def test_the_server_holds_one_sites_reply_at_a_time():
    """Each reply is judged and dropped before the next is pulled, so a decode that folds it into a running
    total leaves no reply alive (113 MB each at ViT-B width: docs/benchmarks.md)."""
    alive_at_decode = []
    seen: list[weakref.ref] = []

    def decode(content):
        gc.collect()
        alive_at_decode.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(content))
        return 1

    log = RoundLog("statistics", {})
    accepted = exchange(ScriptedGrid(lambda node, msg: [_statistics_reply(node, msg)]), [1, 2, 3, 4], "query.statistics",
                        lambda: RecordDict({"config": ConfigRecord({"plan": "0->1, 2->3"})}), decode, log, timeout=5,
                        min_sites=1)
    assert sorted(accepted) == ["site-1", "site-2", "site-3", "site-4"]
    assert alive_at_decode == [0, 0, 0, 0]  # no earlier reply outlives its judging


@pytest.mark.parametrize("meta,reason", [
    ({"round": "similarity"}, "meta.round: the reply answers round 'similarity', this request is 'statistics'"),  # 52
    ({"run-id": 99}, "meta.run-id: the reply answers run-id 99, this request is 1"),                            # 53
    ({"round": None}, "meta.round: missing: the reply does not say which request it answers "                   # 54
                      "(update the site to this version of tba-fed)"),
])
def test_52_54_a_reply_for_another_round_or_run_is_rejected(meta, reason):
    accepted, log = _exchange(lambda node, msg: [_statistics_reply(node, msg, **(meta if node == 3 else {}))])
    assert sorted(accepted) == ["site-1", "site-2"] and log.nodes == [1, 2]
    assert log.sites["site-3"] | {"bytes_sent": 0} == {"node_id": 3, "bytes_sent": 0, "status": "rejected", "reason": reason}


def test_54_a_reply_without_meta_is_rejected():
    def answer(node, msg):
        if node != 3:
            return [_statistics_reply(node, msg)]
        return [_reply(node, RecordDict({"statistics": to_record(_valid("statistics"))}))]

    accepted, log = _exchange(answer)
    assert sorted(accepted) == ["site-1", "site-2"]
    assert log.sites["node-3"]["reason"] == "meta: the reply carries no meta record (sites must answer with tba-fed's ClientApp)"


def test_55_a_second_node_claiming_a_site_name_is_rejected():
    accepted, log = _exchange(lambda node, msg: [_statistics_reply(node, msg, site="hospital-a" if node < 3 else "b")])
    assert sorted(accepted) == ["b", "hospital-a"] and log.nodes == [1, 3]
    assert log.sites["hospital-a"]["node_id"] == 1 and log.sites["node-2"]["status"] == "rejected"
    assert log.sites["node-2"]["reason"] == ("meta.site: 'hospital-a' is already the name of another site "
                                             "(give every site a unique name in its site YAML)")


def test_55_a_round_names_sites_by_their_registered_names_and_refuses_a_node_claiming_one(caplog):
    """Before a site replies, a round names it as the SuperLink registered it (`tba-fed superlink` registers each
    key under the site's name in the run YAML), not by its node id; a node that claims another node's registered
    name is rejected even if it replies first."""
    class RegisteredSites(ScriptedGrid):
        def get_nodes(self):
            return [NodeInfo(node_id=1, name="hospital-a"), NodeInfo(node_id=2), NodeInfo(node_id=3, name="hospital-c"),
                    NodeInfo(node_id=9, name="not-in-this-run")]

    claims = {1: "hospital-a", 2: "hospital-c", 3: "c"}  # node 2 claims node 3's registered name
    grid = RegisteredSites(lambda node, msg: [_statistics_reply(node, msg, site=claims[node])])
    rounds = Rounds(grid, [1, 2, 3], timeout=5, min_sites=1, audit=None)
    assert rounds.names == {1: "hospital-a", 3: "hospital-c"}
    caplog.set_level("INFO", "tba_fed.federation.delivery")
    accepted = rounds.ask("statistics", "query.statistics", lambda: RecordDict({"config": ConfigRecord({"plan": "0->1, 2->3"})}),
                          lambda content: 1)
    assert sorted(accepted) == ["c", "hospital-a"] and rounds.nodes == [1, 3]
    log = rounds.logs[-1]
    assert log.sites["node-2"]["status"] == "rejected" and "'hospital-c' is already the name of another site" in \
        log.sites["node-2"]["reason"]
    lines = [re.sub(r"\d+ s left", "N s left", r.getMessage()) for r in caplog.records
             if r.getMessage().startswith("statistics:")]
    assert lines == ["statistics: 1/3 sites replied, waiting for node-2, hospital-c, N s left",
                     "statistics: 2/3 sites replied, waiting for hospital-c, N s left", "statistics: 3/3 sites replied"], lines


MODEL = ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY)


class MisbehavingGrid(InProcessGrid):
    """The in-process sites, with some replies tampered with after the real site functions produced them:
    node 3 answers the statistics round twice, node 4 with an echo of another round, node 5 of another run;
    node 5 sends impossible accuracy counts, node 6 claims to have installed other maps."""

    def answer(self, messages):
        replies = []
        for reply in super().answer(messages):
            node, content = reply.metadata.src_node_id, reply.content
            meta = content.config_records["meta"]
            if "statistics" in content.array_records:
                if node == 3:
                    replies.append(reply)
                meta.update({4: {"round": "install"}}.get(node, {}))
            if node == 5 and "accuracy" in content.metric_records:
                content["accuracy"] = MetricRecord({"original_correct": 5, "compressed_correct": -1, "total": 4})
            if node == 6 and "install" in content.config_records:
                content.config_records["install"]["checksum"] = "0" * 64
            replies.append(reply)
        return replies


def test_51_52_56_57_a_run_excludes_misbehaving_sites_and_sums_only_the_valid_ones(tmp_path):
    grid = MisbehavingGrid(tmp_path, {node: "good" for node in range(1, 7)}, images=8)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": MODEL.model_dump(mode="json"), "plan": "1->2, 3->5",
                                    "federation": {"num_sites": 6, "min_sites": 2, "round_timeout": 5},
                                    "evaluation": {"enabled": True}, "output": str(tmp_path / "server")}))
    report = run_server(grid, load_federated_config(path))
    rounds = {r["name"]: r["sites"] for r in report["federation"]["rounds"]}
    reasons = {site: entry.get("reason") for site, entry in rounds["statistics"].items() if entry["status"] != "ok"}
    assert reasons == {"site-3": "duplicate reply: 2 replies to one request, all discarded",
                       "site-4": "meta.round: the reply answers round 'install', this request is 'statistics'"}
    assert rounds["install"]["site-6"]["status"] == "rejected"
    assert rounds["install"]["site-6"]["reason"].startswith("install.checksum: site installed maps with sha256 000000000000…")
    assert rounds["accuracy"]["site-5"]["reason"] == ("accuracy: counts must be integers with 0 <= correct <= total, got "
                                                      "{'original_correct': 5, 'compressed_correct': -1, 'total': 4}")
    assert {s for s, e in rounds["accuracy"].items() if e["status"] == "ok"} == {"site-1", "site-2"}
    # the maps are the closed form of exactly the sites whose statistics were accepted: 1, 2, 5, 6
    model = cached_model(MODEL.model_dump_json())
    batches = [b for node in (1, 2, 5, 6) for b in loader(8, seed=node)]
    plan = parse_plan("1->2, 3->5", 6)
    central = solve_plan(collect_span_stats(ViTAdapter(model), batches, plan.spans), bias=True)
    assert_maps_equal(tmp_path / "server", central)
    assert report["evaluation"]["test_images"] == 16


# ------------------------------------------------------------------------------- the server's requests

def _heads():
    gen = np.random.default_rng(3)
    return encode_heads({which: ProbeHead(torch.from_numpy(gen.standard_normal((CLASSES, DIM))),
                                          torch.from_numpy(gen.standard_normal(CLASSES)))
                         for which in ("original", "compressed")})


@pytest.mark.parametrize("corrupt,field,message", [
    (lambda a: a.pop("compressed/bias"), "heads", "missing keys ['compressed/bias']"),
    (lambda a: a.update({"original/weight": np.zeros((DIM, CLASSES))}), "heads.original/weight", "shape (4, 3), expected (3, 4)"),
    (lambda a: a.update({"compressed/weight": a["compressed/weight"].astype(np.float32)}), "heads.compressed/weight",
     "dtype float32"),
    (lambda a: a["original/bias"].__setitem__(1, np.nan), "heads.original/bias", "contains NaN or Inf"),
    (lambda a: a["original/bias"].__setitem__(0, -1e200), "heads.original/bias", "exceeds 1e+150"),
])
def test_58_malformed_probe_heads_are_refused_by_the_site(corrupt, field, message):
    arrays = _heads()
    decode_heads(dict(arrays), DIM, CLASSES)
    corrupt(arrays)
    with refused(field) as err:
        decode_heads(arrays, DIM, CLASSES)
    assert message in str(err.value)


def _maps():
    gen = np.random.default_rng(4)
    return {s: LinearMap(torch.from_numpy(gen.standard_normal((DIM, DIM))), torch.from_numpy(gen.standard_normal(DIM)))
            for s in SPANS}


@pytest.mark.parametrize("corrupt,field,message", [
    (lambda a: a.pop("span.2-3.weight"), "maps", "missing keys ['span.2-3.weight']"),
    (lambda a: a.update({"span.4-5.weight": np.eye(DIM)}), "maps", "unexpected keys ['span.4-5.weight']"),
    (lambda a: a.pop("span.0-1.bias"), "maps", "missing keys ['span.0-1.bias']"),  # bias on some spans only
    (lambda a: a.update({"span.0-1.weight": np.eye(DIM + 1)}), "maps.span.0-1.weight", "shape (5, 5), expected (4, 4)"),
    (lambda a: a.update({"span.2-3.bias": a["span.2-3.bias"].astype(np.int64)}), "maps.span.2-3.bias", "dtype int64"),
    (lambda a: a["span.0-1.weight"].__setitem__((0, 0), np.inf), "maps.span.0-1.weight", "contains NaN or Inf"),
])
def test_59_malformed_maps_are_refused_by_the_site(corrupt, field, message):
    arrays = encode_maps(_maps())
    assert decode_maps(dict(arrays), SPANS, (), DIM).keys() == set(SPANS)
    corrupt(arrays)
    with refused(field) as err:
        decode_maps(arrays, SPANS, (), DIM)
    assert message in str(err.value)


def _prior_text(edit) -> str:
    raw = json.loads(encode_priors(_maps()))
    edit(raw)
    return json.dumps(raw)


@pytest.mark.parametrize("text,field,message", [
    ("{not json", "prior-maps", "not a valid encoding of prior maps"),
    (_prior_text(lambda r: r["span.0-1.weight"].__setitem__(1, "@@not base64@@")), "prior-maps",
     "not a valid encoding of prior maps"),
    (_prior_text(lambda r: r["span.0-1.weight"].__setitem__(0, [DIM, DIM + 1])), "prior-maps",
     "not a valid encoding of prior maps (cannot reshape array of size 16 into shape (4,5))"),
    (_prior_text(lambda r: r.update({"span.7-8.bias": r["span.0-1.bias"]})), "prior-maps",
     "unexpected keys ['span.7-8.bias']"),
    (_prior_text(lambda r: r["span.2-3.weight"].__setitem__(0, [2, 8])), "prior-maps.span.2-3.weight",
     "shape (2, 8), expected (4, 4)"),
    (_prior_text(lambda r: r["span.2-3.bias"].__setitem__(1, base64.b64encode(np.full(DIM, np.nan).tobytes()).decode())),
     "prior-maps.span.2-3.bias", "contains NaN or Inf"),
])
def test_60_malformed_prior_maps_text_is_refused_by_the_site(text, field, message):
    with refused(field) as err:
        decode_priors(text, SPANS, DIM)
    assert message in str(err.value)


VALID_REQUEST = PrivacyRequest(epsilon=1.0, delta=1e-5, releases=("statistics",)).to_json()


@pytest.mark.parametrize("text,field,message", [
    ("{'epsilon': 1}", "privacy", "Invalid JSON"),
    (VALID_REQUEST.replace('"epsilon"', '"epsilom"'), "privacy.epsilom", "unknown key"),
    (VALID_REQUEST.replace('"epsilon":1.0', '"epsilon":0.0'), "privacy.epsilon", "Input should be greater than 0"),
    (VALID_REQUEST.replace('"clip_features":null', '"clip_features":Infinity'), "privacy.clip_features",
     "Input should be a finite number"),
    (VALID_REQUEST.replace('["statistics"]', '["statistics","statistics"]'), "privacy.releases", "releases must not repeat"),
    (VALID_REQUEST.replace('"delta":0.00001', '"delta":"tiny"'), "privacy.delta", "Input should be a valid number"),
])
def test_61_malformed_privacy_request_is_refused_by_the_site(text, field, message):
    assert PrivacyRequest.from_json(VALID_REQUEST).epsilon == 1.0
    with refused(field) as err:
        PrivacyRequest.from_json(text)
    assert message in str(err.value)


# ------------------------------------------------------------------------------- the model a request names

PIN = {"checkpoint": "/models/vit.safetensors", "sha256": "a" * 64}
DECLARED = {"name": "vit_tiny_patch16_224", "kwargs": TINY}


def _site_yaml(tmp_path, model: dict):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"name": "hospital-a", "output": str(tmp_path / "out"),
                                    "data": {"source": "image_folder", "path": str(tmp_path / "images")},
                                    "privacy": {"ledger": str(tmp_path / "ledger.json")}, "model": model,
                                    "state": str(tmp_path / "state")}))  # admission reads no state
    return {"site-config": str(path)}


@pytest.mark.parametrize("declared,asked,difference", [
    (DECLARED, {"name": "vit_small_patch16_224"}, 'name "vit_small_patch16_224" requested, "vit_tiny_patch16_224"'),
    (DECLARED, {"kwargs": {**TINY, "num_classes": 10}}, '"num_classes": 10, "num_heads": 3, "patch_size": 8} requested'),
    (DECLARED, {"kwargs": {k: v for k, v in TINY.items() if k != "depth"}}, '{"embed_dim": 48, "img_size": 32, "num'),
    (DECLARED, {"pretrained": True}, "pretrained true requested, false declared"),
    (DECLARED, {"seed": 1}, "seed 1 requested, 0 declared"),
    (DECLARED, PIN, 'checkpoint "/models/vit.safetensors" requested, null declared; sha256 "aaaa'),
    ({**DECLARED, **PIN}, {"sha256": "b" * 64}, f'sha256 "{"b" * 64}" requested, "{"a" * 64}" declared'),
    ({**DECLARED, **PIN}, {"sha256": None}, f'sha256 null requested, "{"a" * 64}" declared'),
    ({**DECLARED, **PIN}, {"checkpoint": None, "sha256": None}, 'checkpoint null requested, "/models/vit.safetensors"'),
    ({**DECLARED, "checkpoint": "/models/vit.safetensors"}, {"checkpoint": "/srv/vit.safetensors"},  # unpinned: the path
     'checkpoint "/srv/vit.safetensors" requested, "/models/vit.safetensors" declared'),
])
def test_62_a_request_for_another_model_than_the_site_declares_is_refused(tmp_path, declared, asked, difference):
    node = _site_yaml(tmp_path, declared)
    with refused("model", untouched=[tmp_path]) as err:
        admitted_model(SiteContext(node, {}), {"model": json.dumps({**declared, **asked}), "profile": "production"})
    assert str(err.value).startswith("model: hospital-a serves only the model its site YAML declares, and this run asks "
                                     "for another: ") and difference in str(err.value)
    assert admitted_model(SiteContext(node, {}), {"model": json.dumps(declared), "profile": "production"}) \
        == ModelConfig(**declared)


@pytest.mark.parametrize("text,field,message", [
    ("{not json", "model", "Invalid JSON"),
    ('{"name": "vit_tiny_patch16_224", "kwarg": {}}', "model.kwarg", "unknown key"),
    ('{"name": ""}', "model.name", "String should have at least 1 character"),
    ('{"name": "vit_tiny_patch16_224", "sha256": "abc"}', "model.sha256", "String should match pattern"),
    ('{"name": "vit_tiny_patch16_224", "sha256": "' + "a" * 64 + '"}', "model.sha256", "pins a checkpoint file"),
])
def test_63_malformed_model_text_is_refused_by_the_site(tmp_path, text, field, message):
    node = _site_yaml(tmp_path, DECLARED)
    with refused(field, untouched=[tmp_path]) as err:
        admitted_model(SiteContext(node, {}), {"model": text, "profile": "production"})
    assert message in str(err.value)
    simulated = {"partition-id": 0}  # a simulated site (no model section) validates the text just the same
    with refused(field):
        admitted_model(SiteContext(simulated, {}), {"model": text, "profile": "development"})
