"""Configuration of a federated run (server side) and of one site (its own YAML in deployment).

The schema lives here, with the protocol, not in `deploy`: it is the contract the protocol reads (the
server its plan, privacy, federation and evaluation sections, each site its policy and data), and the
protocol must not import `deploy`. Its deployment sections (`SuperLinkConfig`, `ConnectionConfig`) are
plain validated data; `deploy` gives them their meaning (profiles, processes, checks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from ..config import MAX_IMAGES, DataConfig, Device, ModelConfig, RunConfig, Seed, _Section, read_yaml, validate
from ..errors import TBAInputError
from ..plan import Plan, Span, parse_plan
from ..privacy.accounting import MAX_RUN_EPSILON
from ..privacy.policy import RELEASES, SitePolicy

SITE_AUDIT_FILE = "audit.jsonl"  # a site's audit log in its output folder, unless its YAML names another


Profile = Literal["production", "development"]
PROFILE_DOC = ("production (the default): TLS, registered SuperNode keys and a persistent SuperLink state are required "
               "and verified; development: simulations and local tests, insecure settings allowed")


class TLSFiles(_Section):
    """The SuperLink's TLS certificate and key, and the CA that signed it (scripts/make-certificates.sh)."""

    certfile: Path
    keyfile: Path
    ca_certfile: Path


class SuperLinkConfig(_Section):
    """How the server's flower-superlink runs (``tba-fed superlink RUN.yaml``) and what the ServerApp verifies."""

    address: str = Field(min_length=1, description="host name or IP the sites connect to; the certificate must cover it")
    host: str = Field("0.0.0.0", description="address flower-superlink binds")
    port: int = Field(9092, ge=1, le=65535)
    certificates: TLSFiles | None = Field(None, description="TLS (production: required)")
    database: Path | None = Field(None, description="persistent SuperLink state (production: required; "
                                                    "without it registrations and runs vanish on restart)")
    node_auth: bool = Field(True, description="only registered SuperNode keys may connect (production: required)")
    sites: dict[str, Path] = Field(default_factory=dict, description="site name -> its public key (.key.pub), "
                                                                       "registered when the SuperLink starts")

    @property
    def fleet_address(self) -> str:
        return f"{self.address}:{self.port}"


class ConnectionConfig(_Section):
    """How a site's flower-supernode reaches the SuperLink (``tba-fed supernode SITE.yaml``)."""

    superlink: str = Field(pattern=r"^\S+:\d+$", description="the SuperLink's address as host:port")
    root_certificates: Path | None = Field(None, description="the CA certificate (ca.crt); production: required")
    auth_key: Path | None = Field(None, description="this site's private key (OpenSSH EC, .pub beside it); "
                                                    "production: required")
    port: int | None = Field(None, ge=1, le=65535, description="local port of the SuperNode's runtime API "
                                                               "(each SuperNode on one machine needs its own)")


class PartitionConfig(_Section):
    """How a simulation splits one dataset into sites (deterministic given the seed)."""

    scheme: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_site: int = Field(2, ge=1)
    seed: Seed = 0


class FederationConfig(_Section):
    num_sites: int = Field(3, ge=1, description="simulated sites (SuperNodes)")
    partition: PartitionConfig = PartitionConfig()
    min_sites: int = Field(1, ge=1, description="the run fails if fewer sites reply validly in a round")
    min_images_per_site: int = Field(1, ge=1, description="replies summarising fewer images are rejected")
    round_timeout: float = Field(600.0, gt=0, description="seconds the server waits for replies in a round")
    psd_tolerance: float = Field(1e-9, ge=0, description="relative tolerance of the Gram PSD check")
    cpus_per_site: int = Field(1, ge=1, description="simulation: CPU cores reserved per site (sites beyond the "
                                                     "machine's cores wait their turn)")
    max_images_per_site: int = Field(100_000, ge=1, description="secure aggregation: fixed-point range of the sums")
    site_policy: SitePolicy = Field(
        SitePolicy(require_dp=False, epsilon=100.0, min_images=1, releases=RELEASES, allow_seeded_noise=True),
        description="simulation: every simulated site's privacy policy (deployments: each site's own YAML)")

    @model_validator(mode="after")
    def _enough_sites(self) -> FederationConfig:
        if self.min_sites > self.num_sites:
            raise TBAInputError("min_sites", f"{self.min_sites} exceeds num_sites ({self.num_sites})",
                                "lower min_sites or raise num_sites")
        return self


class EvaluationConfig(_Section):
    """Rounds 4-5: a closed-form probe for the original and the compressed model, fitted on the sites'
    calibration images, scored on their held-out images."""

    enabled: bool = False
    num_classes: int = Field(10, ge=2)
    probe_ridge: float = Field(1e-6, ge=0)


class PrivacyConfig(_Section):
    """Differential privacy of a run: what the server asks every site for (each site caps it)."""

    epsilon: float = Field(gt=0, le=MAX_RUN_EPSILON, description="ε of the whole run at each site (all its releases)")
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    aggregation: Literal["local", "secure"] = Field(
        "local", description="secure: SecAgg+ sums, each site adds σ/√min_sites of the noise")
    seed: int | None = Field(None, description="seeded noise (tests, simulations): not private; every site whose policy "
                                               "does not allow seeded noise refuses it, and the production profile "
                                               "refuses it outright")
    clip_scale: float = Field(1.0, gt=0, description="clipping bounds = this × the median norms on public photos")
    public_images: int = Field(336, ge=16, description="random crops of the bundled public photos (prior, clip bounds)")


