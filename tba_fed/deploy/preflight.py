"""``tba-fed preflight CONFIG``: everything a site or the server needs before a run, checked now.

A site YAML (it has ``name``) gets: its profile and connection, the CA certificate, its key pair and
registration, the SuperLink's reachability, its model (the only one it serves) and weights, its data
(every image the run will read, at least the policy's minimum), its privacy policy and ledger, its
output directory. A run YAML gets: its profile and superlink section, the CA, the server certificate
and key, the database and output directories, the port, the sites' keys and registrations, the
model's weights. Each check is one `Check`; the CLI prints them and fails if any is a problem.
"""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, read_yaml, validate
from ..errors import TBAInputError
from ..fileio import check_output_dir, file_sha256
from ..images import ImageInfo
from ..privacy.ledger import PrivacyLedger
from ..privacy.site_state import open_state
from . import checks as c
from .checks import Check, note, ok, problem
from ..federation.config import FederatedRunConfig, SiteConfig
from .profile import run_errors, site_errors

DEFAULT_EXPIRY_DAYS = 30.0


def preflight(path: Path, kind: str | None = None, expiry_days: float = DEFAULT_EXPIRY_DAYS) -> list[Check]:
    try:
        raw = read_yaml(Path(path))
        kind = kind or ("site" if "name" in raw else "server")  # a site YAML names the site; a run YAML has no name
        config = validate(SiteConfig if kind == "site" else FederatedRunConfig, raw)
    except TBAInputError as err:
        return [c.from_error(err)]
    profile = _profile(config.profile, "profile" in raw)
    if isinstance(config, SiteConfig):
        return [ok("config", f"{path} is a valid site YAML ({config.name})"), profile, *site_preflight(config, expiry_days)]
    return [ok("config", f"{path} is a valid run YAML"), profile, *server_preflight(config, expiry_days)]


def _profile(profile: str, explicit: bool) -> Check:
    if profile == "production":
        return ok("profile", "production" + ("" if explicit else " (the default)"))
    return note("profile", "development: insecure settings are allowed; never use it with real patient data")


def site_preflight(site: SiteConfig, expiry_days: float) -> list[Check]:
    results = [c.from_error(err, "PROBLEM" if site.profile == "production" else "NOTE") for err in site_errors(site)]
    conn = site.connection
    if conn is not None:
        ca = conn.root_certificates
        if ca is not None:
            results += c.certificate_check("connection.root_certificates", ca, expiry_days, must_be_ca=True)
        if conn.auth_key is not None:
            results.append(c.auth_key_check("connection.auth_key", conn.auth_key))
        if ca is not None:
            reach = c.reachable("connection.superlink", conn.superlink, ca)
            results.append(reach)
            if conn.auth_key is not None:
                results += (c.registration_checks(conn.superlink, ca, {site.name: ("connection.auth_key",
                                                                                  Path(f"{conn.auth_key}.pub"))})
                            if not reach.problem else
                            [note("connection.auth_key", "registration not checked: the SuperLink is unreachable")])
    model = None
    if site.model is None:
        results.append(problem("model", "the site YAML has no model section: the site would serve whatever model a "
                                        "run names, and its weights cannot be checked nor its images read through the "
                                        "model's preprocessing",
                               "add the run's model section (name, kwargs, checkpoint, sha256): the site then serves "
                               "only that model"))
    else:
        weights = weights_check(site.model, site.profile)
        results.append(weights)
        if not weights.problem:
            from ..models import create_model

            try:
                model = create_model(site.model)
            except TBAInputError as err:
                results.append(c.from_error(err))
    results += (data_checks(site, model) if model is not None
                else [note("data", "not read: no usable model to preprocess the images with")])
    results += privacy_checks(site)
    results.append(c.writable_directory("output", site.output))
    return results


def server_preflight(config: FederatedRunConfig, expiry_days: float) -> list[Check]:
    results = [c.from_error(err) for err in run_errors(config)]
    sl = config.superlink
    if sl is not None:
        tls = sl.certificates
        if tls is not None:
            results += c.certificate_check("superlink.certificates.ca_certfile", tls.ca_certfile, expiry_days,
                                           must_be_ca=True)
            results += c.certificate_check("superlink.certificates.certfile", tls.certfile, expiry_days,
                                           ca_certfile=tls.ca_certfile, host=sl.address)
            results.append(c.server_key_check("superlink.certificates.keyfile", tls.keyfile, tls.certfile))
        if sl.database is not None:
            results.append(c.writable_directory("superlink.database", sl.database.parent))
        port, running = c.port_check(sl)
        results.append(port)
        if running and tls is not None:  # what the ServerApp will verify, and who may connect
            if sl.sites:
                results += c.registration_checks(sl.fleet_address, tls.ca_certfile,
                                                 {name: (f"superlink.sites.{name}", key) for name, key in sl.sites.items()},
                                                 complete=True)
            results += [check for check in c.live_superlink_checks(sl) if check.field != "superlink.certificates"]
        elif sl.sites:
            results += [c.public_key_check(f"superlink.sites.{name}", key) for name, key in sl.sites.items()]
            results.append(note("superlink.sites", "registrations not checked: no SuperLink is running on "
                                                   f"{sl.host}:{sl.port}",
                                "start it (tba-fed superlink) and run preflight again to check them"))
    results.append(weights_check(config.model, config.profile))
    results.append(output_check(config))
    if (dropout := secure_dropout_note(config)) is not None:
        results.append(dropout)
    return results


