"""`tba-fed benchmark`: a tiny compressed ViT measured against its original in eager and ONNX Runtime; FLOPs against an
independent count, consistent summaries, benchmark.json written only where tba-fed may write, bad input refused in
one line; the same eager measurement in compress's report (`--benchmark`). No timing is asserted (timings are
recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tba_fed import calibrate, create_model, load_compressed, save_compressed
from tba_fed.benchmark import FILE, FORMAT, benchmark_compressed, eager_latency, table, time_interleaved
from tba_fed.cli import main
from tba_fed.compressed import count_flops
from tba_fed.errors import TBAInputError
from tba_fed.fileio import MARKER, file_sha256

from conftest import TINY, loader

PLAN = "1->3"  # removes blocks 2 and 3 of 6, one linear map


def tiny_vit_flops(depth: int, maps: int = 0) -> int:
    """FLOPs of one 32x32 image through the tiny ViT, counted by hand (2 per multiply-add): patch embedding, per block
    qkv, attention (QK^T and AV), projection and MLP, then the head; `maps`: d x d maps added."""
    d, tokens, patches = TINY["embed_dim"], (TINY["img_size"] // TINY["patch_size"]) ** 2 + 1, \
        (TINY["img_size"] // TINY["patch_size"]) ** 2
    embed = 2 * patches * 3 * TINY["patch_size"] ** 2 * d
    block = 2 * tokens * d * 3 * d + 2 * 2 * tokens * tokens * d + 2 * tokens * d * d + 2 * 2 * tokens * d * 4 * d
    return embed + depth * block + maps * 2 * tokens * d * d + 2 * d * TINY["num_classes"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory, tiny_config) -> Path:
    root = tmp_path_factory.mktemp("benchmark")
    result = calibrate(create_model(tiny_config), PLAN, loader(), loader(8, seed=1), source=tiny_config)
    return save_compressed(result, root / "compressed")


@pytest.fixture()
def fresh(compressed, tmp_path) -> Path:
    """A copy of the compressed model that a test may write into."""
    return Path(shutil.copytree(compressed, tmp_path / "compressed"))


def test_flops_equal_a_count_by_hand_including_attention(compressed, tiny_config):
    """FlopCounterMode alone counts CPU attention (_scaled_dot_product_flash_attention_for_cpu) as free."""
    assert count_flops(create_model(tiny_config)) == tiny_vit_flops(6) == 6_268_512
    assert count_flops(load_compressed(compressed)) == tiny_vit_flops(4, maps=1)


def test_the_benchmark_measures_both_runtimes_and_its_numbers_agree(fresh):
    result = benchmark_compressed(fresh, batch_sizes=(1, 2), repeats=3, warmup=1, memory=False)
    assert result.flops == {"original": tiny_vit_flops(6), "compressed": tiny_vit_flops(4, maps=1)}
    assert result.flops["compressed"] < result.flops["original"]
    assert result.theoretical_speedup == result.flops["original"] / result.flops["compressed"] > 1
    assert result.parameters["compressed"] < result.parameters["original"]
    assert [(m.runtime, m.batch_size) for m in result.measurements] == [
        ("eager", 1), ("eager", 2), ("onnxruntime", 1), ("onnxruntime", 2)]
    for m in result.measurements:
        assert m.theoretical_speedup == result.theoretical_speedup and m.memory is None
        assert m.speedup == pytest.approx(m.original.p50_ms / m.compressed.p50_ms)
        assert m.speedup_vs_theoretical == pytest.approx(m.speedup / m.theoretical_speedup)
        for latency in (m.original, m.compressed):
            assert len(latency.seconds) == 3 and all(s > 0 for s in latency.seconds)
            assert 0 < latency.p50_ms <= latency.p95_ms <= max(latency.seconds) * 1e3
            assert latency.images_per_s == pytest.approx(m.batch_size * 3 / sum(latency.seconds))
    written = json.loads((fresh / FILE).read_text())
    assert written == json.loads(json.dumps(result.as_dict())) and written["format"] == FORMAT
    assert written["machine"]["threads"] >= 1 and len(written["machine"]["load_average_before"]) == 3
    marker = json.loads((fresh / MARKER).read_text())
    assert marker["files"][FILE] == file_sha256(fresh / FILE)  # tba-fed's own file in the model's directory
    load_compressed(fresh)  # the model still loads
    rows = table(result).splitlines()
    assert sum(row.startswith("| eager | 2 | compressed |") for row in rows) == 1
    assert f"{result.theoretical_speedup:.3f}x" in table(result)


def test_peak_memory_is_measured_in_a_fresh_process_per_model(compressed, tmp_path):
    output = tmp_path / "bench.json"
    result = benchmark_compressed(compressed, batch_sizes=(1,), repeats=1, warmup=0, output=output)
    assert [m.runtime for m in result.measurements] == ["eager", "onnxruntime"]
    for m in result.measurements:
        for name in ("original", "compressed"):
            used = m.memory[name]
            assert 0 < used["inference_mib"] < used["process_peak_rss_mib"]
    assert json.loads(output.read_text())["measurements"][1]["memory"] == result.measurements[1].memory
    assert FILE not in json.loads((compressed / MARKER).read_text())["files"]  # written to --output only


def test_calls_alternate_after_the_warm_up():
    calls: list[str] = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=2)
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(t) for t in times.values()] == [4, 4]
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeats=0)


@pytest.mark.parametrize("flags,field", [
    (["--batch-size", "0"], "batch_size"),
    (["--batch-size", "-3"], "batch_size"),
    (["--batch-size", "1", "--batch-size", "70000"], "batch_size"),
    (["--repeats", "0"], "repeats"),
    (["--warmup", "-1"], "warmup"),
])
def test_bad_settings_are_refused_in_one_line(fresh, capsys, flags, field):
    assert main(["benchmark", str(fresh), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tba-fed: error: {field}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (fresh / FILE).exists()


@pytest.mark.parametrize("make", [
    lambda tmp: tmp / "missing",
    lambda tmp: (tmp / "file.txt", (tmp / "file.txt").write_text("x"))[0],
    lambda tmp: (tmp / "foreign", (tmp / "foreign").mkdir(), (tmp / "foreign" / "notes.txt").write_text("x"))[0],
])
def test_what_is_not_a_compressed_model_is_refused_in_one_line(tmp_path, capsys, make):
    source = make(tmp_path)
    assert main(["benchmark", str(source)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tba-fed: error: input: ") and err.count("\n") == 1 and "compress" in err
    assert not (tmp_path / FILE).exists() and not (source.is_dir() and (source / FILE).exists())


def test_a_non_integer_batch_size_is_an_argparse_error(fresh, capsys):
    with pytest.raises(SystemExit) as code:
        main(["benchmark", str(fresh), "--batch-size", "big"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "invalid int value" in err and err.count("\n") == 1


def test_files_tba_fed_did_not_write_are_never_replaced(fresh, tmp_path, capsys):
    foreign = tmp_path / "results.json"
    foreign.write_text('{"mine": 1}')
    assert main(["benchmark", str(fresh), "--output", str(foreign)]) == 2
    assert "tba-fed: error: output: " in capsys.readouterr().err and foreign.read_text() == '{"mine": 1}'
    assert main(["benchmark", str(fresh), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (fresh / FILE).write_text("a user's file")  # in the model's directory, but not listed in its marker
    assert main(["benchmark", str(fresh)]) == 2
    err = capsys.readouterr().err
    assert "tba-fed: error: output: " in err and "--output" in err and (fresh / FILE).read_text() == "a user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed", "results.json"]


def test_the_cli_prints_the_table_and_replaces_its_own_json(fresh, tmp_path, capsys):
    flags = ["--runtime", "eager", "--batch-size", "2", "--repeats", "2", "--warmup", "0", "--no-memory"]
    for _ in range(2):  # the second run replaces the first run's file: tba-fed wrote it
        assert main(["benchmark", str(fresh), *flags]) == 0
        out = capsys.readouterr().out
        assert "| eager | 2 | compressed |" in out and "measured/theoretical" in out and "onnxruntime" not in out
        assert json.loads((fresh / FILE).read_text())["settings"]["batch_sizes"] == [2]
    output = tmp_path / "elsewhere.json"
    for _ in range(2):
        assert main(["benchmark", str(fresh), *flags, "--output", str(output)]) == 0
    assert json.loads(output.read_text())["format"] == FORMAT


# ---- compress --benchmark: the same measurement in the compressed model's report ----------------------------------

COMPRESS = ["compress", "--model", "vit_tiny_patch16_224", *[f for k, v in TINY.items() for f in ("--model-arg", f"{k}={v}")],
            "--data", "synthetic", "--num-images", "24", "--plan", PLAN]


def test_compress_benchmark_reports_latency_consistent_with_its_flops(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*COMPRESS, "-o", str(out), "--benchmark", "--benchmark-batch-size", "1", "--benchmark-batch-size", "3",
                 "--benchmark-repeats", "4"]) == 0
    report = json.loads((out / "report.json").read_text())
    latency = report["latency"]
    assert latency["runtime"] == "eager" and latency["settings"]["batch_sizes"] == [1, 3]
    assert latency["settings"]["repeats"] == 4 and latency["settings"]["warmup"] == 3
    flops = report["flops"]
    assert latency["flops"] == {"original": flops["original"], "compressed": flops["compressed"]} \
        == {"original": tiny_vit_flops(6), "compressed": tiny_vit_flops(4, maps=1)}
    assert latency["theoretical_speedup"] == flops["original"] / flops["compressed"]
    machine = latency["machine"]
    assert machine["threads"] >= 1 and len(machine["load_average_before"]) == len(machine["load_average_after"]) == 3
    assert [row["batch_size"] for row in latency["batches"]] == [1, 3]
    lines = []
    for row in latency["batches"]:
        assert row["theoretical_speedup"] == latency["theoretical_speedup"]
        assert row["speedup"] == pytest.approx(row["original"]["p50_ms"] / row["compressed"]["p50_ms"])
        assert row["speedup_vs_theoretical"] == pytest.approx(row["speedup"] / row["theoretical_speedup"])
        for name in ("original", "compressed"):
            timing = row[name]
            seconds = timing["seconds"]
            assert timing["calls"] == len(seconds) == 4 and all(s > 0 for s in seconds)
            assert 0 < timing["p50_ms"] <= timing["p95_ms"] <= max(seconds) * 1e3
            assert timing["p50_ms"] == pytest.approx(float(np.median(seconds)) * 1e3)
            assert timing["images_per_s"] == pytest.approx(row["batch_size"] * 4 / sum(seconds))  # as benchmark.json
        lines.append(f"- latency (eager, batch {row['batch_size']}): p50 {row['original']['p50_ms']:.2f} ms -> "
                     f"{row['compressed']['p50_ms']:.2f} ms, {row['speedup']:.2f}x measured vs "
                     f"{row['theoretical_speedup']:.2f}x theoretical ({row['speedup_vs_theoretical']:.2f})")
    markdown = (out / "report.md").read_text()
    assert [line for line in markdown.splitlines() if line.startswith("- latency")] == lines
    assert lines[1] in capsys.readouterr().out
    assert count_flops(load_compressed(out)) == flops["compressed"]  # the manifest (which holds the report) still loads


def test_the_python_api_measures_the_same_section(tmp_path, tiny_config):
    result = calibrate(create_model(tiny_config), PLAN, loader(), source=tiny_config)
    latency = eager_latency(result.base, result.model, batch_sizes=(2,), repeats=2, warmup=0)
    saved = save_compressed(result, tmp_path / "out", latency=latency)
    assert json.loads((saved / "report.json").read_text())["latency"] == json.loads(json.dumps(latency))
    assert latency["theoretical_speedup"] == result.flops.original / result.flops.compressed
    assert [row["batch_size"] for row in latency["batches"]] == [2] and latency["settings"]["warmup"] == 0
    with pytest.raises(TBAInputError, match="^repeats: "):
        eager_latency(result.base, result.model, repeats=0)


@pytest.mark.parametrize("flags,option", [
    (["--benchmark", "--benchmark-batch-size", "0"], "--benchmark-batch-size"),
    (["--benchmark", "--benchmark-batch-size", "1", "--benchmark-batch-size", "70000"], "--benchmark-batch-size"),
    (["--benchmark", "--benchmark-repeats", "0"], "--benchmark-repeats"),
    (["--benchmark-repeats", "3"], "--benchmark-repeats"),  # measures nothing without --benchmark
    (["--benchmark-batch-size", "8"], "--benchmark-batch-size"),
])
def test_bad_compress_benchmark_settings_are_refused_before_any_work(tmp_path, capsys, flags, option):
    out = tmp_path / "out"
    assert main([*COMPRESS, "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tba-fed: error: {option}: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
