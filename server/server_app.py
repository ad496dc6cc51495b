"""Flower ServerApp of tba-fed: read the run's YAML and drive the rounds in tba_fed."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from tba_fed.federation import app_logging
from tba_fed.federation.config import load_federated_config
from tba_fed.deploy.profile import verify_superlink
from tba_fed.federation.server import run_server

app = ServerApp()
app_logging()


@app.main()
def main(grid: Grid, context: Context) -> None:
    path = str(context.run_config.get("config-path", ""))
    if not path:
        raise ValueError("run config 'config-path' is empty: pass --run-config \"config-path='/abs/run.yaml'\"")
    config = load_federated_config(Path(path))
    # production: the SuperLink itself is checked (TLS, node authentication, database) before round 1
    run_server(grid, config, superlink_checks=verify_superlink(config))
