"""Errors that tell the user which input was wrong and how to fix it."""

from __future__ import annotations

import re

# ANSI escape sequences (colours, cursor moves: Ray and Flower colour their logs) and other control characters
_ESCAPES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def strip_escapes(text: str) -> str:
    return _ESCAPES.sub("", text)


def one_line(text: str, limit: int = 500) -> str:
    """`text` as one short line for a report table or a terminal: escape sequences and control characters
    removed, whitespace runs made one space, cut at `limit` characters. A reason that arrives from elsewhere
    (a site, Flower, an exception) must not break the line it is printed on."""
    text = " ".join(_CONTROL.sub(" ", strip_escapes(str(text))).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class TBAInputError(ValueError):
    """Bad user input: a config field, CLI flag, plan, model or data.

    `field` names the offending input (e.g. ``plan`` or ``model.name``) so the message
    can be traced back to the YAML key or CLI flag that caused it.
    """

    def __init__(self, field: str, message: str, fix: str | None = None) -> None:
        self.field = field
        self.message = message
        self.fix = fix
        super().__init__(f"{field}: {message}" + (f" ({fix})" if fix else ""))


class TBARunError(RuntimeError):
    """A run that could not finish for a reason its message names (a federation, a Flower process, the
    SuperLink): the CLI prints the message as one line and exits 1."""


class FederationError(TBARunError):
    """A federated run cannot produce a trustworthy result: too few sites took part validly, or the
    SuperLink is gone."""


class SiteRefusal(TBAInputError):
    """A site declines a request for a reason that depends only on the request and the site's own
    configuration (policy, declared model, profile, budget), never on its images: this text may leave the
    site. Every other error a site meets is reported to the server by its field alone."""
