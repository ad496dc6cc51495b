"""Secure aggregation: the server learns only the SUM over sites of named float64 arrays.

Built on Flower's SecAgg+ (``flwr.server.workflow.SecAggPlusWorkflow`` with the client mod
``flwr.client.mod.secaggplus_mod``), which exists only on Flower's legacy path: :func:`secure_sum` runs one
fit round of ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on given nodes, from the same ServerApp
that drives tba-fed's own Message rounds. The site side is one handler for the plain legacy ``"train"``
message type with secaggplus_mod as a per-handler mod, so tba-fed's ``query.*``/``train.install`` handlers
are untouched (secaggplus_mod also passes any message type other than ``"train"`` through).

What SecAgg+ computes, read off flwr 1.41 and unchanged in 1.42 (``secaggplus_mod._collect_masked_vectors`` and
``SecAggPlusWorkflow.unmask_stage``): each site sends ``[q, quantize(x * q / Q)]`` masked, with
``q = round(num_examples / max_weight * Q)`` (Q = quantization_range); the server dequantises the masked
sum and divides by ``sum(q) / Q``: a weighted average. Every site here reports ``num_examples = 1`` and
the workflow uses ``max_weight = 1.0``, so ``q = Q`` exactly, the values are multiplied by exactly 1.0
before quantisation, and the result is the plain mean over the n summed sites; :func:`secure_sum`
multiplies it by n. Each array is divided by its bound before SecAgg+ sees it and multiplied back after,
so ``clipping_range = 1.0`` never clips (sites refuse entries beyond their bound).

Quantisation error (``quantization.quantize``/``dequantize``): ``quantize`` maps ``v`` in [-c, c] to
``(v + c) * Q / (2c)`` and rounds stochastically to the floor or the ceiling, an error below one step,
i.e. below ``2c / Q`` in scaled units per site and entry (the step is ``2c/Q``, not ``2c/(Q-1)``:
``dequantize`` multiplies by ``2c/Q``). With ``q = Q`` the weighting adds no error, and the integer sum
is exact modulo ``M = 2**32`` as long as it cannot wrap: each site contributes an integer in [0, Q], so
``n * Q < M`` is required (checked). The mean's error is below ``2c/Q``, the sum's below ``n * 2c / Q``,
and in the caller's units (c = 1) the worst-case absolute error per entry of the sum is

    error_bound[name] = n * bound[name] * (2 / Q + 64 * eps)     (eps = float64 machine epsilon)

where the ``64 * eps`` term generously covers float64 rounding of scaling, quantising and dequantising.

Robustness: a site that fails or drops out at the masked-vector stage is left out of the sum (SecAgg+
removes its pairwise masks); one lost at the unmask stage stays in it (the others' key shares suffice).
Flower's workflow cannot survive a dropout at the setup or share-keys stage
(``flower_internals.SecAggPlusWorkflowFixed`` fixes that bookkeeping). ``timeout`` applies to each of the four stages.

Privacy caveats (Flower's implementation, semi-honest server): masks come from ``numpy.random.RandomState``
seeded with 32 bits folded from the shared secrets, and the FitRes metrics/num_examples travel in clear
(this module sends none besides num_examples = 1). A sum over two sites reveals each one's values to the
other. The server's process briefly holds sums over fewer than ``min_sites`` sites before refusing them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (Code, EvaluateIns, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.strategy import Strategy
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from ..errors import FederationError, TBAInputError
from ..privacy.policy import SecureRound
from .failures import error_reason, refusal_error
from .flower_internals import ClientProxy, SecAggPlusWorkflowFixed, fitins_from_content, fitres_content, secagg_round

_logger = logging.getLogger(__name__)

MODULUS = 2**32  # Flower's default modulus_range (the masks' range); must exceed sites * quantization_range
CLIPPING_RANGE = 1.0  # arrays reach SecAgg+ divided by their bounds: entries in [-1, 1]
MAX_WEIGHT = 1.0  # with num_examples = 1 every site's weight is exactly 1: the aggregate is the plain mean
_INT32_MAX = 2**31 - 1  # flwr's _stochastic_round casts to int32
_RESERVED = "secure-sum."  # FitIns.config keys this module uses to send the server's shapes and bounds
_SHAPES_KEY, _BOUNDS_KEY = f"{_RESERVED}shapes", f"{_RESERVED}bounds"

Scalar = bool | int | float | str
Compute = Callable[[dict[str, Scalar], Context], tuple[Mapping[str, np.ndarray], Mapping[str, float]]]


class SecureSumRefused(ValueError):
    """A site will not contribute: its arrays break the bounds or the shapes the server scales by. `detail`: what
    of the site's data explains it, for the site's own log line only (the text is what leaves the site)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass
