"""tba-fed: training-free Transformer Block Approximation for timm vision transformers."""

__version__ = "0.1.0"

from .adapter import ViTAdapter  # noqa: E402
from .checkpoint import load_compressed, save_compressed  # noqa: E402
from .compressed import BlockApproximation, build_compressed, parameter_report  # noqa: E402
from .config import ModelConfig, RunConfig, load_config  # noqa: E402
from .errors import TBAInputError  # noqa: E402
from .deploy.simulate import simulate  # noqa: E402
from .models import create_model  # noqa: E402
from .pipeline import Compression, SpanFit, analyze, calibrate, choose_plan, solve_plan  # noqa: E402
from .plan import Plan, Span, parse_plan, select_plan  # noqa: E402
from .solver import LinearMap, fit_quality, solve_span  # noqa: E402
from .stats import SimilarityStats, SpanStats  # noqa: E402

__all__ = [
    "BlockApproximation", "Compression", "LinearMap", "ModelConfig", "Plan", "RunConfig", "SimilarityStats", "Span",
    "SpanFit", "SpanStats", "TBAInputError", "ViTAdapter", "__version__", "analyze", "build_compressed", "calibrate",
    "choose_plan", "create_model", "fit_quality", "load_compressed", "load_config", "parameter_report", "parse_plan",
    "save_compressed", "select_plan", "simulate", "solve_plan", "solve_span",
]
