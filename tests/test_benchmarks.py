"""The benchmark scripts run end to end (on the tiny shape where they take one) and report every figure the
project's targets name, or the kernel timings that explain the ones missed. Their figures are timings on a shared
machine, so only their presence and sanity are checked here; the numbers that matter come from the 1b shape on a
quiet machine (README, Performance)."""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest

from llama import cli, kernels

from conftest import kernels_expected, program, run_cmd, script_main

FIGURES = [
    "load", "bandwidth", "matmul", "prefill 128 tokens, batch 1", "prefill 128 tokens, batch 4",
    "decode batch 1 (128 cached)", "decode batch 4 (128 cached)", "decode batch 16 (128 cached)",
    "decode step, 128 cached", "decode step, 1024 cached", "decode step, 4096 cached",
    "mixed batch 16/64/256/1000 +64", "  same, token by token", "  speed-up", "peak RSS / checkpoint",
    "decode 4096 / 128 cached",
]
VS_HF = ["prefill 128 tokens, batch 1", "decode batch 1 (128 cached)", "mixed batch 16/64/256/1000 +64"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One tiny checkpoint for both scripts (each would otherwise make its own)."""
    return tmp_path_factory.mktemp("bench_cache")


def test_vs_hf_without_transformers_fails_before_measuring(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "transformers" else real(name, *args))
    with pytest.raises(ValueError, match="--vs-hf runs Hugging Face transformers, which is not installed here"):
        script_main("benchmark", "--shape", "tiny", "--vs-hf")


def test_benchmark_reports_every_figure_against_its_roofline(cache_dir, tmp_path):
    """With --vs-hf too where transformers (a dev-only dependency) is installed."""
    out = tmp_path / "figures.json"
    vs_hf = importlib.util.find_spec("transformers") is not None
    result = run_cmd([sys.executable, "scripts/benchmark.py", "--shape", "tiny", "--reps", "1", "--threads", "2",
                      "--token-by-token", "--cache_dir", str(cache_dir), "--json", str(out)]
                     + ["--vs-hf"] * vs_hf, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fig = json.loads(out.read_text())
    for name in FIGURES + [f"vs HF: {name}" for name in VS_HF] * vs_hf:
        assert math.isfinite(fig[name]) and fig[name] > 0, (name, fig.get(name))
    fractions = {k: v for k, v in fig.items() if k.endswith("(fraction of roofline)")}
    assert len(fractions) == 8 and all(0 < v < 10 for v in fractions.values()), fractions
    table = result.stdout.rstrip().splitlines()
    last = VS_HF[-1] if vs_hf else "decode 4096 / 128 cached"
    assert table[-1].startswith(last)  # the table comes last


def test_bench_load_reports_each_rank_from_disk_and_warm(cache_dir):
    """On two processes only: one is the same run without a launcher's variables, and 3 s more a process here."""
    result = run_cmd([sys.executable, "scripts/bench_load.py", "--shape", "tiny", "--nproc", "2",
                      "--cache_dir", str(cache_dir)], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"\s*(disk|warm)\s+\d", line)]
    assert [(r[0], r[1], r[2]) for r in rows] == [("disk", "2", "0"), ("disk", "2", "1"), ("warm", "2", "0"),
                                                   ("warm", "2", "1")]
    assert all(float(v) >= 0 for r in rows for v in r[3:]) and all(float(r[7]) > 0 for r in rows), rows  # RSS


def test_bench_kernels_times_the_products_and_the_attention_both_ways(capsys):
    """In this process (its entry point is tested with the scripts' errors), with torch's threads as they are."""
    script_main("bench_kernels", "--reps", "1")
    out = capsys.readouterr().out
    ways = ("torch", r"kernels\.c") if kernels_expected() else ("torch",)
    assert all(re.search(rf"^\s+{n} positions, {way}\s+\d+ us", out, re.M) for n in (128, 4096) for way in ways), out
    rows = ("torch", "linear_bf16", "packed") if kernels_expected() else ("torch",)
    assert all(re.search(rf"^\s+{n} rows, {way}\s+\d+ us", out, re.M) for n in (1, 2, 4, 8, 16) for way in rows), out
    assert all(re.search(rf"^\s+128 rows, {way}\s+\d+ us", out, re.M) for way in rows if way != "linear_bf16"), out
    packed = ("oneDNN", r"kernels\.c") if kernels_expected() and kernels.packs_bf16() else ("oneDNN",)
    assert "can't be packed" in out or all(
        re.search(rf"^\s+{way}\s+in cache\s+\d+ us.*streamed \d+ us", out, re.M) for way in packed), out
    assert all(re.search(rf"^\s+{rows} rows x\s+{vocab} tokens: engine's\s+[\d.]+ ms, sort all\s+[\d.]+ ms", out, re.M)
               for rows in (1, 16) for vocab in (32000, 128256)), out


@pytest.mark.parametrize("what", [[], ["--prefill", "--cached", "16"]], ids=["decoding_step", "prefill"])
def test_profile_step_names_where_the_time_goes(cache_dir, what, capsys, monkeypatch):
    """In this process, as bench_kernels; the kernels it wraps in named ranges are put back after it."""
    for name in program("scripts/profile_step.py").KERNELS:
        monkeypatch.setattr(kernels, name, getattr(kernels, name))
    script_main("profile_step", "--shape", "tiny", "--steps", "2", "--cache_dir", str(cache_dir), *what)
    lines = capsys.readouterr().out.strip().splitlines()  # after the checkpoint's line, where it was written
    at = next(i for i, line in enumerate(lines) if " ms a step (wall)" in line)
    head, rows = lines[at], lines[at + 2:]
    wall, ops = map(float, re.search(r"([\d.]+) ms a step \(wall\), ([\d.]+) ms of operations", head).groups())
    assert 0 < ops <= wall * 1.05, head
    names = [row.split()[-1] for row in rows]
    assert len(rows) >= 10 and all(float(row.split()[0]) >= 0 for row in rows), rows
    assert any(n.startswith("kernels.") for n in names) == kernels_expected(), names  # kernels.c's calls, named


SCRIPT_ERRORS = [
    (["scripts/benchmark.py", "--ckpt_dir", "/nonexistent"], 1, "error: tokenizer file '/nonexistent/tokenizer.model'"),
    (["scripts/profile_step.py", "--shape", "tiny", "--device", "tpu"], 1, "error: unknown device 'tpu'"),
    (["scripts/bench_load.py", "--shape", "13b"], 2, "argument --shape: invalid choice: '13b'"),
    (["scripts/benchmark.py", "--json", "/nonexistent/figures.json"], 1, "error: --json /nonexistent/figures.json: "
     "can't write that file"),
    (["scripts/bench_kernels.py", "--reps", "0"], 2, "argument --reps: must be at least 1, got 0"),
]


@pytest.mark.parametrize("args, code, said", SCRIPT_ERRORS)
def test_scripts_say_what_is_wrong_in_one_line(args, code, said, capsys):
    """Each script's main() as its entry point runs it (``one_line_errors``), here in this process; the first case
    also as a process, the script's own entry point (3-4 s each on a 2-core machine)."""
    with pytest.raises(SystemExit) as ended, cli.one_line_errors():
        script_main(Path(args[0]).stem, *args[1:])
    err = capsys.readouterr().err
    assert ended.value.code == code and said in err and "Traceback" not in err, err
    if (args, code, said) == SCRIPT_ERRORS[0]:
        result = run_cmd([sys.executable, *args], timeout=60)
        assert result.returncode == code and result.stderr == err, result.stderr
