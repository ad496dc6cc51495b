"""Errors that tell the user which input was wrong and how to fix it."""

from __future__ import annotations


class TBAInputError(ValueError):
    """Bad user input: a config field, CLI flag, plan, model or data.

    `field` names the offending input (e.g. ``plan`` or ``model.name``) so the message
    can be traced back to the YAML key or CLI flag that caused it.
    """

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        self.field = field
        self.message = message
        self.fix = fix
        text = f"{field}: {message}"
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class FederationError(RuntimeError):
    """A federated run cannot produce a trustworthy result: too few sites took part validly, or the
    SuperLink is gone."""


class SiteRefusal(TBAInputError):
    """A site declines a request for a reason that depends only on the request and the site's own
    configuration (policy, declared model, profile, budget), never on its images: this text may leave the
    site. Every other error a site meets is reported to the server by its field alone."""
