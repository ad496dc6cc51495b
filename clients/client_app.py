"""Flower ClientApp of a tba-fed site: unpack a request, call tba_fed, pack the sums. A request the site cannot
serve is answered with a failure reply (`failures_as_replies`), never an exception."""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from tba_fed.compressed import build_compressed
from tba_fed.federation import app_logging
from tba_fed.federation.envelope import echo
from tba_fed.federation.records import from_record, to_record
from tba_fed.federation.secure_aggregation import register_secure_fit
from tba_fed.federation.site import (RunSpec, accuracy_reply, install, probe_reply, resolve_site, run_spec,
                                     secure_statistics, similarity_reply, site_model, statistics_reply)
from tba_fed.federation.site_audit import audited, audited_secure, failures_as_replies
from tba_fed.federation.wire import decode_heads, decode_maps, decode_priors
from tba_fed.plan import parse_plan

app = ClientApp()
app_logging()


def _setup(msg: Message, context: Context, release: str | None):
    config = msg.content.config_records["config"]
    model = site_model(context.node_config, config)  # profile and model admitted before any weight is loaded
    site = resolve_site(context.node_config, context.run_config, model, config, release)  # policy before any image
    return config, model, site


def _run(msg: Message, config) -> RunSpec:
    return run_spec(msg.metadata.run_id, dict(config))


def _reply(msg: Message, site_name: str, **records) -> Message:
    return Message(RecordDict({"meta": ConfigRecord({"site": site_name, **echo(msg)}), **records}), reply_to=msg)


@app.query("similarity", mods=[failures_as_replies])
@audited("similarity")
def similarity(msg: Message, context: Context) -> Message:
    config, model, site = _setup(msg, context, "similarity")
    return _reply(msg, site.name, similarity=to_record(similarity_reply(model, site, str(config["token-mode"]),
                                                                                _run(msg, config))))


@app.query("statistics", mods=[failures_as_replies])
@audited("statistics")
def statistics(msg: Message, context: Context) -> Message:
    config, model, site = _setup(msg, context, "statistics")
    plan = parse_plan(str(config["plan"]), len(model.blocks))
    priors = decode_priors(str(config["prior-maps"]), plan.spans, model.embed_dim) if config.get("prior-maps") else None
    return _reply(msg, site.name, statistics=to_record(statistics_reply(model, site, plan, str(config["token-mode"]),
                                                                        _run(msg, config), priors)))


def _compressed(msg: Message, config, model):
    plan = parse_plan(str(config["plan"]), len(model.blocks))
    identity = parse_plan(str(config["identity-spans"]), len(model.blocks)).spans if config["identity-spans"] else ()
    maps = decode_maps(from_record(msg.content.array_records["maps"]), plan.spans, identity, model.embed_dim)
    return maps, build_compressed(model, maps)


@app.query("probe", mods=[failures_as_replies])
@audited("probe")
def probe(msg: Message, context: Context) -> Message:
    config, model, site = _setup(msg, context, "probe")
    _, compressed = _compressed(msg, config, model)
    return _reply(msg, site.name, probe=to_record(probe_reply(model, compressed, site, int(config["num-classes"]),
                                                                      _run(msg, config))))


@app.evaluate("accuracy", mods=[failures_as_replies])
@audited("accuracy")
def evaluate_accuracy(msg: Message, context: Context) -> Message:
    config, model, site = _setup(msg, context, "accuracy")
    _, compressed = _compressed(msg, config, model)
    heads = decode_heads(from_record(msg.content.array_records["heads"]), int(model.num_features),
                         int(config["num-classes"]))
    return _reply(msg, site.name, accuracy=MetricRecord(accuracy_reply(model, compressed, site, heads, _run(msg, config))))


@app.train("install", mods=[failures_as_replies])
@audited("install")
def install_maps(msg: Message, context: Context) -> Message:
    config, model, site = _setup(msg, context, None)
    maps, _ = _compressed(msg, config, model)
    digest = install(model, site, maps, json.loads(str(config["report"])))
    return _reply(msg, site.name, install=ConfigRecord({"checksum": digest}))


# The statistics round under secure aggregation (legacy message type "train", SecAgg+ as a per-handler mod).
register_secure_fit(app, audited_secure(secure_statistics))
