"""What travels between sites and the server, and the checks every reply must pass.

Statistics travel as flat ``{name: float64 ndarray}`` dicts (a Flower ``ArrayRecord``). Symmetric
matrices travel packed as their upper triangle; scalars (sums, counts) as 1-element vectors, since
Flower's ``Array`` does not keep 0-d shapes. Nothing per-image ever appears: only sums and counts.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..adapter import collected_kinds
from ..checkpoint import decode_maps, map_tensors
from ..errors import TBAInputError
from ..plan import Span
from ..privacy.clipped import ClippedSpanSums
from ..privacy.policy import PrivacyRequest
from ..privacy.ranges import statistics_ranges
from ..privacy.sensitivity import span_label
from ..probe import ProbeHead, ProbeStats
from ..solver import LinearMap
from ..stats import SimilarityStats, SpanStats, check_arrays, check_counts

Arrays = dict[str, np.ndarray]
SPLITS = ("calibration", "holdout")


def statistics_groups(map_choice: str) -> tuple[str, ...]:
    """The groups of span sums a statistics reply holds: one per split, and under ``map: auto`` one per split of
    each kind (``linear/calibration``, ``folded/holdout``, ...): sums like any other, so they merge and travel alike."""
    return tuple(group_name(map_choice, kind, split) for kind in collected_kinds(map_choice) for split in SPLITS)


def group_name(map_choice: str, kind: str, split: str) -> str:
    """The group holding one kind's sums of one split: the split alone, or ``kind/split`` under ``map: auto``."""
    return split if map_choice != "auto" else f"{kind}/{split}"


def kind_groups(per_group: Mapping[str, Mapping[Span, Any]], map_choice: str, split: str) -> dict[str, dict[Span, Any]]:
    """One split's sums per kind collected (`collected_kinds`), from a reply's groups (`statistics_groups`)."""
    return {kind: dict(per_group[group_name(map_choice, kind, split)]) for kind in collected_kinds(map_choice)}


def pack_symmetric(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0])].copy()


def unpack_symmetric(packed: np.ndarray, field: str) -> np.ndarray:
    n = int((np.sqrt(8 * packed.size + 1) - 1) / 2)
    if packed.ndim != 1 or n * (n + 1) // 2 != packed.size:
        raise TBAInputError(field, f"packed length {packed.size} is not a triangular number")
    full = np.zeros((n, n), dtype=packed.dtype)
    full[np.triu_indices(n)] = packed
    return full + np.triu(full, 1).T