def secure_dropout_note(config: FederatedRunConfig) -> Check | None:
    """Under secure aggregation no sum over fewer than min_sites sites may be unmasked: with min_sites equal to
    num_sites, one site dropping out of the secure round ends the run."""
    fed = config.federation
    if config.privacy is None or config.privacy.aggregation != "secure" or fed.min_sites < fed.num_sites:
        return None
    return note("federation.min_sites", f"the noise is split over min_sites = {fed.min_sites} sites and SecAgg+ may "
                                        f"unmask no sum over fewer, so with {fed.num_sites} sites one dropout in the "
                                        "secure round ends the run",
                "to survive one dropout, run one site more than min_sites")


def output_check(config: FederatedRunConfig) -> Check:
    """The server's output directory can be written, and the run will not refuse it as an earlier output."""
    try:
        check_output_dir(config.output, kind="compressed", overwrite=config.overwrite)
    except TBAInputError as err:
        return c.from_error(err)
    return c.writable_directory("output", config.output)


def weights_check(model: ModelConfig, profile: str) -> Check:
    """The model's weights are present and are the bytes that were recorded."""
    if model.name == "dinov2-s-imgfocus":
        from ..dinov2_imgfocus import recorded_weights

        weights, recorded = recorded_weights()
        if not weights.is_file() or recorded is None:
            return problem("model", f"{weights} or its verification record is missing", "run tba-fed prepare")
        actual = file_sha256(weights)
        if actual != recorded:
            return problem("model", f"{weights} has sha256 {actual}, its conversion recorded {recorded}",
                           "run tba-fed prepare --force")
        return ok("model", f"{weights} matches the sha256 recorded at conversion ({recorded[:12]}…)")
    if model.checkpoint is not None:
        if not model.checkpoint.is_file():
            return problem("model.checkpoint", f"{model.checkpoint} does not exist", "copy the run's checkpoint here")
        actual = file_sha256(model.checkpoint)
        if model.sha256 is None:
            message = f"{model.checkpoint} is not pinned by a checksum"
            fix = f"add model.sha256: {actual}"
            return problem("model.sha256", message, fix) if profile == "production" else note("model.sha256", message, fix)
        if actual != model.sha256:
            return problem("model.sha256", f"{model.checkpoint} has sha256 {actual}, the config records {model.sha256}",
                           "restore the checkpoint the run was set up with")
        return ok("model.sha256", f"{model.checkpoint} matches its recorded sha256 ({actual[:12]}…)")
    if model.pretrained:
        return note("model.pretrained", f"timm hub weights of {model.name} are not pinned by a checksum",
                    "save them as a local checkpoint and set model.checkpoint and model.sha256")
    return note("model", f"{model.name} is a random initialisation (seed {model.seed}): no weights to check")


def data_checks(site: SiteConfig, model) -> list[Check]:
    """Build the site's dataset as a run would, select its images with the site's own key, read every selected
    one. Without a usable state (reported by the privacy check) every image is read instead. An image folder also
    reports the formats, bit depths and values found, and refuses a mix (`image_checks`)."""
    from ..data import build_dataset, calibration_split
    from ..federation.site import site_key

    try:
        dataset = build_dataset(site.data, model)
        try:
            key = site_key(site)
        except TBAInputError:
            key = None
        parts = calibration_split(dataset, site.data, key) if key is not None else None
    except TBAInputError as err:
        return [c.from_error(err)]
    except (OSError, ValueError) as err:
        return [problem("data", f"cannot read the {site.data.source} data ({type(err).__name__}: {err})",
                        "check data.source and data.path")]
    describe = getattr(dataset, "describe", None)  # an image folder says what each file holds
    found: list[tuple[str, ImageInfo]] = []
    for index in (i for part in parts for i in part.indices) if parts is not None else range(len(dataset)):
        try:
            if describe is not None:
                found.append((dataset.samples[index][0], describe(index)[1]))
            else:
                dataset[index]
        except TBAInputError as err:  # the data source names the file and the fix
            return [c.from_error(err)]
        except Exception as err:  # any other decoder error: the run would fail on this image
            files = getattr(dataset, "samples", None)  # an image folder names the file (decoders repeat it)
            what = f"{files[index][0]} ({type(err).__name__})" if files else \
                f"record {index} ({type(err).__name__}: {err})"
            return [problem("data", f"cannot read {what}", "remove or replace the file, or fix data.path")]
    images = image_checks(found) if found else []
    labels = ([note("data.labels", "a flat folder without class sub-folders: calibration needs no labels, the probe's "
                                   "accuracy (federated evaluation) does and will be refused",
                    "put the images in one sub-folder per class to measure accuracy")]
              if getattr(dataset, "unlabeled", False) else [])
    if parts is None:
        return [note("data", f"{len(dataset)} images read; which of them each release uses is decided with the site's "
                             "secret key, once its state is initialised", "tba-fed site init DIR (docs/deployment.md §3), "
                             "then preflight"),
                *images, *labels]
    calibration, holdout = parts
    minimum = site.privacy.min_images
    counts = {"calibration": len(calibration), **({"held-out": len(holdout)} if site.data.holdout_fraction > 0 else {})}
    if small := [f"{count} {name}" for name, count in counts.items() if count < minimum]:
        return [problem("data", f"{' and '.join(small)} images; every part a release summarises needs the privacy "
                                f"policy's min_images ({minimum})",
                        "add images (data.path), raise data.sample_rate, adjust data.holdout_fraction, or lower "
                        "privacy.min_images"), *images, *labels]
    return [ok("data", f"{len(calibration)} calibration and {len(holdout)} held-out images read "
                       f"(min_images {minimum} each)"), *images, *labels]


