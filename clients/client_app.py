"""Flower ClientApp of a tba-fed site: every request goes to tba_fed's one site handler (`site.serve`), under the
site's audit log. A request the site cannot serve is answered with a failure reply (`failures_as_replies`),
never an exception."""

from __future__ import annotations

from flwr.clientapp import ClientApp

from tba_fed.federation import logged
from tba_fed.federation.secure_aggregation import register_secure_fit
from tba_fed.federation.site import secure_statistics, serve
from tba_fed.federation.site_audit import audited, audited_secure, failures_as_replies

app = ClientApp(mods=[logged])  # tba-fed's logging in whichever process runs a handler

similarity = app.query("similarity", mods=[failures_as_replies])(audited("similarity", serve))
statistics = app.query("statistics", mods=[failures_as_replies])(audited("statistics", serve))
probe = app.query("probe", mods=[failures_as_replies])(audited("probe", serve))
evaluate_accuracy = app.evaluate("accuracy", mods=[failures_as_replies])(audited("accuracy", serve))
install_maps = app.train("install", mods=[failures_as_replies])(audited("install", serve))

# The statistics round under secure aggregation (legacy message type "train", SecAgg+ as a per-handler mod).
register_secure_fit(app, audited_secure(secure_statistics))