class SecureSum:
    """The secure sum of named arrays over `sites` sites, each entry within `error_bound[name]` of the exact
    sum (quantisation, see the module docstring); `seconds` is the wall time of the SecAgg+ round."""

    arrays: dict[str, np.ndarray]
    sites: int
    error_bound: dict[str, float]
    seconds: float


def quantisation_error_bound(bound: float, sites: int, quantization_range: int) -> float:
    """Worst-case absolute error per entry of a sum of `sites` arrays scaled by `bound` (module docstring)."""
    return float(sites * bound * (2.0 * CLIPPING_RANGE / quantization_range + 64 * np.finfo(np.float64).eps))


def default_threshold(num_nodes: int) -> int:
    """The reconstruction threshold for `num_nodes` sites, each sharing its keys with all: any 2/3 of them
    (at least 2) recover a dropped site's mask, so a third of the sites may drop out."""
    return max(2, math.ceil(2 * num_nodes / 3))


# ----------------------------------------------------------------------------------------------- site side


def _spec(config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, float]]:
    """The shapes and bounds the server will use to read the sum back, from the FitIns config."""
    try:
        shapes = {name: tuple(int(n) for n in shape) for name, shape in json.loads(str(config[_SHAPES_KEY])).items()}
        bounds = {name: float(b) for name, b in json.loads(str(config[_BOUNDS_KEY])).items()}
    except (KeyError, ValueError, TypeError, AttributeError) as err:
        raise SecureSumRefused(f"the request carries no valid {_SHAPES_KEY}/{_BOUNDS_KEY}: {err!r}") from err
    if set(shapes) != set(bounds):
        raise SecureSumRefused(f"the request's shapes {sorted(shapes)} and bounds {sorted(bounds)} name different arrays")
    return shapes, bounds


def scaled_for_secagg(arrays: Mapping[str, np.ndarray], site_bounds: Mapping[str, float],
                      shapes: Mapping[str, tuple[int, ...]], bounds: Mapping[str, float]) -> list[np.ndarray]:
    """A site's arrays divided by the server's bounds, in sorted key order. Refuses (``SecureSumRefused``)
    rather than clip: different names or shapes, non-finite values, a site bound above the server's (the server
    would assume a range the site does not guarantee), or an entry beyond the site's own bound or the server's."""
    if set(arrays) != set(shapes):
        raise SecureSumRefused(f"arrays {sorted(arrays)} differ from the requested {sorted(shapes)}")
    if set(site_bounds) != set(shapes):
        raise SecureSumRefused(f"the site's bounds name {sorted(site_bounds)}, the request {sorted(shapes)}")
    out = []
    for name in sorted(shapes):
        value = np.asarray(arrays[name])
        if value.dtype.kind not in "biuf":
            raise SecureSumRefused(f"'{name}' has dtype {value.dtype}, not real numbers")
        value = value.astype(np.float64)
        if value.shape != tuple(shapes[name]):
            raise SecureSumRefused(f"'{name}' has shape {value.shape}, the request says {tuple(shapes[name])}")
        if not np.isfinite(value).all():
            raise SecureSumRefused(f"'{name}' has non-finite values")
        site_bound, bound = float(site_bounds[name]), float(bounds[name])
        if not site_bound <= bound:
            raise SecureSumRefused(f"'{name}': the site bounds entries by {site_bound:g}, the server scales by "
                                   f"{bound:g}: entries could be clipped")
        largest = float(np.abs(value).max(initial=0.0))
        if largest > site_bound:  # the magnitude is the data's: it stays in the site's log
            raise SecureSumRefused(f"'{name}': an entry exceeds its bound {site_bound:g}",
                                   f"an entry of magnitude {largest:g}")
        out.append(value / bound)
    return out


def secure_round(context: Context) -> SecureRound:
    """What this site's own SecAgg+ state (kept by secaggplus_mod in the node's Context) shows of the round it is
    asked to contribute to: the sites whose public keys it received at set-up, and the reconstruction threshold,
    the fewest sites whose sum the server can unmask. Read at the masked-vector stage, before any image is."""
    found = secagg_round(context)
    if found is None:
        raise SecureSumRefused("no SecAgg+ set-up precedes this request: a secure sum is asked for outside a "
                               "SecAgg+ round")
    return SecureRound(*found)


