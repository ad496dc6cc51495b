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

import numpy as np
import torch

from ..checkpoint import decode_maps, map_tensors
from ..errors import TBAInputError
from ..plan import Span
from ..privacy.clipped import ClippedSpanSums
from ..probe import ProbeHead, ProbeStats
from ..solver import LinearMap
from ..stats import SimilarityStats, SpanStats, check_arrays, check_counts

Arrays = dict[str, np.ndarray]
SPLITS = ("calibration", "holdout")


def pack_symmetric(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(matrix.shape[0])].copy()


def unpack_symmetric(packed: np.ndarray, field: str) -> np.ndarray:
    n = int((np.sqrt(8 * packed.size + 1) - 1) / 2)
    if packed.ndim != 1 or n * (n + 1) // 2 != packed.size:
        raise TBAInputError(field, f"packed length {packed.size} is not a triangular number")
    full = np.zeros((n, n), dtype=packed.dtype)
    full[np.triu_indices(n)] = packed
    return full + np.triu(full, 1).T


SCALARS = ("sum_yy", "tokens", "images")


def _vectors(arrays: Mapping[str, np.ndarray]) -> Arrays:
    return {k: np.atleast_1d(v) for k, v in arrays.items()}


def _scalars(arrays: Mapping[str, np.ndarray]) -> Arrays:
    """Undo the 1-element encoding of the known scalar fields; other shapes are left to validation."""
    out = dict(arrays)
    for key in SCALARS:
        if key in out and np.shape(out[key]) == (1,):
            out[key] = np.asarray(out[key]).reshape(())
    return out


def encode_similarity(stats: SimilarityStats) -> Arrays:
    return _vectors(stats.to_arrays())


def similarity_shapes(num_blocks: int) -> dict[str, tuple[int, ...]]:
    square = (num_blocks, num_blocks)
    return {"sq_dist": square, "cos_sum": square, "angle_sum": square, "sq_norm": (num_blocks,), "tokens": (1,),
            "images": (1,)}


def decode_similarity(arrays: Mapping[str, np.ndarray], num_blocks: int) -> SimilarityStats:
    """Check every array as it travelled (keys, shapes for `num_blocks`, float64, finite, counts), then rebuild."""
    check_arrays(arrays, similarity_shapes(num_blocks), "similarity")
    check_counts(arrays, ("tokens", "images"), "similarity")
    return SimilarityStats.from_arrays(_scalars(arrays))


def encode_spans(per_split: Mapping[str, Mapping[Span, SpanStats | ClippedSpanSums]]) -> Arrays:
    """``{split}/{s}-{e}/{name}``; the Gram matrix as ``gram_triu``. Exact sums (`SpanStats`) and
    private releases (weighted residual-form `ClippedSpanSums`) travel alike."""
    out: Arrays = {}
    for split, stats in per_split.items():
        for span, acc in stats.items():
            for name, value in _vectors(acc.to_arrays()).items():
                key = f"{split}/{span.key}/{name}"
                if name == "gram":
                    out[key + "_triu"] = pack_symmetric(value)
                else:
                    out[key] = value
    return out


SPAN_FIELDS = ("gram_triu", "cross", "sum_x", "sum_y", "sum_yy", "tokens", "images")


