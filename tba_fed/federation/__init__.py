"""Federated TBA over Flower: sites send sums, the server solves the same closed form."""

import logging


def app_logging() -> None:
    """Show tba-fed's progress in Flower's app processes (the apps, not the library, configure logging)."""
    logger = logging.getLogger("tba_fed")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
