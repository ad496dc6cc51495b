"""Measuring a compressed model against its original: latency, throughput, peak memory and FLOPs, in PyTorch eager
and ONNX Runtime.

Latency is measured with both models in one process, alternating them call by call after a warm-up, so that what
other processes do to the machine (shared cores) falls on both alike and the speed-up stays meaningful on a busy
machine. The measured speed-up is set beside the FLOP-theoretical one: what the removed blocks should save.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import open_compressed
from .compressed import count_parameters
from .config import load_json
from .errors import TBAInputError, TBARunError
from .compressed import count_flops
from .export import check_compressed_dir, check_images, input_shape, require_onnx, write_onnx
from .fileio import atomic_write_text, owned_files, writable_location, write_owned

_logger = logging.getLogger(__name__)

RUNTIMES = ("eager", "onnxruntime")
FILE = "benchmark.json"
FORMAT = "tba-fed/benchmark/1"
MAX_BATCH = 65_536
MAX_REPEATS = 100_000
BATCH_SIZES = (1, 32)  # one image (interactive use) and a batch that fills the cores
REPEATS = 20
WARMUP = 3
ORDER = "alternating, reversed every other round"
SPEEDUP = "p50 latency of the original / p50 latency of the compressed model, both measured interleaved in one process"
MEMORY_METHOD = ("peak RSS (VmHWM, reset through /proc/self/clear_refs) of a fresh process that loaded the model "
                 "alone and ran 3 forward passes, minus its RSS once the model and the input were loaded: the memory "
                 "inference itself takes (activations, allocator and ONNX Runtime arena growth), weights excluded")


# ---- the timing core -----------------------------------------------------------------------------------------


def time_interleaved(runners: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each runner. Every runner is first called `warmup` times; then, in each of `repeats`
    rounds, every runner is called once, the order reversed every other round (A B, B A, ...), so a change in the
    machine's load or a cache left warm by the previous call falls on all runners alike."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    return times


@dataclass(frozen=True)
class Latency:
    """The wall times of calls on batches of `batch_size` images."""

    batch_size: int
    seconds: tuple[float, ...]

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.seconds, 50)) * 1e3

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.seconds, 95)) * 1e3

    @property
    def images_per_s(self) -> float:
        """Images over the total time of all timed calls."""
        return self.batch_size * len(self.seconds) / sum(self.seconds)

    def as_dict(self) -> dict[str, Any]:
        return {"p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "images_per_s": self.images_per_s,
                "calls": len(self.seconds), "seconds": list(self.seconds)}


def interleaved_latency(runners: Mapping[str, Callable[[], object]], batch_size: int, *, repeats: int,
                        warmup: int = 1) -> dict[str, Latency]:
    """`time_interleaved`, summarised: each runner's latency on batches of `batch_size` images."""
    times = time_interleaved(runners, repeats=repeats, warmup=warmup)
    return {name: Latency(batch_size, tuple(seconds)) for name, seconds in times.items()}


def eager_runner(model: nn.Module, images: torch.Tensor) -> Callable[[], object]:
    """One forward pass of `model` in inference mode."""
    def run() -> object:
        with torch.inference_mode():
            return model(images)
    return run


def onnxruntime_runner(session: Any, images: np.ndarray) -> Callable[[], object]:
    """One run of an ONNX Runtime session on `images` (the exported models' input is named ``images``)."""
    return lambda: session.run(None, {"images": images})


def onnxruntime_session(path: Path, threads: int) -> Any:
    """A CPU session with `threads` intra-op threads (the same number torch uses, so the runtimes compare fairly)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ---- peak memory ---------------------------------------------------------------------------------------------

_MEMORY_PROBE = r"""
import json, sys
runtime, path, threads, batch, c, h, w = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in f) if k in ("VmRSS", "VmHWM")}
if runtime == "onnxruntime":
    import numpy as np, onnxruntime
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32)
    run = lambda: session.run(None, {"images": images})
else:
    import torch
    torch.set_num_threads(threads)
    model = torch.load(path, weights_only=False).eval()
    images = torch.randn(batch, c, h, w)
    def run():
        with torch.inference_mode():
            model(images)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
loaded = status()["VmRSS"]
for _ in range(3):
    run()