class FederatedRunConfig(RunConfig):
    """A RunConfig plus the federation section; ``data`` is the pooled data a simulation partitions."""

    profile: Profile = Field("production", description=PROFILE_DOC)
    superlink: SuperLinkConfig | None = Field(None, description="deployment: the SuperLink (tba-fed superlink)")
    federation: FederationConfig = FederationConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    privacy: PrivacyConfig | None = None
    prior: Literal["zero", "identity", "public"] | None = Field(
        None, description="what the ridge shrinks maps toward: zero, identity (drop the blocks) or a map fitted on "
                          "public photos; default: public with privacy, zero without")
    output: Path = Path("outputs/federated")
    audit: Path | None = Field(None, description="the server's hash-chained audit log (JSON Lines); default "
                                                 "<output>.audit.jsonl beside the output directory")

    @property
    def prior_kind(self) -> str:
        """What the ridge shrinks maps toward: the setting, or its default (public with privacy, zero without)."""
        return self.prior or ("public" if self.privacy is not None else "zero")

    @property
    def audit_log(self) -> Path:
        """Beside the output, not in it: the output directory is replaced whole at the end of a run."""
        return self.audit or self.output.with_name(self.output.name + ".audit.jsonl")

    @model_validator(mode="after")
    def _secure_needs_sites(self) -> FederatedRunConfig:
        if self.privacy is not None and self.privacy.aggregation == "secure" and self.federation.min_sites < 2:
            raise TBAInputError("privacy.aggregation", "secure aggregation needs federation.min_sites >= 2 "
                                                       "(a SecAgg+ sum over one site is that site's data)",
                                "set federation.min_sites to 2 or more, or aggregation: local")
        if self.prior_kind == "public" and self.map == "auto":
            raise TBAInputError("prior", "public prior maps are fitted for one map kind, and map: auto fits two"
                                + (" (public is the default with privacy)" if self.prior is None else ""),
                                "set prior: identity or zero, or map: linear or folded")
        return self


class SiteDataConfig(DataConfig):
    """A site's own images: all of them, each used or held out by a decision about that image alone.

    ``num_images`` (a seeded subset of that many, picked by position among all the images) is refused: one
    added image would change which others are used. A site that wants fewer images sets ``sample_rate``.
    Synthetic data (tests) still names how many images to generate.
    """

    num_images: int | None = Field(None, ge=1, le=MAX_IMAGES, description="synthetic data only: images generated")

    @model_validator(mode="after")
    def _per_image(self) -> SiteDataConfig:
        if self.num_images is not None and self.source != "synthetic":
            raise TBAInputError("num_images", "a site decides for each image alone whether it is used; num_images picks "
                                              "a subset by position among all the images, so one added image would "
                                              "change which others are used",
                                "remove num_images; set sample_rate to use each image with that probability")
        return self


class SiteConfig(_Section):
    """One site's own settings (deployment: ``--node-config 'site-config="site.yaml"'``)."""

    name: str = Field(min_length=1)
    data: SiteDataConfig
    output: Path = Field(description="where this site writes its compressed model")
    device: Device = "cpu"
    privacy: SitePolicy = Field(description="this site's privacy policy: its caps hold whatever the server asks")
    profile: Profile = Field("production", description=PROFILE_DOC + "; the site serves only runs of its own profile")
    connection: ConnectionConfig | None = Field(None, description="deployment: the SuperNode's link to the SuperLink")
    model: ModelConfig | None = Field(None, description="the base model this site holds (the run's model): "
                                                        "preflight checks its weights and reads the data through it")
    audit: Path | None = Field(None, description="this site's hash-chained audit log of every request and release; "
                                                 "default <output>/audit.jsonl")
    state: Path | None = Field(None, description="this site's state directory: the secret keying its per-image "
                                                 "decisions and the marker of its ledger (tba-fed site init); "
                                                 "production: required")

    @property
    def audit_log(self) -> Path:
        """In the output folder, outside output/compressed (which install replaces whole)."""
        return self.audit or self.output / SITE_AUDIT_FILE

    @model_validator(mode="after")
    def _ledger(self) -> SiteConfig:
        if self.privacy.ledger is None:
            raise TBAInputError("privacy.ledger", "must be set: the file where this site records every release",
                                "e.g. ledger: /srv/tba-fed/privacy-ledger.json")
        if self.state is None and self.profile == "production":
            raise TBAInputError("state", "the production profile keeps a state directory: the secret that decides "
                                         "which images each release uses, and the marker that its ledger exists",
                                "run tba-fed site init DIR once: its site.yaml names the state it makes (docs/deployment.md §3)")
        return self


def load_federated_config(path: Path) -> FederatedRunConfig:
    return validate(FederatedRunConfig, read_yaml(path))


def load_site_config(path: Path) -> SiteConfig:
    return validate(SiteConfig, read_yaml(path))


def fixed_plan(config: RunConfig, num_blocks: int) -> tuple[Plan | None, tuple[Span, ...]]:
    """The run's plan (None: a budget chooses it from the sites' similarity) and its identity spans, checked
    against the model's depth before any site is asked for anything or any process is started."""
    identity = parse_plan(config.identity_spans, num_blocks, "identity_spans").spans if config.identity_spans else ()
    if config.plan is None:
        if config.budget is None:
            raise TBAInputError("plan", "give a plan or a budget", 'e.g. plan: "1->2" or budget: {blocks: 2}')
        return None, identity
    plan = parse_plan(config.plan, num_blocks)
    if unknown := [str(s) for s in identity if s not in plan.spans]:
        raise TBAInputError("identity_spans", f"{', '.join(unknown)} not in the plan {plan}")
    return plan, identity
