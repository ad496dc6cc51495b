"""tba-fed: training-free Transformer Block Approximation for timm vision transformers.

The public names below are imported on first use (PEP 562), so `import tba_fed` and `tba-fed --help` load
neither torch nor Flower; `tba_fed.simulate` brings in Flower only when it is called for.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_API = {
    "ViTAdapter": "adapter",
    "load_compressed": "checkpoint", "save_compressed": "checkpoint",
    "BlockApproximation": "compressed", "build_compressed": "compressed", "parameter_report": "compressed",
    "ModelConfig": "config", "RunConfig": "config", "load_config": "config",
    "TBAInputError": "errors",
    "simulate": "deploy.simulate",
    "create_model": "models",
    "Compression": "pipeline", "SpanFit": "pipeline", "analyze": "pipeline", "calibrate": "pipeline",
    "choose_plan": "pipeline", "solve_plan": "pipeline",
    "Plan": "plan", "Span": "plan", "parse_plan": "plan", "select_plan": "plan",
    "LinearMap": "solver", "fit_quality": "solver", "solve_span": "solver",
    "SimilarityStats": "stats", "SpanStats": "stats",
}
__all__ = sorted([*_API, "__version__"])


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


class _Package(types.ModuleType):
    """`tba_fed.calibrate` is the API function, as it was when this file imported everything at once: importing
    the submodule of that name (which sets it on the package) must not hide the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
