"""What a site agrees to serve, decided from its YAML and the request alone: the run's profile and its model.

The ClientApp asks this before it builds any model, reads any image or touches the privacy ledger, so a
refused request costs nothing and spends nothing; the audit log records the refusal like any other.

A site whose YAML declares ``model:`` serves only that model, and builds it from its own YAML (its own
checkpoint path), never from the request. A request is refused if it differs in anything that changes
the computation:

- ``name``, ``kwargs`` and ``pretrained``: the architecture and where its weights come from. kwargs are
  compared as JSON, so ``112`` and ``112.0`` differ (timm is handed exactly what the config says).
- ``sha256``: the checkpoint's bytes. A site that pins its checkpoint refuses a request without that same
  pin (the server cannot drop it), and a site that does not pin refuses a pinned request (it cannot vouch
  that its file is the pinned one: it pins it first, after ``tba-fed preflight``).
- ``checkpoint``: whether there is one, always; its path only when the site does not pin it (the path is
  then all that identifies the file). With a pin each machine keeps its copy where it likes.
- ``seed``: only where weights are drawn from it, i.e. no checkpoint (loaded strictly: it overwrites every
  weight) and not the offline model. Pretrained hub weights count as drawn: timm initialises a head whose
  ``num_classes`` differs from the hub's from the seed.

A site without ``model:`` serves the model the request names, as before (preflight flags it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..config import ModelConfig, _format_validation_error
from ..errors import SiteRefusal
from ..models import OFFLINE_MODELS
from .site_context import SiteContext


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def model_differences(declared: ModelConfig, requested: ModelConfig) -> list[str]:
    """Each field in which `requested` would compute something else than `declared` (see the module docstring)."""
    compared = [("name", requested.name, declared.name), ("kwargs", requested.kwargs, declared.kwargs),
                ("pretrained", requested.pretrained, declared.pretrained)]
    if declared.sha256 is None or requested.checkpoint is None:
        compared.append(("checkpoint", requested.checkpoint, declared.checkpoint))
    compared.append(("sha256", requested.sha256, declared.sha256))
    if declared.checkpoint is None and declared.name not in OFFLINE_MODELS:
        compared.append(("seed", requested.seed, declared.seed))
    return [f"{field} {_text(asked)} requested, {_text(held)} declared" for field, asked, held in compared
            if _text(asked) != _text(held)]


def check_model(site_name: str, declared: ModelConfig, requested: ModelConfig) -> None:
    """Refuse a request for any other model than the one the site declared, naming every difference (the
    request's and the site YAML's values only, so the refusal reaches the server as it is)."""
    if differences := model_differences(declared, requested):
        raise SiteRefusal("model", f"{site_name} serves only the model its site YAML declares, and this run asks for "
                                   f"another: {'; '.join(differences)}",
                          "run it with the sites' model in the run YAML; or, if this site agrees to serve the new "
                          "model, change model in its site YAML and run tba-fed preflight")


def admitted_model(site: SiteContext, request: Mapping[str, Any]) -> ModelConfig:
    """The model this site serves `request` with, once it has checked the request's profile and model; raises
    a TBAInputError naming ``profile`` or ``model`` otherwise. Loads no weights and reads no image."""
    check_run_profile(site.name, site.profile, request)
    try:  # the request's config names its model as JSON, validated like a YAML model section
        requested = ModelConfig.model_validate_json(str(request.get("model", "")))
    except ValidationError as err:
        raise _format_validation_error(err, "model") from None
    declared = site.config.model if site.config is not None else None  # simulated sites serve the run's model
    if declared is None:
        return requested
    check_model(site.name, declared, requested)
    return declared


def check_run_profile(site_name: str, site_profile: str, config: Mapping[str, Any]) -> None:
    """A site serves only runs of its own profile: a production site never answers a development run
    (whose server made no production checks), and a run that does not name its profile is refused. The
    refusal quotes the request and the site's profile only, so it reaches the server as it is."""
    requested = config.get("profile")
    if requested != site_profile:
        raise SiteRefusal("profile", f"{site_name} runs in the {site_profile} profile and refuses a run whose profile "
                                     f"is {requested!r}",
                          f"run it with profile: {site_profile} in the run YAML")
