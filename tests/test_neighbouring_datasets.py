"""The privacy audit, part 1: neighbouring datasets through the real site, noise switched off (issue #12).

For every release kind a site makes (similarity, statistics with its held-out part, probe, accuracy;
local, and the statistics under secure aggregation), D' = D plus one image (inserted first, in the
middle, last) or D minus one image must move each released statistic by at most its documented
sensitivity, on ordinary data in every data source and on adversarial data (one image far outside the
clipping bounds among images near zero; two image types). Which images a release uses is a decision
about each image alone: no other image may change sides. See neighbours.py for how the harness works.

On c272bf5 this fails: the calibration/held-out split was a permutation of all the images, so one
added image moved most others between the parts (the statistics release moved many times its bound).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from clients.client_app import app
from tba_fed.data import CIFAR10Images, SyntheticImages, build_dataset, calibration_split
from tba_fed.federation.config import load_site_config
from tba_fed.federation.flower_internals import serverapp_identity
from tba_fed.federation.secure_aggregation import secure_sum
from tba_fed.federation.site import site_key
from tba_fed.federation.wire import private_span_shapes, secure_ranges
from tba_fed.plan import parse_plan
from tba_fed.privacy.site_state import initialise
from tba_fed.selection import decide, development_key, split_indices

import neighbours as nb
from clientapp_grid import ClientAppGrid
from conftest import TINY

MODEL = {"name": "vit_tiny_patch16_224", "kwargs": TINY}
KINDS = ("similarity", "statistics", "probe", "accuracy")
COUNT = 30  # images in D: each part (30% held out) is non-empty (the policy's min_images is 1)
POSITIONS = {"first": 0, "middle": COUNT // 2, "last": COUNT}


# The privacy audit is slow: every release kind through the real ClientApp for each neighbouring dataset
# (52% of the time of the tests that start no Flower process, measured with --durations=0).
pytestmark = [pytest.mark.usefixtures("server_identity"), pytest.mark.slow]


def _releases(site: Path, bounds: nb.Bounds) -> dict[str, dict]:
    """Every plain release of the site at `site` (its YAML), asked through the real ClientApp."""
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(site)}])
    return {kind: nb.released(kind, grid.answer([msg])[0], 48) for kind, msg in nb.messages(MODEL, bounds, 48).items()}


def _site(tmp: Path, source: str, images: nb.Images, names=None, state: Path | None = None) -> Path:
    """A site reading `images`; with a `state`, the site initialised there (its ledger beside it)."""
    data = nb.write_source(source, tmp / "data", images, names)
    ledger = tmp / "ledger.json" if state is None else state.parent / "ledger.json"
    return nb.site_yaml(tmp / "site.yaml", data, ledger=ledger, state=state)


def _neighbour(base: nb.Images, variant: str, side: str = "calibration", source: str = "medmnist",
               key: bytes = development_key(0)) -> tuple[nb.Images, list[str]]:
    """D' and (for an image folder) the file names that put each image where the variant says: a canary added
    first ("a"), in the middle or last ("z") in the order the folder is read, or an image removed from the
    middle; the canary (or the removed image) is one that the site's key puts on `side` (calibration or
    held-out), so both parts are audited."""
    names = [f"m{k:05d}" for k in range(len(base))]

    def fate(pixels: np.ndarray) -> str:
        return decide(nb.record_of(source, pixels), key, sample_rate=1.0, holdout_fraction=nb.HOLDOUT)

    if variant == "removed":
        position = next(k for k in range(POSITIONS["middle"], len(base)) if fate(base.pixels[k]) == side)
        return base.remove(position), names[:position] + names[position + 1:]
    pixels, label = next(c for c in (nb.canary(v) for v in range(64)) if fate(c[0]) == side)
    position = POSITIONS[variant]
    name = {"first": "a", "middle": f"m{position - 1:05d}x", "last": "z"}[variant]
    return base.insert(position, pixels, label), names[:position] + [name] + names[position:]


def _check(kind: str, before: dict, after: dict, bounds: nb.Bounds, slack: float = 0.0, map_choice: str = "linear"
           ) -> None:
    documented = nb.parts(kind, bounds, tokens=17, map_choice=map_choice)
    moved = nb.change(kind, before, after)
    assert set(moved) == set(documented), kind  # every statistic released is one the site gave a sensitivity
    assert nb.excess(kind, moved, documented, slack) == {}, kind
    assert nb.noise_ratio(moved, documented) <= 1 + 1e-9 + slack, kind


DATASETS = {"ordinary": lambda: nb.ordinary(COUNT), "near-zero": lambda: nb.gray(COUNT),
            "two types": lambda: nb.two_types(COUNT)}


@pytest.mark.parametrize("side", ["calibration", "holdout"])
@pytest.mark.parametrize("variant", ["first", "middle", "last", "removed"])
@pytest.mark.parametrize(("source", "dataset"), [("image_folder", "ordinary"), ("image_folder", "near-zero"),
                                                 ("image_folder", "two types"), ("fashion_mnist", "ordinary"),
                                                 ("medmnist", "ordinary"), ("medmnist", "two types")])
def test_one_image_moves_every_release_by_at_most_its_sensitivity(tmp_path_factory, audit_bounds, source, dataset, variant,
                                                                   side):
    base = DATASETS[dataset]()
    cache = tmp_path_factory.getbasetemp() / f"D-{source}-{dataset}"
    if not cache.exists():  # D's releases are shared by the variants
        cache.mkdir()
        np.save(cache / "releases.npy", _releases(_site(cache, source, base), audit_bounds), allow_pickle=True)
    before = np.load(cache / "releases.npy", allow_pickle=True).item()
    neighbour, names = _neighbour(base, variant, side, source)
    after = _releases(_site(tmp_path_factory.mktemp(variant), source, neighbour, names), audit_bounds)
    moved = {kind: nb.change(kind, before[kind], after[kind]) for kind in KINDS}
    for kind in KINDS:
        _check(kind, before[kind], after[kind], audit_bounds)
    # not vacuous: the image reached the releases of its part, an added canary at its clipping bound
    reached = ("similarity", "statistics", "probe") if side == "calibration" else ("statistics", "accuracy")
    assert all(max(moved[kind].values()) > 0 for kind in reached), moved
    if variant != "removed" and side == "calibration":
        assert max(v / nb.parts("statistics", audit_bounds, 17)[k].sensitivity for k, v in moved["statistics"].items()) > 0.999


@pytest.mark.parametrize("variant", ["last", "removed"])
def test_synthetic_data_too(tmp_path, audit_bounds, variant):
    """Synthetic image k is a function of (seed, k): D' is D with image COUNT added, or with the last removed."""
    def site(folder: Path, count: int) -> Path:
        folder.mkdir()
        return nb.site_yaml(folder / "site.yaml", {"source": "synthetic", "num_images": count, "seed": 4,
                                                   "num_classes": nb.NUM_CLASSES},
                            ledger=folder / "ledger.json")

    before = _releases(site(tmp_path / "D", COUNT), audit_bounds)
    after = _releases(site(tmp_path / "D2", COUNT + 1 if variant == "last" else COUNT - 1), audit_bounds)
    for kind in KINDS:
        _check(kind, before[kind], after[kind], audit_bounds)


