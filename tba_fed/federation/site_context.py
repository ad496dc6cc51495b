"""Which site serves a message, resolved once per message from the SuperNode's node config.

A deployed site is its own YAML (``--node-config 'site-config="site.yaml"'``); a simulated site is partition
``partition-id`` of the run's YAML (``config-path`` in the run config). Each file is read at most once per
message and only when something needs it: a simulated site's name and profile need none, so a request of the
wrong profile is refused before the run's YAML is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import TBAInputError
from ..privacy.policy import SitePolicy
from .config import SITE_AUDIT_FILE, FederatedRunConfig, SiteConfig, load_federated_config, load_site_config


def simulated_site(run: FederatedRunConfig, site: int) -> tuple[str, Path, SitePolicy]:
    """A simulated site's name, output folder (beside the run's output) and policy (ledger in that folder)."""
    output = run.output.with_name(run.output.name + "-sites") / f"site-{site}"
    policy = run.federation.site_policy
    if policy.ledger is None:
        policy = policy.model_copy(update={"ledger": output / "privacy-ledger.json"})
    return f"site-{site}", output, policy


class SiteContext:
    """The site a message is served by: its name, profile, policy, output and audit log."""

    def __init__(self, node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> None:
        if "site-config" not in node_config and "partition-id" not in node_config:
            raise TBAInputError("node-config", "neither site-config nor partition-id is set",
                                "start the SuperNode with --node-config 'site-config=\"/path/site.yaml\"'")
        self.node_config, self.run_config = node_config, run_config

    @cached_property
    def config(self) -> SiteConfig | None:
        if "site-config" not in self.node_config:
            return None
        return load_site_config(Path(str(self.node_config["site-config"])))

    @cached_property
    def run(self) -> FederatedRunConfig:
        """The run's YAML, which a simulated site's data, policy and output come from."""
        return load_federated_config(Path(str(self.run_config["config-path"])))

    @property
    def partition(self) -> int:
        return int(self.node_config["partition-id"])

    @property
    def name(self) -> str:
        return self.config.name if self.config is not None else f"site-{self.node_config['partition-id']}"

    @property
    def profile(self) -> str:
        return self.config.profile if self.config is not None else "development"

    @cached_property
    def _simulated(self) -> tuple[str, Path, SitePolicy]:
        return simulated_site(self.run, self.partition)

    @property
    def policy(self) -> SitePolicy:
        return self.config.privacy if self.config is not None else self._simulated[2]

    @property
    def output(self) -> Path:
        return self.config.output if self.config is not None else self._simulated[1]

    @property
    def audit(self) -> Path:
        return self.config.audit_log if self.config is not None else self.output / SITE_AUDIT_FILE
