"""Federated TBA over Flower: sites send sums, the server solves the same closed form."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..logs import configure, verbose_from_env

if TYPE_CHECKING:
    from flwr.app import Context, Message

_configured: int | None = None  # the process whose logging app_logging configured


def app_logging() -> None:
    """Log from Flower's app processes as the CLI does (the apps, not the library, configure logging): one
    handler and format, Flower's and Ray's chatter shown only if the tba-fed that started the run was verbose."""
    global _configured
    configure(verbose_from_env())
    _configured = os.getpid()


def logged(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """ClientApp mod: `app_logging` in the process that runs the handler, once. A simulation runs the handlers in
    Ray's actors, which receive the ClientApp pickled and never import the module that built it."""
    if _configured != os.getpid():
        app_logging()
    return call_next(msg, context)
