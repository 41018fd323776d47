#!/usr/bin/env bash
# Issue 33's GPU run, right after a training run on the same machine (docs/hf.md, "The GPU run"): export the
# checkpoint to a Hugging Face folder, write the lm-eval task data, score the folder through lm-eval (wall_niah,
# wall_retrieval, RULER's niah_single_1) and the checkpoint through eval/retrieval.py and eval/niah.py on the same
# lengths and distances, then put them side by side in RESULTS_DIR/compare.md (hf/compare.py). From anywhere:
#   bash hf/gpu_run.sh out/lengthgen_wall_shift/ckpt.pt out/hf_run
# RESULTS_DIR (new or empty: the export refuses a non-empty hf_model/) gets every step's log (NAME.log), its JSON,
# steps.txt (each step's exit code and seconds) and compare.md. A step that fails is logged and the steps that do
# not need it still run; compare.md is written from whatever finished. Exits 1 if a step failed or was skipped.
# DEADLINE=<seconds> ends everything within that many seconds of the start: a step is stopped there (eval/retrieval.py
# keeps the distances it finished) and the steps after it are skipped, RESERVE seconds (default 15) kept for compare.md.
# Where lm_eval or wonderwords does not import and .whl/ (WHEELS) holds the carried wheels (docs/hf.md), they are
# installed to /tmp/site (SITE) and put on PYTHONPATH first.
# Other overrides (environment): LENGTHS (needle prompts, and RULER's max_seq_lengths unless RULER_LENGTHS, whose
# lengths must be among RULER's metrics: 4096, 8192, ..., 131072),
# DISTANCES (retrieval), DEPTHS, TRIALS (needle probes per length and depth), RETRIEVAL_TRIALS, BATCH, DTYPE,
# CONTEXT (the export's), MAX_LENGTH (lm-eval's), LIMIT and RULER_LIMIT (lm-eval --limit for its wall_* run / its
# RULER run), PARALLEL=0 (the repository's evaluations after lm-eval instead of beside it), PYTHON.
set -euo pipefail
usage="usage: bash hf/gpu_run.sh CKPT RESULTS_DIR"
[ $# -eq 2 ] || { echo "$usage"; exit 1; }
[ -f "$1" ] || { echo "error: CKPT $1: no such file"; exit 1; }
start=$(date +%s)
ckpt=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
mkdir -p "$2"
RESULTS=$(cd "$2" && pwd)
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
LENGTHS=${LENGTHS:-4096,16384}
DISTANCES=${DISTANCES:-512,2048,4096,16384}  # 1/8 and 1/2 of a 4096-token training length, 1x and 4x: prompts of
                                             # about distance + 256 tokens
DEPTHS=${DEPTHS:-0,0.25,0.5,0.75,1}
TRIALS=${TRIALS:-8}
RETRIEVAL_TRIALS=${RETRIEVAL_TRIALS:-32}
RULER_LENGTHS=${RULER_LENGTHS:-$LENGTHS}
BATCH=${BATCH:-8}
DTYPE=${DTYPE:-bfloat16}
CONTEXT=${CONTEXT:-16384}
longest=$(echo "$LENGTHS,$DISTANCES,$RULER_LENGTHS" | tr ',' '\n' | sort -n | tail -1)
MAX_LENGTH=${MAX_LENGTH:-$(( 2 * longest ))}  # past every prompt: lm-eval cuts longer ones from the left
PARALLEL=${PARALLEL:-1}
RESERVE=${RESERVE:-15}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1
# nothing is fetched: the machine has no network, and the task data are written here
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# compiled kernels stay under out/ as eval/lengthgen.sh keeps them, so a training run's are reused
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/out/cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/out/cache/triton}

left() { [ "${DEADLINE:-0}" -gt 0 ] && echo $(( DEADLINE - ($(date +%s) - start) )) || echo 100000; }
note() { echo "$*" | tee -a "$RESULTS/steps.txt"; }
step() {  # step NAME COMMAND...: run it until RESERVE seconds before the deadline, its log in $RESULTS/NAME.log
  local name=$1 limit=$(( $(left) - RESERVE )) t0 rc
  shift
  t0=$(date +%s)
  [ "$limit" -gt 0 ] || { note "$name: skipped, no time left"; return 1; }
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1 && rc=0 || rc=$?
  note "$name: exit $rc in $(( $(date +%s) - t0 )) s$([ "$rc" -eq 124 ] && echo ', stopped at the deadline')"
  [ "$rc" -eq 0 ] || tail -3 "$RESULTS/$name.log"
  return "$rc"
}
note "gpu_run: $ckpt -> $RESULTS, $(date -u +%FT%TZ)"

