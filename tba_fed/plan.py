"""Approximation plans in the paper's notation and their exact selection under a budget.

"s->e" (0-based) maps the output of block s to the output of block e and removes blocks s+1..e.
Two spans may not share a block: in "1->2, 2->3" the second span would read a removed block, so it
is rejected in favour of "1->3".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import TBAInputError

_SPAN = re.compile(r"^\s*(-?\d+)\s*(?:->|→)\s*(-?\d+)\s*$")


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int

    @property
    def removed(self) -> range:
        """Indices of the blocks this span replaces."""
        return range(self.start + 1, self.end + 1)

    def __str__(self) -> str:
        return f"{self.start}->{self.end}"

    @property
    def key(self) -> str:
        """Name used in saved tensors and messages (``span.{s}-{e}``)."""
        return f"{self.start}-{self.end}"


@dataclass(frozen=True)
class Plan:
    spans: tuple[Span, ...]

    def __str__(self) -> str:
        return ", ".join(str(s) for s in self.spans)

    @property
    def removed_blocks(self) -> list[int]:
        return [i for span in self.spans for i in span.removed]


def validate_plan(spans: Iterable[Span], num_blocks: int, field: str = "plan") -> Plan:
    ordered = tuple(sorted(spans))
    if not ordered:
        raise TBAInputError(field, "the plan is empty", 'give at least one span, e.g. "1->2"')
    for span in ordered:
        if not 0 <= span.start < span.end < num_blocks:
            raise TBAInputError(field, f"span {span} needs 0 <= s < e <= {num_blocks - 1} "
                                       f"(the model has {num_blocks} blocks, indices are 0-based)")
    for left, right in zip(ordered, ordered[1:]):
        if right.start < left.end:
            raise TBAInputError(field, f"spans {left} and {right} overlap", "make the spans disjoint")
        if right.start == left.end:
            raise TBAInputError(field, f"spans {left} and {right} share block {left.end}",
                                f"merge them into {left.start}->{right.end}")
    return Plan(ordered)


def parse_plan(text: str, num_blocks: int, field: str = "plan") -> Plan:
    """Parse ``"1->2, 4->5"`` (``→`` also accepted) and validate it against the model depth."""
    spans = []
    for part in str(text).split(","):
        match = _SPAN.match(part)
        if not match:
            raise TBAInputError(field, f"cannot read span {part.strip()!r}", 'write spans as "s->e", e.g. "1->2, 4->5"')
        spans.append(Span(int(match[1]), int(match[2])))
    return validate_plan(spans, num_blocks, field)


def select_plan(
    cost: np.ndarray,
    *,
    blocks: int | None = None,
    params: int | None = None,
    block_params: int | None = None,
    map_params: int = 0,
    max_span: int | None = None,
) -> Plan:
    """Non-overlapping spans of minimum summed cost, found exactly by dynamic programming.

    ``cost[s, e]`` (s < e) is the similarity cost of span s->e. Give either ``blocks`` (remove
    exactly that many blocks) or ``params`` (remove at least that many parameters net of the
    added maps; needs ``block_params``, the size of one block, and ``map_params``). Among plans meeting a parameter
    budget the cheapest wins, ties going to fewer removed blocks.
    """
    n = cost.shape[0]
    if (blocks is None) == (params is None):
        raise TBAInputError("budget", "give exactly one of blocks or params")
    if blocks is not None and not 1 <= blocks <= n - 1:
        raise TBAInputError("budget.blocks", f"must be between 1 and {n - 1}, got {blocks}")
    if params is not None:
        if block_params is None:
            raise TBAInputError("budget.params", "needs the parameter count of a block")
        if params <= 0:
            raise TBAInputError("budget.params", f"must be positive, got {params}")
    longest = n - 1 if max_span is None else max_span
    max_removed = n - 1
    # best[i][k][m]: cheapest spans inside blocks 0..i (block i kept or a span's end) removing k blocks
    # with m maps; spans end where they end, so the "shares a block" rule is the strict gap below.
    best = np.full((n, max_removed + 1, n), math.inf)
    back: dict[tuple[int, int, int], tuple[int, int, int, Span | None]] = {}
    best[0, 0, 0] = 0.0
    for i in range(1, n):
        for k in range(max_removed + 1):
            for m in range(n):
                # block i is kept and is not the end of a span
                if best[i - 1, k, m] < best[i, k, m]:
                    best[i, k, m] = best[i - 1, k, m]
                    back[(i, k, m)] = (i - 1, k, m, None)
                # a span s->i, whose start s is kept and not the end of another span (prev state at s-1)
                if m == 0:
                    continue
                for s in range(max(0, i - longest), i):
                    width = i - s
                    if width > k or not np.isfinite(cost[s, i]):
                        continue
                    prev = best[s - 1, k - width, m - 1] if s >= 1 else (0.0 if (k == width and m == 1) else math.inf)
                    value = prev + float(cost[s, i])
                    if value < best[i, k, m]:
                        best[i, k, m] = value
                        back[(i, k, m)] = (s - 1, k - width, m - 1, Span(s, i))
    last = n - 1
    if blocks is not None:
        candidates = [(best[last, blocks, m], blocks, m) for m in range(n)]
    else:
        candidates = [(best[last, k, m], k, m) for k in range(1, max_removed + 1) for m in range(1, n)
                      if k * block_params - m * map_params >= params]
    finite = [c for c in candidates if np.isfinite(c[0])]
    if not finite:
        raise TBAInputError("budget", "no plan meets this budget", "lower the budget or allow longer spans")
    _, k, m = min(finite)
    spans: list[Span] = []
    state: tuple[int, int, int] = (last, k, m)
    while state[0] >= 0 and state in back:
        i, kk, mm, span = back[state]
        if span is not None:
            spans.append(span)
        state = (i, kk, mm)
    return Plan(tuple(sorted(spans)))