def test_with_the_sites_secret_key_the_same_holds(tmp_path, audit_bounds):
    """A deployed site keys its decisions with the secret from its state directory: D and D' are the same site
    (one state, one ledger), asked in two runs."""
    base = nb.two_types(COUNT)
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    key = {"state": tmp_path / "state"}  # ledger: tmp_path / "ledger.json", shared
    before = _releases(_site(tmp_path / "D", "image_folder", base, **key), audit_bounds)
    neighbour, names = _neighbour(base, "middle", "calibration", "image_folder", site_key(load_site_config(
        tmp_path / "D" / "site.yaml")))
    with serverapp_identity(run_id=2):  # the second run of the same site
        after = _releases(_site(tmp_path / "D2", "image_folder", neighbour, names, **key), audit_bounds)
    for kind in KINDS:
        _check(kind, before[kind], after[kind], audit_bounds)


@pytest.mark.parametrize("map_choice", ["linear", "auto"])
def test_the_secure_release_moves_the_secure_sum_by_at_most_its_sensitivity(tmp_path, audit_bounds, audit_model,
                                                                            map_choice):
    """Through a real SecAgg+ round with two other sites: the sum over the three moves by the site's own change,
    within its sensitivity plus the quantisation error SecAgg+ reports (under map: auto, both kinds' arrays, each
    in the range its own kind's bounds give)."""
    base = nb.two_types(COUNT)
    others = [_site(tmp_path / f"other-{k}", "image_folder", nb.ordinary(COUNT, seed=k + 1)) for k in range(2)]
    settings = nb.secure_settings(MODEL, audit_bounds, 48, sites=3, max_images=64, map_choice=map_choice)
    spans = parse_plan(nb.PLAN, 6).spans
    request = nb.request(audit_bounds, aggregation="secure", noise_sites=3, map_choice=map_choice)
    ranges = secure_ranges(request, spans, 64, map_choice)
    shapes = private_span_shapes(spans, 48, map_choice)

    def secure(site: Path):
        grid = ClientAppGrid(app, node_configs=[{"site-config": str(p)} for p in (site, *others)])
        result = secure_sum(grid, grid.get_node_ids(), settings, ranges, shapes, timeout=10,
                            min_sites=3, reconstruction_threshold=3)
        assert result.sites == 3
        return result

    before = secure(_site(tmp_path / "D", "image_folder", base))
    neighbour, names = _neighbour(base, "first", "holdout", "image_folder")
    after = secure(_site(tmp_path / "D2", "image_folder", neighbour, names))
    # each entry of each sum is within error_bound of the exact sum: the difference within twice that
    slack = 2 * max(after.error_bound[k] * np.sqrt(np.prod(shape)) for k, shape in shapes.items())
    _check("statistics", before.arrays, after.arrays, audit_bounds, slack, map_choice)