print(json.dumps({"loaded_rss": loaded, "peak_rss": status()["VmHWM"]}))
"""


def inference_memory(runtime: str, path: Path, batch_size: int, shape: tuple[int, int, int], threads: int) -> dict[str, float]:
    """Peak memory of inference on batches of `batch_size` (see MEMORY_METHOD), in MiB, with the process's whole peak
    RSS beside it. `path`: an ONNX file, or a whole pickled nn.Module this process wrote (eager)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, runtime, str(path), str(threads), str(batch_size),
                           *map(str, shape)], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise TBARunError(f"the {runtime} memory probe failed: {done.stderr.strip().splitlines()[-1:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    return {"inference_mib": (found["peak_rss"] - found["loaded_rss"]) / mib, "process_peak_rss_mib": found["peak_rss"] / mib}


# ---- the benchmark -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measurement:
    """Original vs compressed in one runtime at one batch size."""

    runtime: str
    batch_size: int
    original: Latency
    compressed: Latency
    theoretical_speedup: float
    memory: dict[str, dict[str, float]] | None = None  # {"original": ..., "compressed": ...} from inference_memory

    @property
    def speedup(self) -> float:
        """Median latency of the original over the compressed model's."""
        return self.original.p50_ms / self.compressed.p50_ms

    @property
    def speedup_vs_theoretical(self) -> float:
        return self.speedup / self.theoretical_speedup

    def as_dict(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "batch_size": self.batch_size, "original": self.original.as_dict(),
                "compressed": self.compressed.as_dict(), "speedup": self.speedup,
                "theoretical_speedup": self.theoretical_speedup, "speedup_vs_theoretical": self.speedup_vs_theoretical,
                "memory": self.memory}


@dataclass(frozen=True)
class BenchmarkResult:
    directory: Path
    model: str
    plan: str
    input_shape: tuple[int, int, int]
    flops: dict[str, int]  # per image, both models
    parameters: dict[str, int]
    measurements: list[Measurement]
    settings: dict[str, Any]
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def theoretical_speedup(self) -> float:
        """FLOPs of the original over the compressed model's: the speed-up if time followed FLOPs."""
        return self.flops["original"] / self.flops["compressed"]

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "tba_fed_version": __version__, "directory": str(self.directory), "model": self.model,
                "plan": self.plan, "input_shape": list(self.input_shape), "flops": dict(self.flops),
                "flops_counted": "torch.utils.flop_counter.FlopCounterMode, one image",
                "theoretical_speedup": self.theoretical_speedup, "parameters": dict(self.parameters),
                "speedup": SPEEDUP,
                "memory_method": MEMORY_METHOD, "settings": dict(self.settings), "machine": dict(self.machine),
                "measurements": [m.as_dict() for m in self.measurements]}


def compare(runtime: str, runners: Mapping[str, Callable[[], object]], batch_size: int, theoretical_speedup: float,
            *, repeats: int, warmup: int) -> Measurement:
    """The ``original`` and ``compressed`` runners timed interleaved (`interleaved_latency`) on one batch size."""
    latency = interleaved_latency(runners, batch_size, repeats=repeats, warmup=warmup)
    measurement = Measurement(runtime, batch_size, latency["original"], latency["compressed"], theoretical_speedup)
    _logger.info("%s batch %d: p50 %.2f ms -> %.2f ms, speed-up %.3fx (theoretical %.3fx, ratio %.3f)",
                 runtime, batch_size, measurement.original.p50_ms, measurement.compressed.p50_ms,
                 measurement.speedup, theoretical_speedup, measurement.speedup_vs_theoretical)
    return measurement


def machine_state(threads: int, load_before: Sequence[float]) -> dict[str, Any]:
    """What the timings depend on besides the models: cores, torch's threads, the load average around the measuring
    (a shared machine slows both models alike, but a loaded one widens p95)."""
    return {"cpus": os.cpu_count(), "threads": threads, "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()), "platform": platform.platform(),
            "torch": str(torch.__version__)}  # a str subclass, which yaml.safe_dump (the manifest) refuses


