"""scripts/gpu_check.sh: its packing for a GPU machine that can't install packages, and its steps, run here by a
stand-in for Python that says what it was asked (the steps themselves need a GPU, and are the GPU tests and
scripts that run there)."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import LLAMA2_TOKENIZER, ROOT

SCRIPT = ROOT / "scripts" / "gpu_check.sh"

# Answers each call as the script makes it: torch there with a GPU, the tests passing, the --compile benchmark
# printing a table, the profile failing, each call logged with what it found on PYTHONPATH and its fixtures.
FAKE_PYTHON = r"""#!/usr/bin/env bash
echo "$* | PYTHONPATH=${PYTHONPATH:-} | LLAMA_TEST_FIXTURES=${LLAMA_TEST_FIXTURES:-}" >>"$CALLS"
case "$*" in
    *cuda.is_available*) exit "${NO_GPU:-0}" ;;
    *get_device_name*) echo "Fake GPU torch 0.0" ;;
    "-c "*) ;;
    "-m pytest"*) sleep "${PYTEST_SECONDS:-0}"; echo "3 passed in 1.00s" ;;
    *benchmark.py*--compile*)
        printf 'ceilings\n\n        value unit   of roofline\ndecode batch 1   200 tok/s   70%%\n' ;;
    *profile_step.py*) echo "no GPU after all" >&2; exit 3 ;;
    *benchmark.py*) echo "decode batch 1   190 tok/s   66%" ;;
esac
"""


def fake_checkout(tmp_path: Path) -> Path:
    """A copy of the script in a checkout of its own (it runs from the checkout it is in), with the fake Python."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts")
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return root


def run(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": str(root.parent / "python"),
                                           "CALLS": str(root.parent / "calls"), **env})


def test_pack_gathers_what_the_checks_import_and_the_fixtures(tmp_path):
    packed = tmp_path / "pack"
    proc = subprocess.run(["bash", str(SCRIPT), "--pack", str(packed)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0 and f"into {packed}" in proc.stdout, proc.stderr
    # -S: none from this Python's site-packages (fairscale is found, not imported: it imports torch)
    where = subprocess.run([sys.executable, "-S", "-c", "import fire, importlib.util as u; "
                            "print(fire.__file__, *(u.find_spec(n).origin for n in ('fairscale', 'termcolor')))"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(packed / "site")})
    paths = where.stdout.split()
    assert len(paths) == 3 and all(p.startswith(str(packed / "site")) for p in paths), where.stderr
    tokenizer = packed / "fixtures" / "llama2" / "tokenizer.model"
    assert hashlib.md5(tokenizer.read_bytes()).digest() == hashlib.md5(LLAMA2_TOKENIZER.read_bytes()).digest()


def test_steps_run_in_order_and_a_failed_one_fails_the_run(tmp_path):
    root = fake_checkout(tmp_path)
    (root / ".gpu" / "site").mkdir(parents=True)
    out = tmp_path / "out"
    proc = run(root, str(out))
    assert proc.returncode == 1, proc.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    steps = [c for c in calls if not c.startswith("-c ")]
    assert [s.split(" | ")[0].split()[:2] for s in steps] == [
        ["-m", "pytest"], ["scripts/benchmark.py", "--shape"], ["scripts/profile_step.py", "--shape"],
        ["scripts/benchmark.py", "--shape"]]
    assert "--compile" in steps[1] and "--compile" not in steps[3].split(" | ")[0]
    assert all(f"PYTHONPATH={root}/.gpu/site" in c and f"LLAMA_TEST_FIXTURES={root}/.gpu/fixtures" in c
               for c in calls)
    assert sorted(p.name for p in out.iterdir()) == ["bench-compile.log", "bench-default.log", "profile.log",
                                                     "tests.log"]
    summary = proc.stdout.split("\n\n")
    assert summary[-2].splitlines() == ["        value unit   of roofline", "decode batch 1   200 tok/s   70%"]
    assert [re.sub(r"done in \d+ s", "done", line) for line in summary[-1].splitlines()] == [
        "GPU tests: done, tests.log: 3 passed in 1.00s",
        "7b --compile: done, bench-compile.log: decode batch 1   200 tok/s   70%",
        "profile --compile: FAILED (exit 3), profile.log: no GPU after all",
        "7b defaults: done, bench-default.log: decode batch 1   190 tok/s   66%"]


def test_steps_start_only_while_the_time_given_lasts(tmp_path):
    root = fake_checkout(tmp_path)
    proc = run(root, str(tmp_path / "out"), "31", PYTEST_SECONDS="2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-4:] == [
        "GPU tests: done in 2 s, tests.log: 3 passed in 1.00s",
        "7b --compile: not run (the time given was spent)",
        "profile --compile: not run (the time given was spent)",
        "7b defaults: not run (the time given was spent)"]
    assert "PYTHONPATH= " in (tmp_path / "calls").read_text()  # no .gpu in this checkout: nothing added


def test_without_a_gpu_or_with_bad_arguments_it_says_so(tmp_path):
    root = fake_checkout(tmp_path)
    for args, env, said in [([], {}, "usage: bash scripts/gpu_check.sh OUT_DIR [SECONDS], or --pack [DIR]"),
                            ([str(tmp_path), "8m"], {}, "SECONDS must be a whole number, got '8m'"),
                            ([str(tmp_path)], {"NO_GPU": "1"}, "torch sees no CUDA GPU here")]:
        proc = run(root, *args, **env)
        assert proc.returncode == 1 and said in proc.stderr, (args, proc.stderr)


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck not installed")
def test_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