def _auto_release(site: Path, bounds: nb.Bounds) -> dict:
    """The site's statistics release under map: auto (both kinds in one release), through the real ClientApp."""
    grid = ClientAppGrid(app, node_configs=[{"site-config": str(site)}])
    message = nb.messages(MODEL, bounds, 48, map_choice="auto")["statistics"]
    return nb.released("statistics", grid.answer([message])[0], 48, map_choice="auto")


@pytest.mark.parametrize("side", ["calibration", "holdout"])
@pytest.mark.parametrize("variant", ["first", "removed"])
@pytest.mark.parametrize("tight", ["linear", "folded"])
def test_an_auto_release_moves_both_kinds_statistics_by_at_most_their_sensitivity(tmp_path_factory, audit_bounds,
                                                                                  tight, variant, side):
    """map: auto releases both kinds' sums with one weight per image bounding both kinds' statistics: one added
    or removed image moves every statistic of either kind by at most its own kind's bound, the shared count by at
    most 1, and the whole release by at most the mechanism's sensitivity (its parts split evenly over the kinds).
    `tight`: that kind's bounds at a tenth of the reference, so it is the kind that binds: a weight that bounded
    only the other kind's statistics would let this kind's move past its bound."""
    bounds = replace(audit_bounds, **{"spans" if tight == "linear" else "folded_spans":
                                      tuple(0.1 * b for b in (audit_bounds.spans if tight == "linear"
                                                              else audit_bounds.folded_spans))})
    base = nb.two_types(COUNT)
    cache = tmp_path_factory.getbasetemp() / f"D-auto-{tight}"
    if not cache.exists():
        cache.mkdir()
        np.save(cache / "release.npy", _auto_release(_site(cache, "image_folder", base), bounds), allow_pickle=True)
    before = np.load(cache / "release.npy", allow_pickle=True).item()
    neighbour, names = _neighbour(base, variant, side, "image_folder")
    after = _auto_release(_site(tmp_path_factory.mktemp(f"auto-{variant}"), "image_folder", neighbour, names), bounds)
    assert {key.split("/")[0] for key in after} == {"linear", "folded"}
    for release in (before, after):  # the one count of each split, noised once: every group carries the same value
        for split in ("calibration", "holdout"):
            assert np.array_equal(release[f"linear/{split}/1-3/weight"], release[f"folded/{split}/1-3/weight"])
    _check("statistics", before, after, bounds, map_choice="auto")
    documented = nb.parts("statistics", bounds, 17, "auto")
    moved = nb.change("statistics", before, after)
    # not vacuous: the image reached both kinds' sums of its part; an added canary, far outside every bound, got the
    # one weight that brings its most binding statistic, one of the tight kind's, to its bound
    for kind in ("linear", "folded"):
        assert max(v for name, v in moved.items() if name.startswith(f"{kind}/")) > 0, (kind, moved)
    if variant != "removed":
        assert max(v / documented[name].sensitivity for name, v in moved.items() if name.startswith(f"{tight}/")) > 0.999


