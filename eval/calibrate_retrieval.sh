#!/usr/bin/env bash
# Calibration of the trained-in retrieval task (data/retrieval.py): four small models (4 layers of width 256)
# trained side by side on one GPU for the same time, Wall and RoPE, with keys and values drawn from all lowercase
# word tokens or from the common ones (train.py's retrieval_words), a fraction MIX of their tokens synthetic, then
# scored by distance inside and past their 4096-token training documents. Results go to $RESULTS.
#   DEADLINE=530 bash eval/calibrate_retrieval.sh
set -uo pipefail
start=$(date +%s)
RESULTS=${RESULTS:-out/calibration}
DATA=${DATA:-data/installed}
DEADLINE=${DEADLINE:-900}
MIX=${MIX:-0.3}
RUNS="wall_all wall_common rope_all rope_common"
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
if [ ! -f "$DATA/val.bin" ]; then
  python3 data/prepare.py --source=installed --vocab_size=16384 --out="$DATA" ${TOKENIZER:+--tokenizer=$TOKENIZER} \
    > "$RESULTS/prepare.log" 2>&1 || { tail -3 "$RESULTS/prepare.log"; exit 1; }
fi
echo "prepared at $(( $(date +%s) - start )) s"
train_seconds=$(( $(left) - 80 ))
for run in $RUNS; do  # train.py saves every eval_interval steps: what the time limit leaves is scored
  timeout "$train_seconds" python3 train.py config/lengthgen_wall.py --attention="${run%_*}" \
    --retrieval_words="${run#*_}" --retrieval_mix="$MIX" --n_layer=4 --n_embd=256 --n_head=4 --n_kv_head=4 \
    --max_iters=4000 --lr_decay_iters=4000 --eval_interval=250 --eval_iters=2 --learning_rate=2e-3 --min_lr=2e-4 \
    --out_dir="out/calibration_$run" --data_dir="$DATA" > "$RESULTS/$run.train.log" 2>&1 &
done
wait
echo "trained at $(( $(date +%s) - start )) s"
for run in $RUNS; do
  timeout $(( $(left) - 5 )) python3 eval/retrieval.py --ckpt "out/calibration_$run/ckpt.pt" \
    --distances 256,1024,4096,8192 --trials 32 --out "$RESULTS/$run" > "$RESULTS/$run.retrieval.log" 2>&1 &
done
wait
for run in $RUNS; do
  echo "== $run: $(grep -E '^iter [0-9]+: loss' "$RESULTS/$run.train.log" | tail -1)"
  grep -E 'val loss' "$RESULTS/$run.train.log" | tail -1
  grep -E 'exact match [0-9.]+ ' "$RESULTS/$run.retrieval.log"
done
echo "total $(( $(date +%s) - start )) s"
