"""Tiny random timm ViTs: real architectures, small enough for a unit test to run in seconds."""

from __future__ import annotations

import logging
import os
import subprocess
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from tba_fed import ModelConfig, create_model
from tba_fed.data import SyntheticImages

TINY = {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 48, "num_heads": 3, "num_classes": 5}
FAMILIES = {
    "vit": ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY),
    "deit_distilled": ModelConfig(name="deit_tiny_distilled_patch16_224", kwargs=TINY),
    "dinov2_reg": ModelConfig(name="vit_small_patch14_reg4_dinov2",
                              kwargs={**TINY, "img_size": 28, "patch_size": 7, "init_values": 0.5}),
}


def pytest_configure(config):
    """Under pytest-xdist (`make test-fast`: two workers) each worker's torch gets its share of the cores, not all of
    them: two workers with two intra-op threads each on a 2-core machine spent 238 s of CPU on what one process does
    in 161 s."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, torch.get_num_threads() // int(workers)))


@pytest.fixture(autouse=True)
def restored_logging():
    """Every test leaves the process's logging as it found it: the CLI (`tba_fed.logs.configure`) replaces the root's
    handler and makes Python's warnings log records, and a capture left on by one test would swallow the warnings of
    whichever test runs next in the same process (which depends on how pytest-xdist shares the tests out)."""
    loggers = {name: logging.getLogger(name) for name in ("", "tba_fed", "flwr")}
    saved = {name: (list(lg.handlers), lg.level, lg.propagate) for name, lg in loggers.items()}
    with warnings.catch_warnings():
        yield
    logging.captureWarnings(False)
    for name, (handlers, level, propagate) in saved.items():
        logger = loggers[name]
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


FLOWER_PROCESSES = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr", "flwr-simulation")


@pytest.fixture(autouse=True)
def fast_tier_guard(request, monkeypatch):
    """A test not marked slow (`make test-fast`) must neither start a Flower process nor load the real model: it
    fails here, naming what it started."""
    if request.node.get_closest_marker("slow"):
        return
    import tba_fed.dinov2_imgfocus as offline

    popen = subprocess.Popen.__init__

    def refuse_flower(self, args, *rest, **kwargs):
        program = os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args).split()[0])
        if program in FLOWER_PROCESSES:
            pytest.fail(f"{request.node.nodeid} starts {program}: mark it @pytest.mark.slow")
        popen(self, args, *rest, **kwargs)

    def refuse_real_model(*args, **kwargs):
        pytest.fail(f"{request.node.nodeid} loads the real DINOv2-S: mark it @pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_flower)
    monkeypatch.setattr(offline, "load_dinov2_imgfocus", refuse_real_model)


@pytest.fixture(scope="session")
def tiny_config() -> ModelConfig:
    return FAMILIES["vit"]


@pytest.fixture()
def tiny_vit(tiny_config: ModelConfig) -> torch.nn.Module:
    return create_model(tiny_config)


def loader(num_images: int = 24, *, size: int = 32, seed: int = 0, batch_size: int = 8) -> DataLoader:
    return DataLoader(SyntheticImages(num_images, size, seed=seed), batch_size=batch_size)


def stacked_rows(model: torch.nn.Module, batches: DataLoader, block: int, token_mode: str = "all") -> torch.Tensor:
    """Block `block`'s selected token rows for every image, stacked: the reference for sums."""
    from tba_fed import ViTAdapter

    adapter = ViTAdapter(model)
    rows = []
    with torch.no_grad():
        for images, _ in batches:
            outputs = list(adapter.iter_block_outputs(images, block))
            rows.append(adapter.select_tokens(outputs[block], token_mode))
    return torch.cat(rows).double()


@pytest.fixture()
def server_identity():
    """Flower stamps outgoing messages with the ServerApp's run and task ids; outside a run there are
    none, so give the process the identity a ServerApp would have (internal API, test-only)."""
    from tba_fed.federation.flower_internals import serverapp_identity

    with serverapp_identity(run_id=1):
        yield


@pytest.fixture(scope="session")
def audit_model() -> torch.nn.Module:
    """The tiny ViT whose sites the privacy audit runs (tests/neighbours.py)."""
    return create_model(ModelConfig(name="vit_tiny_patch16_224", kwargs=TINY))


@pytest.fixture(scope="session")
def audit_bounds(audit_model: torch.nn.Module):
    """The clipping bounds every audited release is requested with."""
    import neighbours

    return neighbours.reference_bounds(audit_model)
