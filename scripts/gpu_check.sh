#!/usr/bin/env bash
# What needs a CUDA GPU, in one command that fits a short lease of one:
#
#   bash scripts/gpu_check.sh OUT_DIR [SECONDS]
#
# runs, most wanted first, each step only while SECONDS (default 480) last, and stopped when they run out:
#   1. the GPU tests (pytest -m gpu: CUDA graphs and the compiled kernels against eager and the float64 reference)
#   2. the benchmark on the 7b shape with the fastest flag, --compile (the figure the GPU target is about)
#   3. a profile of its decoding step, kernel by kernel (profile_step.py --compile)
#   4. the benchmark on the 7b shape with the defaults
# OUT_DIR gets each step's log and the benchmarks' figures as JSON (six files); the summary comes last.
#
#   bash scripts/gpu_check.sh --pack [DIR]
#
# copies this Python's pure-Python dependencies (fairscale, fire, termcolor) and the test fixtures into DIR
# (default .gpu, which git ignores), for a GPU machine that can't install packages: the checks put DIR/site on
# PYTHONPATH and read the fixtures from DIR/fixtures where ./.gpu is there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}

die() {
    echo "error: $*" >&2
    exit 1
}

pack() {
    local dir=${1:-.gpu} site fixtures
    site=$("$PYTHON" -c 'import importlib.util as u, os; print(os.path.dirname(os.path.dirname(
        u.find_spec("fairscale").origin)))' 2>/dev/null) ||
        die "$PYTHON has no fairscale: run this with the project's environment active (. .venv/bin/activate)"
    fixtures=${LLAMA_TEST_FIXTURES:-../shared/fixtures}
    [ -d "$fixtures" ] || die "no test fixtures at $fixtures (the README's tests section says what they are)"
    rm -rf -- "$dir/site" "$dir/fixtures" || die "cannot write $dir"
    mkdir -p -- "$dir/site" || die "cannot write $dir"
    cp -r -- "$site/fairscale" "$site/fire" "$site/termcolor" "$dir/site/" || die "cannot copy into $dir"
    cp -r -- "$fixtures" "$dir/fixtures" || die "cannot copy into $dir"
    echo "packed $(du -sh -- "$dir" | cut -f1) into $dir: carry it with the working tree"
}

# step NAME LOG COMMAND...: runs COMMAND with LOG as its output, for at most the seconds left.
step() {
    local name=$1 log=$2 left rc start=$SECONDS
    shift 2
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        SUMMARY+="$name: not run (the time given was spent)"$'\n'
        return
    fi
    echo "$name ($left s left)"
    timeout "$left" "$@" >"$OUT_DIR/$log" 2>&1
    rc=$?
    case $rc in
        0) SUMMARY+="$name: done in $((SECONDS - start)) s" ;;
        124) SUMMARY+="$name: stopped when the time given ran out"; FAILED=1 ;;
        *) SUMMARY+="$name: FAILED (exit $rc)"; FAILED=1 ;;
    esac
    SUMMARY+=", $log: $(grep -v '^\s*$' "$OUT_DIR/$log" | tail -n 1)"$'\n'
}

if [ "${1:-}" = --pack ]; then
    pack "${2:-}"
    exit
fi
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash scripts/gpu_check.sh OUT_DIR [SECONDS], or --pack [DIR]"
OUT_DIR=$1
BUDGET=${2:-480}
case $BUDGET in '' | *[!0-9]*) die "SECONDS must be a whole number, got '$BUDGET'" ;; esac
mkdir -p -- "$OUT_DIR" || die "cannot create $OUT_DIR"
if [ -d .gpu ]; then
    export PYTHONPATH="$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}" LLAMA_TEST_FIXTURES="$PWD/.gpu/fixtures"
fi
export PYTHONUNBUFFERED=1
"$PYTHON" -c 'import torch' 2>/dev/null || die "$PYTHON can't import torch: set PYTHON to a Python that can"
"$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
    die "torch sees no CUDA GPU here: these checks are for one (the CPU's are the test suite and benchmark.py)"
"$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(), "torch", torch.__version__)'

SUMMARY="" FAILED=0
step "GPU tests" tests.log "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
step "7b --compile" bench-compile.log "$PYTHON" scripts/benchmark.py --shape 7b --reps 10 --compile \
    --json "$OUT_DIR/bench-compile.json"
step "profile --compile" profile.log "$PYTHON" scripts/profile_step.py --shape 7b --compile
step "7b defaults" bench-default.log "$PYTHON" scripts/benchmark.py --shape 7b --reps 5 \
    --json "$OUT_DIR/bench-default.json"

if [ -s "$OUT_DIR/bench-compile.log" ]; then
    echo
    sed -n '/^ *value unit/,$p' "$OUT_DIR/bench-compile.log"
fi
echo
printf '%s' "$SUMMARY"
exit "$FAILED"
