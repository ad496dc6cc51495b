"""Splitting one dataset into simulated sites: IID, Dirichlet label skew, or class shards.

Deterministic given the seed; the parts are disjoint and together cover every index. This is the
simulation's world (which hospital holds which image); each site then decides for each of its
images alone whether it is used and held out (`selection`). Real deployments need none of this:
each site simply has its own data config (``SiteConfig``).
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from .errors import TBAInputError

_logger = logging.getLogger(__name__)

Scheme = Literal["iid", "dirichlet", "shards"]


def partition(targets: np.ndarray, num_sites: int, *, scheme: Scheme = "iid", alpha: float = 0.5,
              shards_per_site: int = 2, seed: int = 0, min_per_site: int = 1, max_attempts: int = 100) -> list[np.ndarray]:
    """Index arrays (sorted) of each site's share of ``targets``' positions."""
    targets = np.asarray(targets)
    n = len(targets)
    if num_sites < 1:
        raise TBAInputError("federation.num_sites", f"must be >= 1, got {num_sites}")
    if n < num_sites * min_per_site:
        raise TBAInputError("data.num_images", f"{n} images cannot give {num_sites} sites {min_per_site} each")
    if scheme != "iid" and n and targets.min() < 0:  # data.UNLABELED: a flat image folder
        raise TBAInputError("federation.partition.scheme", f"a {scheme} partition splits by label, and the images have "
                                                           "no labels (a flat folder without class sub-folders)",
                            "use scheme iid, or put the images in one sub-folder per class")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_sites)
    elif scheme == "dirichlet":
        parts = _dirichlet(targets, num_sites, alpha, rng, min_per_site, max_attempts)
    elif scheme == "shards":
        shards = np.array_split(np.argsort(targets, kind="stable"), num_sites * shards_per_site)
        order = rng.permutation(len(shards))
        parts = [np.concatenate([shards[j] for j in order[i::num_sites]]) for i in range(num_sites)]
    else:
        raise TBAInputError("federation.partition.scheme", f"unknown scheme {scheme!r}", "use iid, dirichlet or shards")
    parts = [np.sort(p) for p in parts]
    if min(len(p) for p in parts) < min_per_site:
        raise TBAInputError("federation.partition", f"a site got fewer than {min_per_site} images",
                            "use fewer sites or more images")
    return parts


def _dirichlet(targets: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator, min_per_site: int,
               max_attempts: int) -> list[np.ndarray]:
    """Per class, shares drawn from Dir(alpha); redrawn (as is standard) until every site has enough."""
    classes = np.unique(targets)
    for _ in range(max_attempts):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(targets == c))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_per_site:
            return [np.asarray(p, dtype=np.int64) for p in parts]
    raise TBAInputError("federation.partition.alpha", f"Dirichlet({alpha}) left a site with fewer than {min_per_site} "
                                                      f"images in {max_attempts} draws", "raise alpha or the image count")


def class_histograms(targets: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[sites, classes] counts (unlabeled images, label -1, in no class)."""
    targets = np.asarray(targets)
    parts = [p[targets[p] >= 0] for p in parts]
    return np.stack([np.bincount(targets[p], minlength=num_classes) for p in parts])


def log_histograms(targets: np.ndarray, parts: list[np.ndarray], num_classes: int) -> str:
    hist = class_histograms(targets, parts, num_classes)
    header = "site | " + " ".join(f"{c:>5}" for c in range(num_classes)) + " | total"
    rows = [f"{i:>4} | " + " ".join(f"{v:>5}" for v in row) + f" | {len(p):>5}" for i, (row, p) in enumerate(zip(hist, parts))]
    _logger.info("class histogram per site (classes 0-%d; total): %s", num_classes - 1,
                 "; ".join(f"site {i}: {' '.join(map(str, row))} ({len(p)})" for i, (row, p) in enumerate(zip(hist, parts))))
    return "\n".join([header, *rows])
