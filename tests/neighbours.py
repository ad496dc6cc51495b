"""Neighbouring datasets through a real site (issue #12's privacy audit, noise switched off).

A site's release may move by at most its documented sensitivity when one image is added to or removed
from the site's data, whatever the other images are. This harness builds D and D' (D with one image
z inserted first, in the middle or last, or with one image removed) in each data source's own format
on disk, points a site YAML at each, and asks the site for every release kind through its real
ClientApp (`clients/client_app.py`: message decoding, the site's gate, its data selection, clipping,
noise, the reply) with messages built as the server builds them.

Noise is "switched off" by drawing the same noise twice: both sites are the same hospital (same name,
same data seed or state key) asked under the same seeded request, so the seeded noise of D's release
and of D''s release are identical draws and their difference is the difference of the exact clipped
sums (up to rounding and clamping of counts, which only shrink it). The secure-aggregation release goes
through a real SecAgg+ round with two other sites; its difference then also carries the quantisation
error SecAgg+ reports, which the check allows for explicitly.
"""

from __future__ import annotations

import gzip
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from flwr.app import ConfigRecord, Message, RecordDict
from PIL import Image

from tba_fed.federation.records import from_record, to_record
from tba_fed.federation.wire import (MODELS, decode_private_spans, decode_probe, decode_similarity, encode_heads,
                                     encode_maps, encode_priors)
from tba_fed.plan import Span, parse_plan
from tba_fed.privacy.clipped import STATISTICS as SPAN_STATISTICS
from tba_fed.privacy.policy import RELEASES, PrivacyRequest
from tba_fed.privacy.sensitivity import Part, accuracy_parts, kind_span_parts, probe_parts, similarity_parts
from tba_fed.probe import ProbeHead
from tba_fed.solver import LinearMap

PLAN = "1->3"
NUM_CLASSES = 3
SEED = 11  # the seeded noise both releases draw (tests only: it is what makes the noise cancel)
EPSILON = 4.0
HOLDOUT = 0.3  # the sites' held-out fraction


@dataclass(frozen=True)
class Images:
    """uint8 images [N, H, W, 3] and their labels: the records of one data set, in the order they are stored."""

    pixels: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def insert(self, position: int, pixels: np.ndarray, label: int) -> Images:
        return Images(np.insert(self.pixels, position, pixels, axis=0), np.insert(self.labels, position, label))

    def remove(self, position: int) -> Images:
        return Images(np.delete(self.pixels, position, axis=0), np.delete(self.labels, position))


def ordinary(count: int, seed: int = 0, size: int = 32) -> Images:
    """Smooth random colour images (upsampled noise) with labels: what a site ordinarily holds."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, 4, 4, 3)).astype(np.uint8)
    pixels = np.stack([np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse])
    return Images(pixels, rng.integers(0, NUM_CLASSES, count))


def _marked(pixels: np.ndarray) -> np.ndarray:
    """Each image's first pixel set to its index (mod 256): distinct records, not byte-identical copies
    (identical images share their decision, which would leave a part of the data empty)."""
    pixels = pixels.copy()
    pixels[:, 0, 0, 0] = np.arange(len(pixels)) % 256
    return pixels


def gray(count: int, size: int = 32) -> Images:
    """Flat mid-gray images: near zero after the model's normalisation, the quietest records there are."""
    return Images(_marked(np.full((count, size, size, 3), 128, np.uint8)), np.arange(count) % NUM_CLASSES)


def two_types(count: int, size: int = 32) -> Images:
    """Alternating black and white images: any decision that moves other records shows at once."""
    pixels = np.zeros((count, size, size, 3), np.uint8)
    pixels[1::2] = 255
    return Images(_marked(pixels), np.arange(count) % 2)


