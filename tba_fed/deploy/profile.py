"""The two profiles a federation runs in, and what each demands.

production (the default): the SuperLink serves TLS, only registered SuperNode keys may connect, and
its state persists in a database; a production config that lacks one of these refuses to start and
names the field. The ServerApp checks the running SuperLink itself before round 1, and a production
site serves only production runs. development: ``tba-fed simulate`` and local tests; insecure
settings exist only here. Nothing falls back from one profile to the other.
"""

from __future__ import annotations

from ..errors import TBAInputError
from .checks import live_superlink_checks, problems
from ..federation.config import ConnectionConfig, FederatedRunConfig, SiteConfig, SuperLinkConfig

OR_DEVELOPMENT = "or set profile: development for a simulation or a local test"


def run_errors(config: FederatedRunConfig) -> list[TBAInputError]:
    """Everything the run's profile requires (of its superlink section above all) that the config lacks."""
    found = []
    if config.profile == "production" and config.privacy is not None and config.privacy.seed is not None:
        found.append(TBAInputError("privacy.seed", "seeded noise is predictable: the production profile draws it from "
                                                   "the CSPRNG", f"remove privacy.seed, {OR_DEVELOPMENT}"))
    sl = config.superlink
    if sl is None:
        return [*found, TBAInputError("superlink", f"the {config.profile} profile needs a superlink section to start a "
                                                   "SuperLink", "add superlink: address, port, certificates, database, "
                                                                "node_auth, sites (docs/deployment.md)")]
    if config.profile == "production":
        if sl.certificates is None:
            found.append(TBAInputError("superlink.certificates", "the production profile needs TLS",
                                       "set certfile, keyfile and ca_certfile (scripts/make-certificates.sh writes "
                                       f"them), {OR_DEVELOPMENT}"))
        if not sl.node_auth:
            found.append(TBAInputError("superlink.node_auth", "the production profile needs SuperNode authentication "
                                                              "(--enable-supernode-auth)",
                                       f"set node_auth: true and list each site's public key under superlink.sites, "
                                       f"{OR_DEVELOPMENT}"))
        if sl.database is None:
            found.append(TBAInputError("superlink.database", "the production profile needs a persistent SuperLink state "
                                                             "(in memory, registrations and runs vanish on restart)",
                                       f"set database: /srv/tba-fed/superlink.db, {OR_DEVELOPMENT}"))
        if not sl.sites:
            found.append(TBAInputError("superlink.sites", "the production profile registers each site's public key; "
                                                          "none is listed",
                                       "add sites: {hospital-a: /path/hospital-a.key.pub, ...}"))
    elif sl.node_auth and sl.certificates is None:
        found.append(TBAInputError("superlink.node_auth", "SuperNode authentication needs TLS",
                                   "set superlink.certificates, or node_auth: false (development only)"))
    return found


def require_run(config: FederatedRunConfig) -> SuperLinkConfig:
    """The superlink section, if the run's profile requirements hold; else the first missing one, as an error."""
    if errors := run_errors(config):
        raise errors[0]
    assert config.superlink is not None
    return config.superlink


def site_errors(site: SiteConfig) -> list[TBAInputError]:
    """Everything the site's profile requires (of its connection section above all) that the config lacks."""
    found = []
    if site.profile == "production" and site.privacy.allow_seeded_noise:
        found.append(TBAInputError("privacy.allow_seeded_noise", "seeded noise is predictable: the production profile "
                                                                 "refuses it", f"set allow_seeded_noise: false, "
                                                                               f"{OR_DEVELOPMENT}"))
    conn = site.connection
    if conn is None:
        return [*found, TBAInputError("connection", f"the {site.profile} profile needs a connection section to start a "
                                                    "SuperNode", "add connection: superlink (host:port), "
                                                                 "root_certificates, auth_key (docs/deployment.md)")]
    if site.profile != "production":
        return found
    if conn.root_certificates is None:
        found.append(TBAInputError("connection.root_certificates", "the production profile needs TLS: the CA certificate "
                                                                   "that signed the SuperLink's certificate",
                                   f"set root_certificates: /path/ca.crt, {OR_DEVELOPMENT}"))
    if conn.auth_key is None:
        found.append(TBAInputError("connection.auth_key", "the production profile needs this site's registered "
                                                          "authentication key",
                                   f"set auth_key: /path/{site.name}.key (its .pub registered at the SuperLink), "
                                   f"{OR_DEVELOPMENT}"))
    return found


def require_site(site: SiteConfig) -> ConnectionConfig:
    if errors := site_errors(site):
        raise errors[0]
    assert site.connection is not None
    return site.connection


def development_run(config: FederatedRunConfig) -> FederatedRunConfig:
    """``tba-fed simulate`` is the development profile: a config that explicitly asks for production is
    refused rather than run without the guarantees it asked for."""
    if "profile" in config.model_fields_set and config.profile == "production":
        raise TBAInputError("profile", "tba-fed simulate runs Flower's simulation engine (no TLS, no SuperNode "
                                       "authentication, state in memory): it is the development profile, and this "
                                       "config says production",
                            "remove profile (or set profile: development) to simulate; deploy a production run with "
                            "tba-fed superlink, tba-fed supernode and tba-fed submit (docs/deployment.md)")
    return config.model_copy(update={"profile": "development"})


def verify_superlink(config: FederatedRunConfig) -> list[str]:
    """Before round 1 of a production run: the SuperLink the sites connect to really serves TLS with the
    configured CA, refuses unregistered SuperNodes and keeps its state in the configured database.
    Raises on the first problem; returns the checks' lines (for the report). A development run is not checked."""
    if config.profile != "production":
        return []
    checks = live_superlink_checks(require_run(config))
    if found := problems(checks):
        first = found[0]
        raise TBAInputError(first.field, f"production run refused: {first.message}", first.fix)
    return [check.line() for check in checks]