@dataclass(frozen=True)
class Field:
    """One array of a statistics type: the accumulator's name for it and its shape in the type's sizes."""

    name: str
    shape: tuple[str, ...] = ()  # sizes by name ("dim", "blocks", "classes"); () is a scalar
    symmetric: bool = False  # a Gram matrix: travels as its upper triangle, named ``<name>_triu``
    count: bool = False  # tokens or images: a non-negative integer, an int in the accumulator

    @property
    def key(self) -> str:
        return self.name + "_triu" if self.symmetric else self.name

    def wire_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        if self.symmetric:
            n = sizes[self.shape[0]]
            return (n * (n + 1) // 2,)
        return tuple(sizes[s] for s in self.shape) or (1,)  # Flower's Array drops 0-d shapes


@dataclass(frozen=True)
class Schema:
    """One statistics type as it travels, the single list of its fields: it encodes, gives the shapes a reply
    must have (and a SecAgg+ sum is read back with), and checks and unpacks a reply, once.

    A payload holds one group of the fields per prefix (``calibration/1-3/``, ``original/``; ``""`` for one)."""

    kind: str  # what a refusal names: "statistics", "probe", ...
    fields: tuple[Field, ...]

    def shapes(self, prefixes: Iterable[str], **sizes: int) -> dict[str, tuple[int, ...]]:
        return {prefix + f.key: f.wire_shape(sizes) for prefix in prefixes for f in self.fields}

    def keyed(self, groups: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """``{prefix: {field name: value}}`` (e.g. a SecAgg+ range per statistic) -> one value per wire key."""
        return {prefix + f.key: values[f.name] for prefix, values in groups.items() for f in self.fields}

    def encode(self, groups: Mapping[str, Mapping[str, np.ndarray]]) -> Arrays:
        out: Arrays = {}
        for prefix, arrays in groups.items():
            for f in self.fields:
                value = np.asarray(arrays[f.name])
                out[prefix + f.key] = pack_symmetric(value) if f.symmetric else np.atleast_1d(value)
        return out

    def decode(self, arrays: Mapping[str, np.ndarray], prefixes: Iterable[str], **sizes: int) -> dict[str, dict[str, Any]]:
        """Check every array as it travelled (keys, shapes, float64, finite, magnitude, counts), then give each
        group's fields as the accumulator holds them: float64 tensors, full Gram matrices, int counts."""
        prefixes = list(prefixes)
        check_arrays(arrays, self.shapes(prefixes, **sizes), self.kind)
        out = {}
        for prefix in prefixes:
            check_counts(arrays, [prefix + f.key for f in self.fields if f.count], self.kind)
            group: dict[str, Any] = {}
            for f in self.fields:
                value = np.asarray(arrays[prefix + f.key])
                if f.count:
                    group[f.name] = int(value.item())
                    continue
                if f.symmetric:
                    value = unpack_symmetric(value, prefix + f.key)
                elif not f.shape:
                    value = value.reshape(())
                group[f.name] = torch.from_numpy(np.array(value, dtype=np.float64))
            out[prefix] = group
        return out


TOKENS, IMAGES = Field("tokens", count=True), Field("images", count=True)
SIMILARITY = Schema("similarity", (Field("sq_dist", ("blocks", "blocks")), Field("cos_sum", ("blocks", "blocks")),
                                   Field("angle_sum", ("blocks", "blocks")), Field("sq_norm", ("blocks",)), TOKENS, IMAGES))
SPAN = Schema("statistics", (Field("gram", ("dim", "dim"), symmetric=True), Field("cross", ("dim", "dim")),
                             Field("sum_x", ("dim",)), Field("sum_y", ("dim",)), Field("sum_yy"), TOKENS, IMAGES))
PRIVATE_SPAN = Schema("statistics", (Field("gram", ("dim", "dim"), symmetric=True), Field("cross_residual", ("dim", "dim")),
                                     Field("sum_x", ("dim",)), Field("sum_r", ("dim",)), Field("sum_rr"), Field("weight")))
PROBE = Schema("probe", (Field("gram", ("dim", "dim"), symmetric=True), Field("cross", ("dim", "classes")),
                         Field("sum_f", ("dim",)), Field("class_counts", ("classes",)), TOKENS, IMAGES))
HEADS = Schema("heads", (Field("weight", ("classes", "dim")), Field("bias", ("classes",))))


def _span_prefixes(spans: Iterable[Span], groups: Iterable[str] = SPLITS) -> list[str]:
    return [f"{group}/{span.key}/" for group in groups for span in spans]


def encode_similarity(stats: SimilarityStats) -> Arrays:
    return SIMILARITY.encode({"": stats.to_arrays()})


def decode_similarity(arrays: Mapping[str, np.ndarray], num_blocks: int) -> SimilarityStats:
    return SimilarityStats(**SIMILARITY.decode(arrays, [""], blocks=num_blocks)[""])


def encode_spans(per_split: Mapping[str, Mapping[Span, SpanStats | ClippedSpanSums]]) -> Arrays:
    """``{split}/{s}-{e}/{name}``: exact sums (`SpanStats`) or a private release (weighted residual-form
    `ClippedSpanSums`), each by its schema."""
    groups = {f"{split}/{span.key}/": acc for split, stats in per_split.items() for span, acc in stats.items()}
    schema = PRIVATE_SPAN if any(isinstance(acc, ClippedSpanSums) for acc in groups.values()) else SPAN
    return schema.encode({prefix: acc.to_arrays() for prefix, acc in groups.items()})


def private_span_shapes(spans: Iterable[Span], dim: int, map_choice: str = "linear") -> dict[str, tuple[int, ...]]:
    """What a private statistics release of the run's `map_choice` holds (the shapes a SecAgg+ sum of it is read
    back with)."""
    return PRIVATE_SPAN.shapes(_span_prefixes(spans, statistics_groups(map_choice)), dim=dim)


def secure_ranges(request: PrivacyRequest, spans: Iterable[Span], max_images: int, map_choice: str = "linear"
                  ) -> dict[str, float]:
    """The SecAgg+ range of every array of a private statistics release of the run's `map_choice` (`privacy.ranges`,
    per statistic of each kind, from that kind's bounds)."""
    spans, kinds = list(spans), collected_kinds(map_choice)
    ranges = statistics_ranges(request, spans, max_images, kinds)
    return PRIVATE_SPAN.keyed({f"{group_name(map_choice, kind, split)}/{span.key}/": ranges[span_label(kind, span, kinds)]
                               for kind in kinds for split in SPLITS for span in spans})


def decode_spans(arrays: Mapping[str, np.ndarray], spans: Iterable[Span], dim: int, *,
                 psd_tolerance: float | None = 1e-9, map_choice: str = "linear") -> dict[str, dict[Span, SpanStats]]:
    """Exact span sums of the run's `map_choice` (`statistics_groups`), checked by their schema and each Gram for
    positive semi-definiteness."""
    spans, names = list(spans), statistics_groups(map_choice)
    groups = SPAN.decode(arrays, _span_prefixes(spans, names), dim=dim)
    for prefix, group in groups.items():
        check_psd(group["gram"], f"statistics.{prefix}gram_triu", psd_tolerance)
    return {name: {span: SpanStats(**groups[f"{name}/{span.key}/"]) for span in spans} for name in names}


def decode_private_spans(arrays: Mapping[str, np.ndarray], spans: Iterable[Span], dim: int, map_choice: str = "linear"
                         ) -> dict[str, dict[Span, ClippedSpanSums]]:
    """A private release of the run's `map_choice` (`statistics_groups`), checked by its schema (noise makes the Gram
    indefinite and the weight fractional, so neither PSD nor integrality is checked here)."""
    spans, names = list(spans), statistics_groups(map_choice)
    groups = PRIVATE_SPAN.decode(arrays, _span_prefixes(spans, names), dim=dim)
    return {name: {span: ClippedSpanSums(**groups[f"{name}/{span.key}/"]) for span in spans} for name in names}


MODELS = ("original", "compressed")


def encode_probe(per_model: Mapping[str, ProbeStats]) -> Arrays:
    return PROBE.encode({f"{which}/": stats.to_arrays() for which, stats in per_model.items()})


def decode_probe(arrays: Mapping[str, np.ndarray], dim: int, num_classes: int, *,
                 psd_tolerance: float | None = 1e-9) -> dict[str, ProbeStats]:
    """Both models' probe sums, checked by their schema. ``psd_tolerance=None`` marks a private (noisy)
    release: its Gram may be indefinite and its class counts fractional, so neither is checked."""
    groups = PROBE.decode(arrays, [f"{which}/" for which in MODELS], dim=dim, classes=num_classes)
    for which in MODELS:
        group = groups[f"{which}/"]
        check_psd(group["gram"], f"probe.{which}/gram_triu", psd_tolerance)
        counts, images = group["class_counts"].numpy(), group["images"]
        if psd_tolerance is not None and (counts.min(initial=0) < 0 or not np.array_equal(counts, np.round(counts))
                                          or counts.sum() != images):
            raise TBAInputError(f"probe.{which}/class_counts", f"{counts.tolist()} are not non-negative integers "
                                                               f"summing to the {images} images")
    return {which: ProbeStats(**groups[f"{which}/"]) for which in MODELS}


def encode_heads(heads: Mapping[str, ProbeHead]) -> Arrays:
    return HEADS.encode({f"{which}/": {"weight": head.weight.numpy(), "bias": head.bias.numpy()}
                         for which, head in heads.items()})


def decode_heads(arrays: Mapping[str, np.ndarray], dim: int, num_classes: int) -> dict[str, ProbeHead]:
    groups = HEADS.decode(arrays, [f"{which}/" for which in MODELS], dim=dim, classes=num_classes)
    return {which: ProbeHead(**groups[f"{which}/"]) for which in MODELS}


ACCURACY = ("original_correct", "compressed_correct", "total")


def decode_accuracy(record: Mapping[str, Any]) -> dict[str, int]:
    """A site's correct counts (a metric record): integers with 0 <= correct <= total."""
    counts = {k: record[k] for k in ACCURACY}
    if any(not isinstance(v, int) or v < 0 for v in counts.values()) or \
            max(counts["original_correct"], counts["compressed_correct"]) > counts["total"]:
        raise TBAInputError("accuracy", f"counts must be integers with 0 <= correct <= total, got {counts}")
    return counts


def check_psd(gram: torch.Tensor, field: str, tolerance: float | None) -> None:
    """A Gram matrix Σxxᵀ is positive semi-definite; a reply whose G is not was corrupted or forged.

    ``tolerance=None`` skips the check: a differentially private Gram carries symmetric noise and is
    legitimately indefinite (the server projects it onto the PSD cone instead).
    """
    if tolerance is None:
        return
    eigvals = torch.linalg.eigvalsh(gram)
    scale = max(float(eigvals[-1]), 1e-300)
    if float(eigvals[0]) < -tolerance * scale:
        raise TBAInputError(field, f"not positive semi-definite (smallest eigenvalue {float(eigvals[0]):.3g}, "
                                   f"largest {scale:.3g})")


def encode_maps(maps: Mapping[Span, LinearMap]) -> Arrays:
    return {k: v.numpy() for k, v in map_tensors(maps).items()}


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))


def payload_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of a payload: every array's name, dtype, shape and raw bytes, in sorted name order, each
    part length-prefixed, so equal payloads hash alike on both ends of the wire whatever the dict order."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        for part in (json.dumps([name, value.dtype.str, list(value.shape)]).encode(), value.tobytes()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def encode_priors(maps: Mapping[Span, LinearMap]) -> str:
    """Prior maps as text for a config record (Flower's legacy FitIns config holds scalars only):
    JSON of ``{name: [shape, base64 of little-endian float64]}``, decoded with full validation."""
    arrays = {k: v.numpy().astype("<f8") for k, v in map_tensors(maps).items()}
    return json.dumps({k: [list(v.shape), base64.b64encode(v.tobytes()).decode()] for k, v in arrays.items()})


def decode_priors(text: str, spans: Iterable[Span], dim: int) -> dict[Span, LinearMap]:
    try:
        raw = json.loads(text)
        arrays = {k: np.frombuffer(base64.b64decode(v[1], validate=True), dtype="<f8").astype(np.float64).reshape(v[0])
                  for k, v in raw.items()}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise TBAInputError("prior-maps", f"not a valid encoding of prior maps ({err})") from None
    return decode_maps(arrays, spans, (), dim, "prior-maps")