def canary(variant: int = 0, size: int = 32) -> tuple[np.ndarray, int]:
    """A high-contrast checkerboard: far outside any clipping bound, so it reaches every bound it can.
    `variant` changes one pixel: another record (another decision) with the same effect."""
    board = ((np.arange(size)[:, None] // 2 + np.arange(size)[None, :] // 2) % 2 * 255).astype(np.uint8)
    board = np.repeat(board[:, :, None], 3, axis=2)
    board[-1, -1, 0] = variant % 256
    return board, 1


def record_of(source: str, pixels: np.ndarray) -> bytes:
    """The bytes a data source decides an image's fate from (`selection`), as `write_source` stores it."""
    if source == "image_folder":
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()
    if source == "fashion_mnist":
        return pixels.mean(axis=2).round().astype(np.uint8).tobytes()
    return np.ascontiguousarray(pixels).tobytes()


# ----------------------------------------------------------------------------- data sources on disk

def _idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_source(source: str, folder: Path, images: Images, names: Sequence[str] | None = None) -> dict[str, Any]:
    """`images` in `source`'s format under `folder`; the data section of a site YAML reading them.

    image_folder: one PNG per image in one sub-folder per label, named by `names` (their sort order is
    the order torchvision reads them in); fashion_mnist: gzipped IDX files (grayscale); medmnist: a .npz.
    """
    folder.mkdir(parents=True)
    if source == "image_folder":
        for k, (pixels, label) in enumerate(zip(images.pixels, images.labels)):
            (folder / f"class-{label}").mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / f"class-{label}" / f"{names[k] if names else f'{k:05d}'}.png")
        return {"source": "image_folder", "path": str(folder)}
    if source == "fashion_mnist":
        _idx(folder / "train-images-idx3-ubyte.gz", images.pixels.mean(axis=3).round().astype(np.uint8), 2051)
        _idx(folder / "train-labels-idx1-ubyte.gz", images.labels, 2049)
        return {"source": "fashion_mnist", "path": str(folder)}
    if source == "medmnist":
        np.savez(folder / "data.npz", train_images=images.pixels, train_labels=images.labels[:, None])
        return {"source": "medmnist", "path": str(folder / "data.npz")}
    raise ValueError(source)


# -------------------------------------------------------------------------------------------- requests

@dataclass(frozen=True)
class Bounds:
    """The clipping bounds of a run (the server derives them from public photos; here they are given)."""

    spans: tuple[float, float, float, float, float]
    blocks: tuple[float, ...]
    features: float
    folded_spans: tuple[float, float, float, float, float]  # the folded pairs' bounds (map: folded, or auto)

    def clip_spans(self, map_choice: str = "linear") -> dict[str, tuple[float, ...]]:
        """The request's span bounds: the plan's span, or under ``map: auto`` each kind's (`span_label`)."""
        if map_choice != "auto":
            return {PLAN: self.spans}
        return {f"linear/{PLAN}": self.spans, f"folded/{PLAN}": self.folded_spans}

    def kinds(self, map_choice: str = "linear") -> dict[str, dict[Span, Any]]:
        """The same bounds as each kind's `SpanBounds` (kind -> span -> bounds), as the site reads them."""
        from tba_fed.privacy.clipped import SpanBounds

        span = parse_plan(PLAN, 6).spans[0]
        both = {"linear": {span: SpanBounds(*self.spans)}, "folded": {span: SpanBounds(*self.folded_spans)}}
        return both if map_choice == "auto" else {"linear": both["linear"]}


def reference_bounds(model: torch.nn.Module) -> Bounds:
    """Clipping bounds as the server sets them (median per-image norms of reference images, `public_prior`),
    here those of 64 ordinary images: about half of a site's ordinary images are clipped, and every canary."""
    from torch.utils.data import DataLoader

    from tba_fed.data import ArrayImages, data_config
    from tba_fed.privacy.public_prior import public_norms, public_span_bounds

    reference = ordinary(64, seed=99)
    loader = DataLoader(ArrayImages(reference.pixels, reference.labels, data_config(model)), batch_size=16)
    norms = public_norms(model, loader, "all")
    spans = parse_plan(PLAN, 6).spans
    span, folded = (public_span_bounds(model, loader, spans, identity_maps(model.embed_dim), "all", 1.0, kind)[spans[0]]
                    for kind in ("linear", "folded"))
    return Bounds(span.as_tuple(), norms.block_bounds(1.0), norms.feature_bound(1.0), folded.as_tuple())


def request(bounds: Bounds, *, aggregation: str = "local", noise_sites: int = 1, map_choice: str = "linear"
            ) -> PrivacyRequest:
    """The run's privacy request, declaring every release kind (seeded: the noise must cancel)."""
    return PrivacyRequest(epsilon=EPSILON, delta=1e-5, releases=RELEASES, aggregation=aggregation,
                          noise_sites=noise_sites, seed=SEED, clip_spans=bounds.clip_spans(map_choice),
                          clip_blocks=bounds.blocks, clip_features=bounds.features)


def identity_maps(dim: int) -> dict[Span, LinearMap]:
    return {span: LinearMap(torch.eye(dim, dtype=torch.float64), None) for span in parse_plan(PLAN, 6).spans}


def heads(dim: int) -> dict[str, ProbeHead]:
    """Fixed probe heads (any will do: the accuracy counts' sensitivity holds for every head)."""
    g = torch.Generator().manual_seed(5)
    return {m: ProbeHead(torch.randn(NUM_CLASSES, dim, generator=g, dtype=torch.float64),
                         torch.zeros(NUM_CLASSES, dtype=torch.float64)) for m in MODELS}


def messages(model: dict, bounds: Bounds, dim: int, map_choice: str = "linear") -> dict[str, Message]:
    """One message per plain release kind, with the content the server's rounds send (server.run_server)."""
    privacy = request(bounds, map_choice=map_choice).to_json()
    base = {"model": json.dumps(model), "token-mode": "all", "profile": "development", "map": map_choice}
    maps = to_record(encode_maps(identity_maps(dim)))
    evaluation = {"model": json.dumps(model), "profile": "development", "plan": PLAN, "identity-spans": "",
                  "num-classes": NUM_CLASSES, "privacy": privacy}
    contents = {
        "similarity": ("query.similarity", {"config": ConfigRecord({**base, "privacy": privacy})}),
        "statistics": ("query.statistics", {"config": ConfigRecord({**base, "plan": PLAN, "privacy": privacy,
                                                                     "prior-maps": encode_priors(identity_maps(dim))})}),
        "probe": ("query.probe", {"config": ConfigRecord(evaluation), "maps": maps}),
        "accuracy": ("evaluate.accuracy", {"config": ConfigRecord(evaluation), "maps": maps,
                                           "heads": to_record(encode_heads(heads(dim)))}),
    }
    return {kind: Message(RecordDict(records), dst_node_id=100, message_type=message_type)
            for kind, (message_type, records) in contents.items()}


def secure_settings(model: dict, bounds: Bounds, dim: int, sites: int, max_images: int, map_choice: str = "linear"
                    ) -> dict[str, Any]:
    """The statistics round's settings under secure aggregation (releases.secure_statistics_round)."""
    return {"model": json.dumps(model), "token-mode": "all", "profile": "development", "plan": PLAN, "map": map_choice,
            "privacy": request(bounds, aggregation="secure", noise_sites=sites, map_choice=map_choice).to_json(),
            "prior-maps": encode_priors(identity_maps(dim)), "max-images": max_images}


# ------------------------------------------------------------------------------------ what is released

def _frobenius(value: np.ndarray, symmetric: bool) -> float:
    """The Frobenius norm of a released array; a packed upper triangle counts its off-diagonal twice."""
    if not symmetric:
        return float(np.linalg.norm(value))
    dim = int((math.isqrt(8 * value.size + 1) - 1) // 2)
    diagonal = np.cumsum(np.r_[0, np.arange(dim, 1, -1)])  # positions of the diagonal in the packed rows
    squares = value**2
    return float(math.sqrt(2 * squares.sum() - squares[diagonal].sum()))


def statistics_of(kind: str, arrays: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The released values of one release, grouped by the statistic (sensitivity part) they belong to:
    part name -> {array name -> values}. Values derived from others (tokens = images x tokens per image)
    are left out: they are post-processing of what is checked."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    if kind == "similarity":
        for name in ("sq_dist", "cos_sum", "angle_sum", "sq_norm", "images"):
            groups[name] = {name: np.asarray(arrays[name], dtype=np.float64)}
    elif kind == "statistics":  # groups "split" or, under map: auto, "kind/split" (one part per kind and span)
        for key, value in arrays.items():
            *group, span, name = key.split("/")
            statistic = {"gram_triu": "gram"}.get(name, name)
            value = np.asarray(value, dtype=np.float64)
            if name == "weight":  # one count per split, repeated in every group (a site sends equal copies; a SecAgg+
                groups.setdefault("weight", {}).setdefault(group[-1], value)  # sum quantises each): counted once
                continue
            label = f"{group[0]}/{span.replace('-', '->')}" if len(group) == 2 else span.replace('-', '->')
            groups.setdefault(f"{label}:{statistic}", {})[key] = value
    elif kind == "probe":
        for key, value in arrays.items():
            which, name = key.split("/")
            if name in ("tokens", "images"):  # the sum of the noisy class counts
                continue
            groups[f"{which}:{name.removesuffix('_triu')}"] = {key: np.asarray(value, dtype=np.float64)}
    else:
        groups = {name: {name: np.asarray(value, dtype=np.float64)} for name, value in arrays.items()}
    return groups


def change(kind: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, float]:
    """‖f(D') − f(D)‖ of each statistic (Frobenius, over every array of the statistic: both splits)."""
    old, new = statistics_of(kind, before), statistics_of(kind, after)
    assert old.keys() == new.keys(), (sorted(old), sorted(new))
    norms = {}
    for part, values in old.items():
        squares = sum(_frobenius(new[part][key] - value, key.endswith("gram_triu")) ** 2 for key, value in values.items())
        norms[part] = math.sqrt(squares)
    return norms


def parts(kind: str, bounds: Bounds, tokens: int, map_choice: str = "linear") -> dict[str, Part]:
    """The documented sensitivity of every statistic of a release kind (tba_fed.privacy.sensitivity)."""
    if kind == "similarity":
        found = similarity_parts(bounds.blocks, tokens)
    elif kind == "statistics":
        found = kind_span_parts(bounds.kinds(map_choice))
    elif kind == "probe":
        found = probe_parts(MODELS, bounds.features)
    else:
        found = accuracy_parts()
    return {p.name: p for p in found}


def released(kind: str, reply: Message, dim: int, map_choice: str = "linear") -> dict[str, Any]:
    """The arrays (or counts) a reply carries, checked by the server's own decoders."""
    assert not reply.has_error(), reply.error.reason
    if kind == "accuracy":
        return {k: float(v) for k, v in reply.content.metric_records["accuracy"].items()}
    arrays = from_record(reply.content.array_records[kind])
    if kind == "similarity":
        decode_similarity(arrays, 6)
    elif kind == "statistics":
        decode_private_spans(arrays, parse_plan(PLAN, 6).spans, dim, map_choice)
    else:
        decode_probe(arrays, dim, NUM_CLASSES, psd_tolerance=None)
    return arrays


def excess(kind: str, moved: Mapping[str, float], documented: Mapping[str, Part], slack: float = 0.0
           ) -> dict[str, tuple[float, float]]:
    """The statistics that moved more than their sensitivity (+ `slack` for the secure sum's quantisation):
    name -> (moved, sensitivity). Float64 rounding of sums is allowed for, 1e-9 of the bound."""
    return {name: (value, documented[name].sensitivity) for name, value in moved.items()
            if value > documented[name].sensitivity * (1 + 1e-9) + slack}


def noise_ratio(moved: Mapping[str, float], documented: Mapping[str, Part]) -> float:
    """√Σ_j share_j (‖Δf_j‖/Δ_j)²: how far the release moved in units of the whole mechanism's sensitivity
    (the Gaussian mechanism with noise multiplier σ protects it iff this is <= 1)."""
    return math.sqrt(sum(documented[n].share * (v / documented[n].sensitivity) ** 2 for n, v in moved.items()))


def site_yaml(path: Path, data: dict[str, Any], *, ledger: Path, state: Path | None = None) -> Path:
    """A deployed site in the development profile (seeded noise allowed: tests only) that releases everything."""
    config = {"name": "hospital-a", "profile": "development", "output": str(path.parent / "out"),
              "data": {**data, "batch_size": 4, "holdout_fraction": HOLDOUT},
              "privacy": {"require_dp": True, "epsilon": 1000.0, "min_images": 1, "releases": list(RELEASES),
                          "allow_seeded_noise": True, "ledger": str(ledger)},
              **({"state": str(state)} if state is not None else {})}
    path.write_text(yaml.safe_dump(config))
    return path


Reply = Callable[[Message], Message]


# ------------------------------------------------------------------------------- the mechanism, re-run

def mechanism(kind: str, bounds: Bounds, sigma: float, dim: int, tokens: int
              ) -> tuple[Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """The site's own noise step for a release kind, as a function of a centre (the release's arrays), with
    fresh CSPRNG noise on every call; and the noise std of every released entry the audit's test reads.
    Counts are rounded and clamped after their noise (post-processing): the test leaves them out (std 0)."""
    from tba_fed.federation.wire import encode_probe, encode_similarity, encode_spans
    from tba_fed.privacy.mechanism import NoiseSource
    from tba_fed.privacy.release import noisy_probe, noisy_similarity, noisy_spans

    documented = parts(kind, bounds, tokens)
    std = {name: part.std(sigma) for name, part in documented.items()}
    spans = parse_plan(PLAN, 6).spans
    if kind == "statistics":
        def release(centre):
            return encode_spans(noisy_spans(decode_private_spans(dict(centre), spans, dim), list(documented.values()),
                                            sigma, NoiseSource.secure()))
        stds = {}
        for split in ("calibration", "holdout"):
            for span in spans:
                for name in SPAN_STATISTICS:
                    stds[f"{split}/{span.key}/{'gram_triu' if name == 'gram' else name}"] = np.asarray(std[f"{span}:{name}"])
                stds[f"{split}/{span.key}/weight"] = np.asarray(std["weight"])
        return release, stds
    if kind == "similarity":
        def release(centre):
            stats = decode_similarity(dict(centre), 6)
            return encode_similarity(noisy_similarity(stats, list(documented.values()), sigma, NoiseSource.secure(),
                                                      tokens))
        pairs = np.triu(np.ones((6, 6)), k=1)  # noise only on the pairs a < b that are read
        return release, {"sq_dist": pairs * std["sq_dist"], "cos_sum": pairs * std["cos_sum"],
                         "angle_sum": pairs * std["angle_sum"], "sq_norm": np.asarray(std["sq_norm"])}
    if kind == "probe":
        def release(centre):
            stats = decode_probe(dict(centre), dim, NUM_CLASSES, psd_tolerance=None)
            return encode_probe(noisy_probe(stats, list(documented.values()), sigma, NoiseSource.secure()))
        return release, {f"{m}/{name}": np.asarray(std[f"{m}:{name.removesuffix('_triu')}"])
                         for m in MODELS for name in ("gram_triu", "cross", "sum_f")}
    raise ValueError(f"{kind}: its released values are rounded counts; audit them with Clopper-Pearson alone")
