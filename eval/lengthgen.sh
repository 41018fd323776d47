#!/usr/bin/env bash
# The length-generalisation study (docs/length_generalization.md) for one model, end to end on one GPU: prepare the
# installed-source corpus if it is not there, train config/lengthgen_MODEL.py, then evaluate the checkpoint to 16x
# its 4096-token training documents: loss by position and natural copying (eval/length.py), trained-in retrieval
# by distance to 32x (eval/retrieval.py), the needle test (eval/niah.py) and, for Wall models, the trained gates
# (eval/gates.py, which says so and writes nothing for a model without them). Results, logs and plots go to
# $RESULTS/MODEL (default out/lengthgen/MODEL).
#   bash eval/lengthgen.sh wall            # any config/lengthgen_MODEL.py; extra arguments go to train.py
# DEADLINE=<seconds> makes everything end within that many seconds of the start: training gets what the
# evaluations (EVAL_SECONDS, default 200) leave, and the evaluations use the last checkpoint it saved.
set -uo pipefail
models=$(echo $(ls config/lengthgen_*.py 2>/dev/null | sed 's#config/lengthgen_##; s#\.py$##'))
model=${1:?usage: bash eval/lengthgen.sh MODEL [train.py overrides], MODEL one of: $models}
shift
[ -f "config/lengthgen_$model.py" ] || { echo "error: no config/lengthgen_$model.py (MODEL one of: $models)"; exit 1; }
start=$(date +%s)
RESULTS=${RESULTS:-out/lengthgen}/$model
DATA=${DATA:-data/installed}
LENGTH=${LENGTH:-65536}
DOCS=${DOCS:-64}
DISTANCES=${DISTANCES:-512,1024,2048,4096,8192,16384,32768,65536}  # 1/8 to 16x the training length
FAR=${FAR:-131072}  # 32x, its own process and JSON: it takes longest, and a deadline kill loses only it
EVAL_SECONDS=${EVAL_SECONDS:-200}
export PYTHONUNBUFFERED=1
# compiled kernels stay under out/ so that the next model's run on the same machine reuses them
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/out/cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/out/cache/triton}
mkdir -p "$RESULTS"
left() { [ "${DEADLINE:-0}" -gt 0 ] && echo $(( DEADLINE - ($(date +%s) - start) )) || echo 100000; }
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its log in $RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  [ "$limit" -gt 0 ] || { echo "$name: skipped, no time left" | tee -a "$RESULTS/steps.txt"; return 1; }
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$RESULTS/steps.txt"
  return $rc
}

if [ ! -f "$DATA/val.bin" ]; then
  step prepare "$(left)" python3 -m data.prepare --source=installed --vocab_size=16384 --out="$DATA" \
    ${TOKENIZER:+--tokenizer=$TOKENIZER} || { tail -3 "$RESULTS/prepare.log"; exit 1; }
  tail -6 "$RESULTS/prepare.log"
fi
cp "$DATA/manifest.json" "$RESULTS/" 2>/dev/null
out_dir=out/lengthgen_$model
step train $(( $(left) - EVAL_SECONDS )) python3 train.py "config/lengthgen_$model.py" --data_dir="$DATA" \
  --out_dir="$out_dir" "$@"
grep -E 'parameters|val loss' "$RESULTS/train.log" | sed -n '1p;$p'
ckpt=$out_dir/ckpt.pt
[ -f "$ckpt" ] || { echo "error: training saved no checkpoint"; tail -5 "$RESULTS/train.log"; exit 1; }

# gates.py times the attention kernels, so it runs alone; the other evaluations share the GPU side by side. It
# reads the attention from the checkpoint and exits at once for one without per-channel gates (RoPE, FoX).
step gates $(( $(left) / 4 )) python3 -m eval.gates --ckpt "$ckpt" --out "$RESULTS/gates"
step length "$(left)" python3 -m eval.length --ckpt "$ckpt" --length "$LENGTH" --docs "$DOCS" --copy \
  --out "$RESULTS/length" &
step retrieval "$(left)" python3 -m eval.retrieval --ckpt "$ckpt" --distances "$DISTANCES" \
  --out "$RESULTS/retrieval" &
# one prefill forward per probe: chunks after the first go through the cached path, whose attention is far
# slower than the training kernel's at this length
[ -n "$FAR" ] && step retrieval_far "$(left)" python3 -m eval.retrieval --ckpt "$ckpt" --distances "$FAR" \
  --prefill_chunk 262144 --out "$RESULTS/retrieval_far" &
step niah "$(left)" python3 -m eval.niah --ckpt "$ckpt" --lengths 2048,4096,16384,65536 --depths 0,0.5,1 \
  --trials 4 --out "$RESULTS/niah" &
wait
for log in "$RESULTS"/{length,retrieval,retrieval_far,gates,niah}.log; do [ -f "$log" ] && tail -2 "$log"; done
echo "total $(( $(date +%s) - start )) s"