# ------------------------------------------------------------------------------- membership, per source

def _sides(dataset, key: bytes, sample_rate: float) -> list[Counter]:
    """The records (image bytes) on each side of the decision: calibration, held out, not used."""
    calibration, holdout = split_indices(dataset, range(len(dataset)), key, sample_rate=sample_rate,
                                         holdout_fraction=nb.HOLDOUT)
    unused = sorted(set(range(len(dataset))) - set(calibration) - set(holdout))
    return [Counter(dataset.record(int(i)) for i in part) for part in (calibration, holdout, unused)]


@pytest.mark.parametrize("sample_rate", [1.0, 0.5])
@pytest.mark.parametrize("source", ["image_folder", "fashion_mnist", "medmnist", "cifar10", "synthetic"])
def test_no_other_image_changes_sides(tmp_path, audit_model, source, sample_rate):
    """Adding or removing one image changes nothing but that image's own membership (used or not,
    calibration or held out), in every data source, at any position, with or without subsampling."""
    key = development_key(3)
    base = nb.ordinary(COUNT, seed=7)

    def dataset(images: nb.Images, folder: str, names=None):
        if source == "cifar10":  # torchvision checks CIFAR's files against their md5: build one around the arrays
            cifar = CIFAR10Images.__new__(CIFAR10Images)
            cifar.data, cifar.targets = images.pixels, list(images.labels)
            return cifar
        if source == "synthetic":  # image k is a function of (seed, k): only the last can be added or removed
            return SyntheticImages(len(images), 32, seed=2)
        data = nb.write_source(source, tmp_path / folder, images, names)
        config = load_site_config(nb.site_yaml(tmp_path / f"{folder}.yaml", data, ledger=tmp_path / "ledger.json"))
        return build_dataset(config.data, audit_model)

    before = _sides(dataset(base, "D"), key, sample_rate)
    assert sum(len(side) for side in before[:2]) > 0 and (sample_rate == 1) == (len(before[2]) == 0)
    variants = ["last", "removed"] if source == "synthetic" else ["first", "middle", "last", "removed"]
    for variant in variants:
        neighbour, names = _neighbour(base, variant)
        if source == "synthetic" and variant == "removed":
            neighbour = base.remove(COUNT - 1)
        after = _sides(dataset(neighbour, f"D-{variant}", names), key, sample_rate)
        moved = [(a - b) + (b - a) for a, b in zip(after, before)]
        assert sum(sum(m.values()) for m in moved) == 1, (variant, [sum(m.values()) for m in moved])


def test_a_site_selects_with_its_state_key_the_images_a_development_key_would_not(tmp_path, audit_model):
    """The decisions depend on the key: a deployed site's secret gives another selection than the data seed's
    (the server, which may know the seed, cannot predict them), and a site's key is stable across reads."""
    initialise(tmp_path / "state", "hospital-a", tmp_path / "ledger.json")
    path = _site(tmp_path, "image_folder", nb.ordinary(COUNT), state=tmp_path / "state")
    site = load_site_config(path)
    dataset = build_dataset(site.data, audit_model)
    secret = [sorted(p.indices) for p in calibration_split(dataset, site.data, site_key(site))]
    assert secret == [sorted(p.indices) for p in calibration_split(dataset, site.data, site_key(site))]
    seeded = [sorted(p.indices) for p in calibration_split(dataset, site.data, development_key(site.data.seed))]
    assert secret != seeded
    assert torch.equal(torch.as_tensor(sorted(secret[0] + secret[1])), torch.arange(COUNT))

