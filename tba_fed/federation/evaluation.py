"""Rounds 4-5 of a run with evaluation: probe sums from every site, the heads solved here, correct counts back
(noisy under differential privacy), scored pooled and per site."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, MessageType, RecordDict

from ..plan import Span
from ..probe import solve_probe
from ..solver import LinearMap
from .config import FederatedRunConfig
from .records import from_record, to_record
from .releases import Exact, check_images
from .rounds import Rounds
from .wire import MODELS, decode_accuracy, decode_probe, encode_heads, encode_maps

_logger = logging.getLogger(__name__)


def evaluate(rounds: Rounds, config: FederatedRunConfig, release: Exact, settings: Mapping[str, Any],
             maps: Mapping[Span, LinearMap], dim: int) -> dict[str, Any]:
    """`settings`: the install round's model, profile, plan and identity spans."""
    fed, ev = config.federation, config.evaluation
    request = release.probe_request()
    settings = {**settings, "num-classes": ev.num_classes, "privacy": request.to_json() if request is not None else ""}

    def accept_probe(reply: RecordDict) -> dict[str, Any]:
        stats = decode_probe(from_record(reply.array_records["probe"]), dim, ev.num_classes,
                             psd_tolerance=None if request is not None else fed.psd_tolerance)
        check_images(stats["original"].images, fed.min_images_per_site, "probe.images")
        return stats

    replies = rounds.ask("probe", f"{MessageType.QUERY}.probe",
                         lambda: RecordDict({"maps": to_record(encode_maps(maps)), "config": ConfigRecord(settings)}),
                         accept_probe, images=lambda stats: stats["original"].images)
    pooled_stats = release.probe_stats({which: sum(r[which] for r in replies.values()) for which in MODELS}, len(replies))
    heads = {which: solve_probe(stats, ridge=ev.probe_ridge) for which, stats in pooled_stats.items()}
    counts = rounds.ask("accuracy", f"{MessageType.EVALUATE}.accuracy",
                        lambda: RecordDict({"maps": to_record(encode_maps(maps)), "heads": to_record(encode_heads(heads)),
                                            "config": ConfigRecord(settings)}),
                        lambda reply: decode_accuracy(reply.metric_records["accuracy"]), images=lambda c: c["total"])
    total = sum(c["total"] for c in counts.values())
    pooled = {which: sum(c[f"{which}_correct"] for c in counts.values()) / max(total, 1) for which in MODELS}
    per_site = {site: {"images": c["total"], "original": c["original_correct"] / max(c["total"], 1),
                       "compressed": c["compressed_correct"] / max(c["total"], 1)} for site, c in sorted(counts.items())}
    _logger.info("accuracy (pooled over %d held-out images): original %.4f, compressed %.4f", total,
                 pooled["original"], pooled["compressed"])
    return {"probe": "closed-form ridge probe on the final-norm class token", "probe_ridge": ev.probe_ridge,
            "probe_images": int(sum(r["original"].images for r in replies.values())), "test_images": total,
            "pooled": pooled, "sites": per_site}
