"""An intruder that presents another site's public key but signs with its own private key, through Flower's own
SuperNode client code (the Fleet API's HTTP client and its node-authentication interceptor, as
flwr/supernode/fleet_http_connection.py builds them, given a key pair that does not match).

Run as a process by tests/test_intruders.py:
``python intruder_client.py ADDRESS CA OWN_PRIVATE_KEY PRESENTED_PUBLIC_KEY VICTIM_NODE_ID STOP_FILE``.
Until STOP_FILE exists it asks, once a second, to activate the node of the presented key and to pull the
victim node's messages; it prints one line per distinct answer and exits 0 only if every call was refused."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from tba_fed.federation.flower_internals import (ActivateNodeRequest, FleetNode, PullMessagesRequest, fleet_client,
                                                 public_key_to_bytes)


def main(address: str, ca: str, own_private: str, presented_public: str, victim: int, stop: Path) -> int:
    private = load_ssh_private_key(Path(own_private).read_bytes(), None)
    public = load_ssh_public_key(Path(presented_public).read_bytes())
    key = public_key_to_bytes(public)  # type: ignore[arg-type]
    calls: dict[str, Callable[[Any], object]] = {
        "ActivateNode": lambda c: c.ActivateNode(ActivateNodeRequest(public_key=key, heartbeat_interval=30.0)),
        "PullMessages": lambda c: c.PullMessages(PullMessagesRequest(node=FleetNode(node_id=victim))),
    }
    seen: set[str] = set()
    accepted = 0
    with fleet_client(address, Path(ca), private, public) as client:  # type: ignore[arg-type]
        while True:
            for name, call in calls.items():
                try:
                    answer = f"{name}: ACCEPTED: {call(client)}"
                    accepted += 1
                except httpx.HTTPStatusError as err:
                    answer = f"{name}: refused: HTTP {err.response.status_code} {err.response.text}"
                if answer not in seen:
                    seen.add(answer)
                    print(answer, flush=True)
            if stop.exists():
                return 1 if accepted else 0
            time.sleep(1.0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), Path(sys.argv[6])))