def eager_latency(original: nn.Module, compressed: nn.Module, *, batch_sizes: Sequence[int] = BATCH_SIZES,
                  repeats: int = REPEATS, warmup: int = WARMUP) -> dict[str, Any]:
    """Original vs compressed in PyTorch eager at each batch size, interleaved in this process, with the FLOP-theoretical
    speed-up beside the measured one: the ``latency`` section of compress's report (`tba-fed compress --benchmark`)
    and each row of an experiment's latency.json. Timed on the CPU, as `benchmark_compressed` times a saved model (a
    model on another device is timed as a CPU copy); no file, ONNX export or memory probe: that command does those."""
    check_settings(batch_sizes, ("eager",), repeats, warmup)
    models = {name: (model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()).eval()
              for name, model in (("original", original), ("compressed", compressed))}
    flops = {name: count_flops(model) for name, model in models.items()}
    theoretical = flops["original"] / flops["compressed"]
    threads, load_before = torch.get_num_threads(), os.getloadavg()
    measurements = []
    for batch in batch_sizes:
        images = check_images(models["compressed"], batch)
        measurements.append(compare("eager", {name: eager_runner(model, images) for name, model in models.items()},
                                    batch, theoretical, repeats=repeats, warmup=warmup))
    return {"runtime": "eager", "flops": flops, "theoretical_speedup": theoretical, "speedup": SPEEDUP,
            "settings": {"batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup, "order": ORDER},
            "machine": machine_state(threads, load_before),
            "batches": [{key: value for key, value in m.as_dict().items() if key not in ("runtime", "memory")}
                        for m in measurements]}


def check_settings(batch_sizes: Sequence[int], runtimes: Sequence[str], repeats: int, warmup: int) -> None:
    """Every setting in range, refused in one line naming it."""
    if not batch_sizes:
        raise TBAInputError("batch_size", "no batch size given", "give at least one, e.g. --batch-size 1")
    for batch in batch_sizes:
        if not (isinstance(batch, int) and 1 <= batch <= MAX_BATCH):
            raise TBAInputError("batch_size", f"{batch!r} is not a batch size", f"give a whole number from 1 to {MAX_BATCH:,}")
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            raise TBAInputError("runtime", f"unknown runtime {str(runtime)[:40]!r}", f"use {' or '.join(RUNTIMES)}")
    if not runtimes:
        raise TBAInputError("runtime", "no runtime given", f"use {' or '.join(RUNTIMES)}")
    if not (isinstance(repeats, int) and 1 <= repeats <= MAX_REPEATS):
        raise TBAInputError("repeats", f"{repeats!r} is not a number of repetitions", f"give 1 to {MAX_REPEATS:,}")
    if not (isinstance(warmup, int) and 0 <= warmup <= MAX_REPEATS):
        raise TBAInputError("warmup", f"{warmup!r} is not a number of warm-up calls", f"give 0 to {MAX_REPEATS:,}")


def output_path(directory: Path, output: Path | None) -> Path:
    """Where benchmark.json goes, checked before any work: into the compressed-model directory (recorded in its
    marker, so a later --overwrite of that model removes it), or to `output`, replaced only if it is tba-fed's own
    benchmark file. Nothing tba-fed did not write is overwritten."""
    if output is None:
        check_compressed_dir(directory)
        try:  # refused if DIR holds a file its marker does not list, or one changed since: benchmark.json too
            owned_files(directory, "compressed")
        except TBAInputError as err:
            raise TBAInputError("output", f"cannot write {FILE} into {directory}: {err.message}",
                                "pass --output FILE to write it elsewhere") from None
        writable_location(directory, "output")
        return directory / FILE
    output = Path(output)
    if output.is_dir():
        raise TBAInputError("output", f"{output} is a directory", f"give a file path, e.g. {output / FILE}")
    if output.exists() or output.is_symlink():
        try:
            found = load_json(output.read_bytes()) if output.is_file() and not output.is_symlink() else None
        except (OSError, ValueError, RecursionError):
            found = None
        if not (isinstance(found, dict) and found.get("format") == FORMAT):
            raise TBAInputError("output", f"{output} exists and is not a tba-fed benchmark; refusing to replace it",
                                "choose another output path")
    writable_location(output.parent, "output")
    return output


def save_benchmark(result: BenchmarkResult, path: Path) -> None:
    """benchmark.json, atomically; inside a compressed-model directory its marker lists it."""
    text = json.dumps(result.as_dict(), indent=2) + "\n"
    if path.parent == result.directory and path.name == FILE:
        write_owned(result.directory, "compressed", owned_files(result.directory, "compressed"), {FILE: text})
    else:
        atomic_write_text(path, text)


def benchmark_compressed(directory: str | Path, *, batch_sizes: Sequence[int] = BATCH_SIZES,
                         runtimes: Sequence[str] = RUNTIMES, repeats: int = REPEATS, warmup: int = WARMUP,
                         memory: bool = True,
                         output: str | Path | None = None, save: bool = True) -> BenchmarkResult:
    """Measure the compressed model in `directory` against its original (see the module docstring), for every
    runtime and batch size; with `save`, write benchmark.json into `directory` (or to `output`). Inputs and the
    output location are checked before any model is built."""
    directory = Path(directory)
    check_settings(batch_sizes, runtimes, repeats, warmup)
    path = output_path(directory, None if output is None else Path(output)) if save else None
    check_compressed_dir(directory)
    if "onnxruntime" in runtimes:
        require_onnx()
    opened = open_compressed(directory)
    models = {"original": opened.base.eval(), "compressed": opened.model.eval()}
    for model in models.values():
        model.requires_grad_(False)
    shape = input_shape(opened.model)
    flops = {name: count_flops(model) for name, model in models.items()}
    theoretical = flops["original"] / flops["compressed"]
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    measurements: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="tba-fed-benchmark-") as tmp:
        files: dict[str, dict[str, Path]] = {runtime: {} for runtime in runtimes}
        for name, model in models.items():
            if "onnxruntime" in runtimes:
                folder = Path(tmp) / name
                folder.mkdir()
                check = write_onnx(model, folder)
                _logger.info("%s model exported to ONNX (max abs diff vs PyTorch %.3g)", name, check.max_abs_diff)
                files["onnxruntime"][name] = folder / "model.onnx"
            if "eager" in runtimes and memory:
                files["eager"][name] = Path(tmp) / f"{name}.pt"
                torch.save(model, files["eager"][name])
        sessions = {name: onnxruntime_session(path_, threads) for name, path_ in files.get("onnxruntime", {}).items()}
        for runtime in runtimes:
            for batch in batch_sizes:
                images = check_images(opened.model, batch)
                if runtime == "eager":
                    runners = {name: eager_runner(model, images) for name, model in models.items()}
                else:
                    runners = {name: onnxruntime_runner(session, images.numpy()) for name, session in sessions.items()}
                measurement = compare(runtime, runners, batch, theoretical, repeats=repeats, warmup=warmup)
                if memory:
                    measurement = replace(measurement, memory={
                        name: inference_memory(runtime, files[runtime][name], batch, shape, threads) for name in models})
                measurements.append(measurement)
    machine = machine_state(threads, load_before) | {
        "onnxruntime": _onnxruntime_version() if "onnxruntime" in runtimes else None}
    result = BenchmarkResult(
        directory=directory, model=opened.manifest.model.name, plan=opened.manifest.plan, input_shape=shape,
        flops=flops, parameters={name: count_parameters(model) for name, model in models.items()},
        measurements=measurements, machine=machine,
        settings={"batch_sizes": list(batch_sizes), "runtimes": list(runtimes), "repeats": repeats, "warmup": warmup,
                  "memory": memory, "order": ORDER})
    if path is not None:
        save_benchmark(result, path)
        _logger.info("benchmark written to %s", path)
    return result


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def table(result: BenchmarkResult) -> str:
    """The result as a Markdown table (the CLI prints it)."""
    mem = any(m.memory for m in result.measurements)
    head = "| runtime | batch | model | p50 ms | p95 ms | images/s |" + (" inference MiB |" if mem else "") + \
           " speed-up | theoretical | measured/theoretical |"
    lines = [f"{result.model}, plan `{result.plan}`, input {'x'.join(map(str, result.input_shape))}: FLOPs per image "
             f"{result.flops['original']:,} -> {result.flops['compressed']:,}, parameters {result.parameters['original']:,}"
             f" -> {result.parameters['compressed']:,}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for m in result.measurements:
        for name, latency in (("original", m.original), ("compressed", m.compressed)):
            row = f"| {m.runtime} | {m.batch_size} | {name} | {latency.p50_ms:.2f} | {latency.p95_ms:.2f} | " \
                  f"{latency.images_per_s:.1f} |"
            if mem:
                row += f" {m.memory[name]['inference_mib']:.1f} |" if m.memory else " |"
            row += (f" {m.speedup:.3f}x | {m.theoretical_speedup:.3f}x | {m.speedup_vs_theoretical:.3f} |"
                    if name == "compressed" else " | | |")
            lines.append(row)
    return "\n".join(lines) + "\n"
