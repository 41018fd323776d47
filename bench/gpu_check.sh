#!/usr/bin/env bash
# Everything the GPU machine checks, in one call: GPU tests, then benchmarks; logs in $LOGS, tables last, and
# (on the device tool's machine, where $OUT is set) the logs as one archive $OUT/gpu_check.tgz. Every part runs
# under what is left of $DEADLINE seconds (default 560), so the archive is written even when the parts run long.
#   bash bench/gpu_check.sh [tests] [attn] [decode] [train] [generate]     (default: all)
# Wheels the machine lacks travel in .whl/ (carried): flash-linear-attention (the peer) and pytest-timeout, without
# which one test that compiles for minutes takes the whole deadline (`pip download pytest-timeout --no-deps -d
# .whl`). BASELINE=DIR also times another checkout's kernels/ folder in attn and decode (before/after rows from one
# run); ATTN_SKIP='fla ...' leaves those kernels out of attn (the peers compile for minutes); TESTS_K='expr' runs
# only the GPU tests pytest -k selects, TEST_TIMEOUT=s sets the per-test limit (300 s).
set -uo pipefail
LOGS=${LOGS:-/tmp/gpu_check}
mkdir -p "$LOGS"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1  # the scripts run as modules (python3 -m bench.X) from the repository root
parts=${*:-tests attn decode train generate}
baseline=${BASELINE:+--baseline $BASELINE}
DEADLINE=${DEADLINE:-560}
left() { echo $(( DEADLINE - SECONDS > 1 ? DEADLINE - SECONDS : 1 )); }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$LOGS/gpu.txt"
for part in $parts; do
  case $part in
    # one test that compiles for minutes must not take the whole deadline: pytest-timeout, where installed
    tests)  per_test=$(python3 -c 'import pytest_timeout' 2>/dev/null && echo --timeout=${TEST_TIMEOUT:-300})
            timeout $(left) python3 -m pytest -q -rf -m gpu $per_test ${TESTS_K:+-k "$TESTS_K"} --durations=8 tests 2>&1 | tee "$LOGS/tests.log" | tail -25 ;;
    # the peers compile for minutes per shape: they run at the target shape only
    attn)   timeout $(left) python3 -m bench.bench_attn --shapes 'B2 T8k H16' $baseline ${ATTN_SKIP:+--skip $ATTN_SKIP} --out "$LOGS/attn.md" 2>&1 | tee "$LOGS/attn.log" | grep -v '^|'
            timeout $(left) python3 -m bench.bench_attn --shapes 'B1 T16k GQA 16/4' 'B1 T32k varlen' --skip fla --out "$LOGS/attn_more.md" \
              2>&1 | tee -a "$LOGS/attn.log" | grep -v '^|' ;;
    decode) timeout $(left) python3 -m bench.bench_decode $baseline --out "$LOGS/decode.md" 2>&1 | tee "$LOGS/decode.log" | grep -v '^|' ;;
    train)    timeout $(left) python3 -m bench.bench_train --out "$LOGS/train.md" 2>&1 | tee "$LOGS/train.log" | tail -20 ;;
    generate) timeout $(left) python3 -m bench.bench_generate --out "$LOGS/generate.md" 2>&1 | tee "$LOGS/generate.log" | tail -20
              timeout $(left) python3 -m bench.bench_generate --eager --out "$LOGS/generate_eager.md" 2>&1 \
                | tee -a "$LOGS/generate.log" | tail -5 ;;
  esac
done
echo; cat "$LOGS"/*.md 2>/dev/null
if [ -n "${OUT:-}" ]; then tar czf "$OUT/gpu_check.tgz" -C "$LOGS" .; fi