def register_secure_fit(app: ClientApp, compute: Compute) -> None:
    """Register the secure-sum handler on `app` for the plain ``"train"`` message type, with secaggplus_mod as a
    per-handler mod: the mod answers the setup, key-sharing and unmasking stages itself and calls the handler at
    the masked-vector stage. `compute(config, context)` returns the site's arrays and the bounds it guarantees
    (`config`: the flat dict given to :func:`secure_sum`); a refusal (``SecureSumRefused``, or a TBAInputError from
    `compute`) is answered with an error reply (`refusals_as_errors`), so the server gets no arrays."""

    def secure_fit(msg: Message, context: Context) -> Message:
        """Answer with a legacy FitRes: the checked arrays divided by their bounds, in sorted key order,
        num_examples = 1 and no metrics (FitRes metrics would reach the server unmasked)."""
        fitins = fitins_from_content(msg.content)
        try:
            shapes, bounds = _spec(fitins.config)
            arrays, site_bounds = compute({k: v for k, v in fitins.config.items() if not k.startswith(_RESERVED)},
                                          context)
            scaled = scaled_for_secagg(arrays, site_bounds, shapes, bounds)
        except SecureSumRefused as err:
            _logger.warning("secure sum refused: %s%s", err, f" ({err.detail})" if err.detail else "")
            raise
        fitres = FitRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(scaled), num_examples=1, metrics={})
        return Message(fitres_content(fitres), reply_to=msg)

    app.train(mods=[refusals_as_errors, secaggplus_mod])(secure_fit)


