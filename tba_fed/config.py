"""Run configuration: YAML files and CLI flags validated into one typed object.

Every section forbids unknown keys, so a misspelt YAML key is an error that names it instead of a
setting that silently does nothing. Every YAML file tba-fed reads goes through `load_yaml`, which refuses
a key given twice (PyYAML would keep the last one silently); every number must be finite, and counts
that size memory or processes (images, batch, workers, classes, seeds) have a ceiling.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import TBAInputError


def resolve_device(value: str) -> str:
    """``auto`` means the GPU when torch sees one, else the CPU (the default everywhere)."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value != "cpu" and not value.startswith(("cuda", "mps")):
        raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N or auto")
    try:
        torch.device(value)
    except RuntimeError:
        raise ValueError(f"unknown device {value!r}: use cpu, cuda, cuda:N or auto") from None
    return value


def check_device(device: str, field: str = "device") -> None:
    """Before any work: the device is on this machine. Torch would say so only at the first forward pass, after
    the model was built and the data read; a config is checked where it runs, not where it is read (a server
    reads the device its simulated sites use)."""
    import torch

    parsed = torch.device(device)
    fix = "use --device cpu (device: cpu), or auto for the GPU when there is one"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise TBAInputError(field, f"{device}: torch sees no CUDA GPU on this machine", fix)
        if parsed.index is not None and parsed.index >= count:
            raise TBAInputError(field, f"{device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}",
                                fix)
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise TBAInputError(field, f"{device}: torch sees no Apple GPU (mps) on this machine", fix)


Device = Annotated[str, AfterValidator(resolve_device)]


SHA256_HEX = "^[0-9a-f]{64}$"  # a sha256 as tba-fed writes it: 64 lowercase hex digits


class _Section(BaseModel):
    """Unknown keys are errors, and so is inf or nan in any float field: no setting of tba-fed means
    "unbounded" by infinity (an unset optional cap is null)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


MAX_IMAGES = 10_000_000  # more images than any calibration set; a larger count is a typo, not a request
MAX_BATCH = 65_536
Seed = Annotated[int, Field(ge=0, lt=2**32, description="a 32-bit seed")]


_S = TypeVar("_S", bound=_Section)


class ModelConfig(_Section):
    """Which network to compress and where its weights come from.

    ``checkpoint`` set: local weights for the timm architecture ``name``; ``pretrained``: timm hub
    weights; otherwise a random initialisation seeded by ``seed`` (reproducible, for smoke runs).
    ``kwargs`` are timm ``create_model`` overrides such as ``img_size`` or ``depth``. ``sha256``
    pins a checkpoint's bytes: every machine that loads it (server, sites) refuses a different file.
    """

    name: str = Field(min_length=1)
    pretrained: bool = False
    checkpoint: Path | None = None
    sha256: str | None = Field(None, pattern=SHA256_HEX, description="sha256 of the checkpoint file")
    seed: Seed = 0
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("kwargs")
    @classmethod
    def _kwargs(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key, value in kwargs.items():
            check_model_kwarg(key, value)
        return kwargs

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.pretrained and self.checkpoint is not None:
            raise TBAInputError("checkpoint", "set either pretrained or checkpoint, not both")
        if self.sha256 is not None and self.checkpoint is None:
            raise TBAInputError("sha256", "pins a checkpoint file", "set checkpoint too")
        return self


_SIZES = ("img_size", "patch_size")  # an int or an (H, W) pair
_COUNTS = ("depth", "embed_dim", "num_heads")
_RATES = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _finite(value: Any) -> bool:
    """No inf or nan anywhere in a YAML value (lists and mappings searched)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, Mapping):
        return all(_finite(v) for v in value.values())
    return True


def check_model_kwarg(key: str, value: Any) -> None:
    """A timm ``create_model`` override: finite, and the ViT geometry (sizes, depth, width, heads, rates)
    in range, so a typo is named by its key here rather than failing deep inside timm's constructor.
    Raises with the key as field (the section adds ``model.kwargs.``)."""
    if not _finite(value):
        raise TBAInputError(key, f"{value!r} is not a finite number")
    if key in _SIZES and not (_positive_int(value) or (isinstance(value, (list, tuple)) and len(value) == 2
                                                        and all(_positive_int(v) for v in value))):
        raise TBAInputError(key, f"{value!r} is not a positive integer or a pair of them")
    if key in _COUNTS and not _positive_int(value):
        raise TBAInputError(key, f"{value!r} is not a positive integer")
    if key == "mlp_ratio" and not (_is_number(value) and value > 0):
        raise TBAInputError(key, f"{value!r} is not a positive number")
    if key in _RATES and not (_is_number(value) and 0 <= value < 1):
        raise TBAInputError(key, f"{value!r} is not a probability in [0, 1)")