# the carried wheels (docs/hf.md): lm-eval and its needs that the GPU machine lacks
if ! "$PYTHON" -c 'import lm_eval, wonderwords' 2>/dev/null; then
  if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
    step wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} || true
  else
    note "wheels: lm_eval or wonderwords does not import and $WHEELS/ holds no wheels; the lm-eval steps will fail"
  fi
fi
# RULER's prepare_niah downloads nltk's punkt_tab when it is imported; only its essay haystacks use it (not
# niah_single_1), so an empty stand-in keeps it from reaching for the network
if ! "$PYTHON" -c 'import nltk; nltk.data.find("tokenizers/punkt_tab")' > /dev/null 2>&1; then
  mkdir -p "$RESULTS/nltk_data/tokenizers/punkt_tab"
  export NLTK_DATA=$RESULTS/nltk_data${NLTK_DATA:+:$NLTK_DATA}
fi

repo_evals() {  # eval/retrieval.py and eval/niah.py on the checkpoint, the lengths and distances lm-eval gets
  step retrieval "$PYTHON" -m eval.retrieval --ckpt "$ckpt" --distances "$DISTANCES" --trials "$RETRIEVAL_TRIALS" \
    --batch "$BATCH" --dtype "$DTYPE" --out "$RESULTS/retrieval" || true
  step niah "$PYTHON" -m eval.niah --ckpt "$ckpt" --lengths "$LENGTHS" --depths "$DEPTHS" --trials "$TRIALS" \
    --dtype "$DTYPE" --out "$RESULTS/niah" || true
}
pid=
if [ "$PARALLEL" = 1 ]; then repo_evals & pid=$!; fi

exported=0 tasks=0
step export "$PYTHON" -m hf.export --ckpt "$ckpt" --out "$RESULTS/hf_model" --context "$CONTEXT" --check &&
  exported=1 || true
step tasks "$PYTHON" -m hf.tasks.make --ckpt "$ckpt" --out "$RESULTS/tasks" --lengths "$LENGTHS" \
  --distances "$DISTANCES" --depths "$DEPTHS" --trials "$TRIALS" --retrieval_trials "$RETRIEVAL_TRIALS" &&
  tasks=1 || true
# lm-eval runs outside the checkout, whose kernels/ would shadow the package transformers imports (docs/hf.md)
model_args=pretrained=$RESULTS/hf_model,trust_remote_code=True,dtype=$DTYPE,max_length=$MAX_LENGTH
if [ $exported = 1 ] && [ $tasks = 1 ]; then
  (cd "$RESULTS" && step lm_eval "$PYTHON" -m lm_eval --model hf --model_args "$model_args" \
    --include_path "$REPO/hf/tasks" --tasks wall_niah,wall_retrieval --batch_size "$BATCH" \
    --metadata "{\"wall_tasks\": \"$RESULTS/tasks\"}" --output_path "$RESULTS/lm_eval" --log_samples \
    ${LIMIT:+--limit "$LIMIT"}) || true
else
  note "lm_eval: skipped, $([ $exported = 1 ] && echo 'no task data' || echo 'no exported model')"
fi
if [ $exported = 1 ]; then
  (cd "$RESULTS" && step lm_eval_ruler "$PYTHON" -m lm_eval --model hf --model_args "$model_args" \
    --tasks niah_single_1 --batch_size "$BATCH" --metadata "{\"max_seq_lengths\": [$RULER_LENGTHS]}" \
    --output_path "$RESULTS/lm_eval" --log_samples ${RULER_LIMIT:+--limit "$RULER_LIMIT"}) || true
else
  note "lm_eval_ruler: skipped, no exported model"
fi

if [ -n "$pid" ]; then wait "$pid" || true; else repo_evals; fi
RESERVE=0 step compare "$PYTHON" -m hf.compare "$RESULTS" || true
[ -f "$RESULTS/compare.md" ] && cat "$RESULTS/compare.md"
echo "total $(( $(date +%s) - start )) s"
! grep -qE ': (exit [1-9]|skipped)' "$RESULTS/steps.txt"  # the exit status: 1 if a step failed or was skipped