def refusals_as_errors(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Outer mod of the secure round: a refusal (``SecureSumRefused``, or what the site's audit lets leave it, a
    TBAInputError), already logged at the site in one line, goes back as an error reply (`refusal_error`), which the
    server's SecAgg+ workflow counts as the site dropping out; never raised to Flower as a traceback."""
    try:
        return call_next(msg, context)
    except (SecureSumRefused, TBAInputError) as err:
        return refusal_error(msg, err)


# --------------------------------------------------------------------------------------------- server side


class _ObservedGrid:
    """Delegates to the real Grid and notes, per node, an error reply or a missing one, so a failed round can
    name its sites (SecAggPlusWorkflow keeps its failures to itself)."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.problems: dict[int, str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = {reply.metadata.src_node_id for reply in replies}
        for reply in replies:
            if reply.has_error():  # in simulation a Ray traceback quoting the site's message: one line of it
                self.problems.setdefault(reply.metadata.src_node_id, error_reason(reply.error))
        for msg in messages:
            if msg.metadata.dst_node_id not in answered:
                self.problems.setdefault(msg.metadata.dst_node_id, f"no reply within {timeout} s")
        return replies


class _OneSecureRound(Strategy):
    """The strategy of the single SecAgg+ fit round: samples exactly `nodes`, sends `config`, keeps the
    aggregate; no model, no evaluation."""

    def __init__(self, nodes: list[int], config: dict[str, Scalar], problems: dict[int, str]) -> None:
        self.nodes, self.config, self.problems = nodes, config, problems
        self.sites = 0
        self.aggregate: list[np.ndarray] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return Parameters(tensors=[], tensor_type="numpy.ndarray")  # no model: never ask a site for one

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        connected = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        for node in self.nodes:
            if node not in connected:
                self.problems.setdefault(node, "not connected")
        return [(connected[node], FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"), dict(self.config)))
                for node in self.nodes if node in connected]

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAggPlusWorkflow hands every result the same unmasked aggregate; one result per summed site
        self.sites = len(results)
        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def secure_sum(grid: Grid, nodes: list[int], config: dict[str, Scalar], bounds: dict[str, float],
               shapes: dict[str, tuple[int, ...]], *, timeout: float, min_sites: int,
               reconstruction_threshold: int | None = None, quantization_range: int = 2**22,
               site_names: Mapping[int, str] | None = None) -> SecureSum:
    """Run one SecAgg+ fit round on exactly `nodes` and return the sum of the sites' named arrays.

    Every site gets `config` (in FitIns.config, plus the shapes and bounds under reserved keys) and
    answers with arrays of `shapes` whose entries satisfy |entry| <= bounds[name]. Sites that fail or
    refuse drop out of the sum (SecAgg+ removes their masks); fewer than `min_sites` summed sites, a failed
    round or a malformed result raise ``FederationError`` naming each site's problem, by the name in
    `site_names` the server already knows it by (else "node N").
    """
    threshold = default_threshold(len(nodes)) if reconstruction_threshold is None else reconstruction_threshold
    if len(set(nodes)) != len(nodes) or len(nodes) < 2:
        raise ValueError(f"secure_sum needs at least 2 distinct nodes, got {nodes}")
    if not 2 <= min_sites <= len(nodes):
        raise ValueError(f"min_sites must be in [2, {len(nodes)}] (a sum over one site is that site's data), "
                         f"got {min_sites}")
    if not 2 <= threshold <= len(nodes):
        raise ValueError(f"need 2 <= reconstruction_threshold ({threshold}) <= nodes ({len(nodes)})")
    if not shapes or set(shapes) != set(bounds):
        raise ValueError(f"shapes {sorted(shapes)} and bounds {sorted(bounds)} must name the same arrays")
    for name, bound in bounds.items():
        if not (math.isfinite(bound) and bound > 0):
            raise ValueError(f"bound of '{name}' must be finite and positive, got {bound}")
    if bad := [k for k, v in config.items() if k.startswith(_RESERVED) or not isinstance(v, bool | int | float | str)]:
        raise ValueError(f"config keys {bad}: values must be scalars and keys must not start with '{_RESERVED}'")
    if not 2 <= quantization_range <= _INT32_MAX or len(nodes) * quantization_range >= MODULUS:
        raise ValueError(f"quantization_range {quantization_range}: need 2 <= it <= 2**31-1 and "
                         f"{len(nodes)} nodes * it < modulus 2**32 (the masked integer sum must not wrap)")
    names = sorted(shapes)
    shapes = {name: tuple(int(n) for n in shapes[name]) for name in names}
    bounds = {name: float(bounds[name]) for name in names}
    fit_config = {**config, _SHAPES_KEY: json.dumps(shapes), _BOUNDS_KEY: json.dumps(bounds)}

    observed = _ObservedGrid(grid)
    strategy = _OneSecureRound(list(nodes), fit_config, observed.problems)
    # num_shares as the float 1.0 means "all sampled sites" to Flower (its int form must exceed 2: 2 sites)
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflowFixed(
        num_shares=1.0, reconstruction_threshold=threshold,
        max_weight=MAX_WEIGHT, clipping_range=CLIPPING_RANGE, quantization_range=quantization_range,
        modulus_range=MODULUS, timeout=timeout))
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            config=ServerConfig(num_rounds=1), strategy=strategy)
    start = time.perf_counter()

    def site(node: int) -> str:
        return (site_names or {}).get(node, f"node {node}")

    def fail(what: str) -> FederationError:
        detail = "; ".join(f"{site(node)}: {reason}" for node, reason in sorted(observed.problems.items()))
        return FederationError(f"secure sum: {what}" + (f". {detail}" if detail else ""))

    try:
        workflow(observed, context)  # type: ignore[arg-type] - a Grid in all but name
    except Exception as err:  # any failure inside Flower's workflow is a failed round
        raise fail(f"the SecAgg+ round failed ({type(err).__name__}: {err})") from err
    seconds = time.perf_counter() - start
    for node, reason in sorted(observed.problems.items()):
        _logger.warning("secure sum: excluded %s: %s", site(node), reason)
    if strategy.aggregate is None:
        raise fail(f"the SecAgg+ round halted without a result (asked {len(nodes)} sites, min_sites is {min_sites})")
    if strategy.sites < min_sites:
        raise fail(f"{strategy.sites} sites summed, min_sites is {min_sites}")
    if len(strategy.aggregate) != len(names):
        raise fail(f"the result has {len(strategy.aggregate)} arrays, expected {len(names)} ({names})")
    arrays: dict[str, np.ndarray] = {}
    for name, mean in zip(names, strategy.aggregate, strict=True):
        if mean.shape != shapes[name]:
            raise fail(f"'{name}' came back with shape {mean.shape}, expected {shapes[name]}")
        if not np.isfinite(mean).all():
            raise fail(f"'{name}' came back with non-finite values")
        arrays[name] = np.asarray(mean, dtype=np.float64) * strategy.sites * bounds[name]
    error_bound = {name: quantisation_error_bound(bounds[name], strategy.sites, quantization_range) for name in names}
    _logger.info("secure sum of %s over %d sites in %.1f s", ", ".join(names), strategy.sites, seconds)
    return SecureSum(arrays=arrays, sites=strategy.sites, error_bound=error_bound, seconds=seconds)