def image_checks(found: list[tuple[str, ImageInfo]]) -> list[Check]:
    """What the site's image files hold: one line per encoding (format, bit depth, values found, full scale).

    Mixed encodings are a problem: images whose values map to [0, 1] by different ranges (8-bit beside 16-bit,
    a 16-bit container beside a 12-bit DICOM), or DICOM (modality units, e.g. HU) beside display images (PNG,
    TIFF, JPEG, usually windowed exports), give the same tissue different inputs, and the fitted maps average
    two distributions without a word. Gray beside colour is not mixed: gray becomes three equal channels."""
    groups: dict[tuple, list[tuple[str, ImageInfo]]] = {}
    for path, info in found:
        groups.setdefault(info.encoding, []).append((path, info))
    ranked = sorted(groups.values(), key=len, reverse=True)
    if len(ranked) > 1:
        return [problem("data.images", "mixed encodings, the same intensity would reach the model as different values: "
                                       + "; ".join(f"{_group_text(m)} (e.g. {m[0][0]})" for m in ranked),
                        "convert the images to one format and bit depth, or give each kind its own site or run")]
    summary = _group_text(ranked[0])
    lo, hi = ranked[0][0][1].full_scale
    high = max(info.high for _, info in ranked[0])
    if high - lo < (hi - lo) / 8:  # e.g. 12-bit values in a 16-bit container: scaled by 65535, never stretched
        return [note("data.images", f"{summary}: the values use under 1/8 of the full scale, so the model sees "
                                    "low-contrast images (each file is scaled by its format's full scale, not by its "
                                    "content)",
                     "if these are 12-bit images in 16-bit files, store them scaled to 16 bits, or as DICOM with "
                     "BitsStored 12")]
    return [ok("data.images", summary)]


def _group_text(members: list[tuple[str, ImageInfo]]) -> str:
    kinds = " / ".join(sorted({info.kind for _, info in members}))
    lo, hi = members[0][1].full_scale
    return (f"{len(members)} {kinds} images, values {min(i.low for _, i in members):g}.."
            f"{max(i.high for _, i in members):g} of full scale {lo:g}..{hi:g}")


def privacy_checks(site: SiteConfig) -> list[Check]:
    """The policy can release something, and the ledger is whole and can be written (seeded noise: site_errors)."""
    assert site.privacy.ledger is not None
    return [budget_check(site), c.writable_directory("privacy.ledger", site.privacy.ledger.parent)]


def budget_check(site: SiteConfig) -> Check:
    """ε spent and left, from the site's own ledger (the one its state was initialised with), composed with
    the site's own accountant: a problem once the budget is spent (every private release would be refused)."""
    policy = site.privacy
    assert policy.ledger is not None
    try:
        if site.state is not None:
            open_state(site.state, site.name, policy.ledger)
        spent = PrivacyLedger(policy.ledger).spent(policy.delta, policy.accountant)
    except TBAInputError as err:
        return c.from_error(err)
    if spent >= policy.epsilon:
        return problem("privacy.epsilon", f"the budget is spent (ε {spent:.4f} of {policy.epsilon:g}): every private "
                                          "release will be refused",
                       "raising the budget is a governance decision, not a fix to make lightly")
    return ok("privacy", f"releases {', '.join(policy.releases)}; ε {spent:.4f} spent of {policy.epsilon:g}, "
                         f"{policy.epsilon - spent:.4f} left at δ={policy.delta:g} ({policy.accountant.upper()}, "
                         f"add/remove-one-image); min_images {policy.min_images}")