class DataConfig(_Section):
    """Images to calibrate on, preprocessed with the model's timm data config.

    Sources: ``synthetic`` (deterministic, for tests), ``image_folder`` (one sub-folder per class, or a flat
    unlabeled folder; files read with their real bit depth, DICOM included: `tba_fed.images`),
    ``fashion_mnist`` (IDX files of Debian's dataset-fashion-mnist), ``cifar10``/``cifar100``
    (torchvision, from a local root), ``medmnist`` (a MedMNIST-style .npz file).
    """

    source: Literal["synthetic", "image_folder", "fashion_mnist", "cifar10", "cifar100", "medmnist"] = "synthetic"
    path: Path | None = None
    split: Literal["train", "val", "test"] = "train"
    download: bool = Field(False, description="cifar: fetch into path if missing (needs internet)")
    num_images: int | None = Field(500, ge=1, le=MAX_IMAGES, description="synthetic: images generated; other sources: a seeded "
                                                          "random subset of this many is the data set (experiments, "
                                                          "simulations; paper: 500); null: every image of the source")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="each image is used with this probability, decided "
                                                                 "from the image alone (a keyed hash of its bytes)")
    holdout_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="each used image is held out of the fit with this "
                                                                      "probability, decided from the image alone")
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    num_workers: int = Field(0, ge=0, le=256, description="DataLoader worker processes")
    seed: Seed = 0
    num_classes: int = Field(10, ge=1, le=1_000_000, description="synthetic only")

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.source in ("image_folder", "medmnist", "cifar10", "cifar100") and self.path is None:
            raise TBAInputError("path", f"source {self.source} needs path")
        if self.split == "val" and self.source != "medmnist":
            raise TBAInputError("split", f"split val exists only for medmnist, not {self.source}")
        return self


class EvaluationSetConfig(_Section):
    """Labelled images on which `compress` scores the original and the compressed model.

    ``classifier``: ``probe`` (default) fits the closed-form ridge probe on each model's final-norm features of
    the calibration images and scores it here, so the evaluation labels must be the calibration labels' classes
    (the same source; image folders: the same class folders). ``head`` scores the model's own classifier head
    (argmax of its logits): only the user can say that the labels are the head's classes (an ImageNet head has
    1,000 classes, and Fashion-MNIST's labels 0-9 lie among them without meaning them), so it is never guessed;
    a model without a head (``num_classes`` 0) or a label outside it is refused. The evaluation set is every
    image of its source, or a seeded random subset of ``num_images``.
    """

    data: DataConfig
    classifier: Literal["probe", "head"] = "probe"
    probe_ridge: float = Field(1e-6, ge=0.0, description="ridge of the probe, relative to tr(Σffᵀ)/d")

    @model_validator(mode="after")
    def _whole_source(self) -> EvaluationSetConfig:
        if "source" not in self.data.model_fields_set:
            raise TBAInputError("data.source", "name the evaluation images' source",
                                "e.g. --eval-data fashion_mnist --eval-split test")
        for name in ("sample_rate", "holdout_fraction"):
            if name in self.data.model_fields_set:
                raise TBAInputError(f"data.{name}", "the evaluation set is every image of its source (or a subset of "
                                                    "num_images): nothing is sampled or held out of it",
                                    f"remove {name}; use num_images for fewer images")
        return self


class BudgetConfig(_Section):
    blocks: int | None = Field(None, ge=1)
    params: int | None = Field(None, ge=1)
    metric: Literal["mse", "cosine", "angular"] = "mse"

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        if (self.blocks is None) == (self.params is None):
            raise TBAInputError("blocks", "give exactly one of blocks or params")
        return self


