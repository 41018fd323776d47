#!/usr/bin/env bash
# Everything the GPU machine checks, in one call: GPU tests, then benchmarks; logs under $OUT, tables last.
#   bash bench/gpu_check.sh [tests] [attn] [decode] [train] [generate]     (default: all)
# flash-linear-attention (the peer) travels as a wheel in .whl/ when the machine lacks it.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
parts=${*:-tests attn decode train generate}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for part in $parts; do
  case $part in
    tests)  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    # the peers compile for minutes per shape: they run at the target shape only
    attn)   python3 bench/bench_attn.py --shapes 'B2 T8k H16' --out "$OUT/attn.md" 2>&1 | tee "$OUT/attn.log" | grep -v '^|'
            python3 bench/bench_attn.py --shapes 'B1 T16k GQA 16/4' 'B1 T32k varlen' --skip fla --out "$OUT/attn_more.md" \
              2>&1 | tee -a "$OUT/attn.log" | grep -v '^|' ;;
    decode) python3 bench/bench_decode.py --out "$OUT/decode.md" 2>&1 | tee "$OUT/decode.log" | grep -v '^|' ;;
    train)    python3 bench/bench_train.py --out "$OUT/train.md" 2>&1 | tee "$OUT/train.log" | tail -20 ;;
    generate) python3 bench/bench_generate.py --out "$OUT/generate.md" 2>&1 | tee "$OUT/generate.log" | tail -20 ;;
  esac
done
echo; cat "$OUT"/*.md 2>/dev/null
