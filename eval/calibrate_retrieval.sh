#!/usr/bin/env bash
# Calibration of the trained-in retrieval task (data/retrieval.py): small models (4 layers of width 256), one per
# attention in ATTENTIONS, trained side by side on one GPU for STEPS steps of 65,536 tokens at 4096-token
# documents, a fraction MIX of their tokens synthetic retrieval documents, then scored by distance inside and past
# the training length (docs/length_generalization.md). Results go to $RESULTS; DEADLINE bounds the whole run.
#   DEADLINE=530 bash eval/calibrate_retrieval.sh
set -uo pipefail
start=$(date +%s)
RESULTS=${RESULTS:-out/calibration}
DATA=${DATA:-data/installed}
DEADLINE=${DEADLINE:-900}
MIX=${MIX:-0.3}
STEPS=${STEPS:-4000}
ATTENTIONS=${ATTENTIONS:-"wall rope"}
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
if [ ! -f "$DATA/val.bin" ]; then
  python3 -m data.prepare --source=installed --vocab_size=16384 --out="$DATA" ${TOKENIZER:+--tokenizer=$TOKENIZER} \
    > "$RESULTS/prepare.log" 2>&1 || { tail -3 "$RESULTS/prepare.log"; exit 1; }
fi
echo "prepared at $(( $(date +%s) - start )) s"
for attention in $ATTENTIONS; do  # train.py saves every eval_interval steps: what the time limit leaves is scored
  timeout $(( $(left) - 80 )) python3 train.py config/lengthgen_wall.py --attention="$attention" \
    --retrieval_mix="$MIX" --n_layer=4 --n_embd=256 --n_head=4 --n_kv_head=4 --max_iters="$STEPS" \
    --lr_decay_iters="$STEPS" --eval_interval=250 --eval_iters=2 --learning_rate=2e-3 --min_lr=2e-4 \
    --out_dir="out/calibration_$attention" --data_dir="$DATA" > "$RESULTS/$attention.train.log" 2>&1 &
done
wait
echo "trained at $(( $(date +%s) - start )) s"
for attention in $ATTENTIONS; do
  timeout $(( $(left) - 5 )) python3 -m eval.retrieval --ckpt "out/calibration_$attention/ckpt.pt" \
    --distances 256,1024,4096,8192 --trials 32 --out "$RESULTS/$attention" > "$RESULTS/$attention.retrieval.log" 2>&1 &
done
wait
for attention in $ATTENTIONS; do
  echo "== $attention: $(grep -E '^iter [0-9]+: loss' "$RESULTS/$attention.train.log" | tail -1)"
  grep -E 'val loss' "$RESULTS/$attention.train.log" | tail -1
  grep -E 'exact match [0-9.]+ ' "$RESULTS/$attention.retrieval.log"
done
echo "total $(( $(date +%s) - start )) s"