def span_shapes(spans: Iterable[Span], dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {"gram_triu": (dim * (dim + 1) // 2,), "cross": (dim, dim), "sum_x": (dim,), "sum_y": (dim,),
              "sum_yy": (1,), "tokens": (1,), "images": (1,)}
    return {f"{split}/{span.key}/{name}": shapes[name] for split in SPLITS for span in spans for name in SPAN_FIELDS}


def decode_spans(arrays: Mapping[str, np.ndarray], spans: Iterable[Span], dim: int, *,
                 psd_tolerance: float | None = 1e-9) -> dict[str, dict[Span, SpanStats]]:
    """Rebuild and check every span's statistics: keys, shapes, dtypes, finiteness, counts, Gram PSD."""
    spans = list(spans)
    check_arrays(arrays, span_shapes(spans, dim), "statistics")
    out: dict[str, dict[Span, SpanStats]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for span in spans:
            prefix = f"{split}/{span.key}/"
            check_counts(arrays, (prefix + "tokens", prefix + "images"), "statistics")
            fields = {name: np.asarray(arrays[prefix + name]) for name in SPAN_FIELDS[1:]}
            gram = unpack_symmetric(np.asarray(arrays[prefix + "gram_triu"]), prefix + "gram_triu")
            acc = SpanStats.from_arrays(_scalars({"gram": gram, **fields}))
            check_psd(acc.gram, f"statistics.{prefix}gram_triu", psd_tolerance)
            out[split][span] = acc
    return out


MODELS = ("original", "compressed")


def encode_probe(per_model: Mapping[str, ProbeStats]) -> Arrays:
    """``{model}/{name}``; the feature Gram as ``gram_triu``."""
    out: Arrays = {}
    for which, stats in per_model.items():
        for name, value in _vectors(stats.to_arrays()).items():
            out[f"{which}/{name}_triu" if name == "gram" else f"{which}/{name}"] = \
                pack_symmetric(value) if name == "gram" else value
    return out


PROBE_FIELDS = ("gram_triu", "cross", "sum_f", "class_counts", "tokens", "images")


def probe_shapes(dim: int, num_classes: int) -> dict[str, tuple[int, ...]]:
    shapes = {"gram_triu": (dim * (dim + 1) // 2,), "cross": (dim, num_classes), "sum_f": (dim,),
              "class_counts": (num_classes,), "tokens": (1,), "images": (1,)}
    return {f"{which}/{name}": shapes[name] for which in MODELS for name in PROBE_FIELDS}


def decode_probe(arrays: Mapping[str, np.ndarray], dim: int, num_classes: int, *,
                 psd_tolerance: float | None = 1e-9) -> dict[str, ProbeStats]:
    """Rebuild and check both models' probe sums. ``psd_tolerance=None`` marks a private (noisy) release:
    its Gram may be indefinite and its class counts fractional, so neither is checked."""
    check_arrays(arrays, probe_shapes(dim, num_classes), "probe")
    out = {}
    for which in MODELS:
        check_counts(arrays, (f"{which}/tokens", f"{which}/images"), "probe")
        fields = {n: np.asarray(arrays[f"{which}/{n}"]) for n in PROBE_FIELDS[1:]}
        gram = unpack_symmetric(np.asarray(arrays[f"{which}/gram_triu"]), f"{which}/gram_triu")
        stats = ProbeStats.from_arrays(_scalars({"gram": gram, **fields}))
        check_psd(stats.gram, f"probe.{which}/gram_triu", psd_tolerance)
        counts = stats.class_counts.numpy()
        if psd_tolerance is not None and (counts.min(initial=0) < 0 or not np.array_equal(counts, np.round(counts))
                                          or counts.sum() != stats.images):
            raise TBAInputError(f"probe.{which}/class_counts", f"{counts.tolist()} are not non-negative integers "
                                                               f"summing to the {stats.images} images")
        out[which] = stats
    return out


def encode_heads(heads: Mapping[str, ProbeHead]) -> Arrays:
    return {f"{which}/{name}": getattr(head, name).numpy() for which, head in heads.items() for name in ("weight", "bias")}


def decode_heads(arrays: Mapping[str, np.ndarray], dim: int, num_classes: int) -> dict[str, ProbeHead]:
    check_arrays(arrays, {f"{which}/{name}": shape for which in MODELS
                          for name, shape in (("weight", (num_classes, dim)), ("bias", (num_classes,)))}, "heads")
    return {which: ProbeHead(torch.from_numpy(np.array(arrays[f"{which}/weight"])),
                             torch.from_numpy(np.array(arrays[f"{which}/bias"]))) for which in MODELS}


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


PRIVATE_SPAN_FIELDS = ("gram_triu", "cross_residual", "sum_x", "sum_r", "sum_rr", "weight")


def private_span_shapes(spans: Iterable[Span], dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {"gram_triu": (dim * (dim + 1) // 2,), "cross_residual": (dim, dim), "sum_x": (dim,), "sum_r": (dim,),
              "sum_rr": (1,), "weight": (1,)}
    return {f"{split}/{span.key}/{name}": shape for split in SPLITS for span in spans for name, shape in shapes.items()}


def decode_private_spans(arrays: Mapping[str, np.ndarray], spans: Iterable[Span], dim: int
                         ) -> dict[str, dict[Span, ClippedSpanSums]]:
    """Rebuild and check a private release: keys, shapes, float64, finiteness (noise makes the Gram
    indefinite and the weight fractional, so neither PSD nor integrality is checked here)."""
    spans = list(spans)
    check_arrays(arrays, private_span_shapes(spans, dim), "statistics")
    out: dict[str, dict[Span, ClippedSpanSums]] = {split: {} for split in SPLITS}
    for split in SPLITS:
        for span in spans:
            p = f"{split}/{span.key}/"
            t = {name: torch.from_numpy(np.array(arrays[p + name])) for name in PRIVATE_SPAN_FIELDS}
            out[split][span] = ClippedSpanSums(
                gram=torch.from_numpy(unpack_symmetric(np.asarray(arrays[p + "gram_triu"]), p + "gram_triu")),
                cross_residual=t["cross_residual"], sum_x=t["sum_x"], sum_r=t["sum_r"],
                sum_rr=t["sum_rr"].reshape(()), weight=t["weight"].reshape(()))
    return out


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