class RunConfig(_Section):
    model: ModelConfig
    data: DataConfig = DataConfig()
    plan: str | None = Field(None, description='spans in the paper notation, e.g. "1->2, 4->5"')
    budget: BudgetConfig | None = None
    identity_spans: str | None = Field(None, description="spans whose blocks are simply dropped, e.g. '9->11'")
    map: Literal["linear", "folded", "auto"] = Field(
        "linear", description="linear: one added map per span, x_s -> x_e; folded: block s's MLP branch -> x_e - h_s, "
                              "folded into its fc2 (zero added parameters); auto: both kinds' statistics from the same "
                              "pass, each span gets the kind with the lower held-out error")
    token_mode: Literal["all", "cls", "patch"] = "all"
    bias: bool = True
    ridge: float = Field(0.0, ge=0.0)
    evaluation: EvaluationSetConfig | None = Field(None, description="compress: score the original and the compressed "
                                                                     "model on these labelled images")
    device: Device = "cpu"
    output: Path = Path("outputs/tba-fed")
    overwrite: bool = False

    @model_validator(mode="after")
    def _plan_or_budget(self) -> RunConfig:
        if self.plan is not None and self.budget is not None:
            raise TBAInputError("plan", "set either plan or budget, not both")
        if self.map == "auto" and self.data.holdout_fraction == 0:
            raise TBAInputError("map", "auto picks each span's kind by its held-out error, and holdout_fraction is 0",
                                "set data.holdout_fraction above 0 (e.g. 0.1) or map: linear or folded")
        return self


def _format_validation_error(err: ValidationError, section: str = "") -> TBAInputError:
    """The first error as a TBAInputError; a validator that raised TBAInputError keeps its field (under the
    section it validated) and fix. `section` prefixes every field (e.g. ``privacy`` for a request's JSON)."""
    errors = err.errors()  # a misspelt key is the cause of the "missing" error of the key it meant: name it first
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = ([section] if section else []) + [str(p) for p in first["loc"]]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, TBAInputError):
        return TBAInputError(".".join([*loc, cause.field]), cause.message, cause.fix)
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    fix = {"extra_forbidden": "check the spelling against the documented keys",
           "missing": "add it to the YAML file or pass the matching flag"}.get(first["type"])
    return TBAInputError(".".join(loc) or "config", message, fix)


def merge_overrides(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"data.batch_size": 8}``) on a nested dict; None means unset."""
    merged = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in base.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = merged
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, Mapping) else {}
            node = node[key]
        node[leaf] = value
    return merged


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no Python tags), refusing a mapping that gives one key twice."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose own keys are distinct as Python sees them (``1``, ``1.0`` and ``true`` collide too);
    keys merged in with ``<<`` may be overridden, as YAML intends."""
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            continue  # construct_mapping refuses it
        if key in seen:
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    f"found duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text: str) -> Any:
    """The one YAML parser of tba-fed: safe (no Python objects), and a key given twice is an error, never
    "the last one wins" (a policy with ``epsilon: 1.0`` then ``epsilon: 1000.0`` must not mean 1000)."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no Python tags


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"key {key[:80]!r} given twice")
        seen[key] = value
    return seen


def load_json(text: str | bytes) -> Any:
    """The one JSON parser of tba-fed for the files it reads back (ledgers, audit logs, markers, rows): like
    ``load_yaml``, a key given twice is an error (a ValueError), never "the last one wins"."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def yaml_error_text(err: yaml.YAMLError) -> str:
    """Where and what, from a PyYAML error: `` at line L, column C: problem`` (``: problem`` without a position)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{where}: {getattr(err, 'problem', None) or err}"


def read_yaml(path: Path, field: str = "config", fix: str | None = None) -> dict[str, Any]:
    """A YAML mapping from a file, with errors that name the file (as `field`); `fix` replaces the default
    advice, which is about config files."""
    path = Path(path)
    if path.is_dir():
        raise TBAInputError(field, f"{path} is a directory", fix or "give the YAML file inside it")
    try:
        loaded = load_yaml(path.read_text())
    except FileNotFoundError:
        raise TBAInputError(field, f"{path} does not exist", fix) from None
    except (OSError, UnicodeDecodeError) as err:
        raise TBAInputError(field, f"{path} cannot be read ({err})", fix) from None
    except yaml.YAMLError as err:
        raise TBAInputError(field, f"{path} is not valid YAML{yaml_error_text(err)}", fix) from None
    if loaded is None:
        raise TBAInputError(field, f"{path} is empty", fix or "write the settings as a YAML mapping (see configs/)")
    if not isinstance(loaded, dict):
        raise TBAInputError(field, f"{path} must hold a mapping at top level, not a {type(loaded).__name__}", fix)
    return loaded


def validate(model: type[_S], raw: Mapping[str, Any]) -> _S:
    """Validate a config section; the error names the first offending field and how to fix it."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err) from None


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a YAML file (if any), apply overrides, validate; errors name the offending field."""
    raw = read_yaml(path) if path is not None else {}
    return validate(RunConfig, merge_overrides(raw, overrides or {}))
