"""`tba-fed benchmark`: a tiny compressed ViT measured against its original in eager and ONNX Runtime; FLOPs against an
independent count, consistent summaries, benchmark.json written only where tba-fed may write, bad input refused in
one line. No timing is asserted (timings are recorded in docs/benchmarks.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tba_fed import calibrate, create_model, load_compressed, save_compressed
from tba_fed.benchmark import FILE, FORMAT, benchmark_compressed, table, time_interleaved
from tba_fed.cli import main
from tba_fed.compressed import count_flops
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
