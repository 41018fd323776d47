#!/usr/bin/env bash
# Calibration of the trained-in retrieval task (data/retrieval.py): models trained side by side on one GPU for STEPS
# steps of 65,536 tokens at 4096-token documents, a fraction MIX of their tokens synthetic retrieval documents, then
# scored by distance inside the training length (docs/length_generalization.md). RUNS has one line per model,
# "NAME [train.py overrides on top of CONFIG]". Results go to $RESULTS; DEADLINE bounds the whole run.
#   DEADLINE=540 bash eval/calibrate_retrieval.sh
#   RUNS=$'wall --attention=wall\nrope --attention=rope' CONFIG=config/lengthgen_wall.py SMALL=1 bash ...
set -uo pipefail
start=$(date +%s)
RESULTS=${RESULTS:-out/calibration}
DATA=${DATA:-data/installed}
DEADLINE=${DEADLINE:-900}
CONFIG=${CONFIG:-config/lengthgen_wall_shift.py}
MIX=${MIX:-0.9}
STEPS=${STEPS:-1000}
DISTANCES=${DISTANCES:-512,2048}
RUNS=${RUNS:-$'wall_shift\nwall_shift_frozen_gates --gate_lr_scale=0'}
SCORERS=${SCORERS:-cache forward}  # forward: one full forward per probe, a check on the cache (and slower)
# SMALL=1: the 7.4M-parameter models of the first calibration (4 layers of width 256)
SIZE=${SMALL:+--n_layer=4 --n_embd=256 --n_head=4 --n_kv_head=4 --learning_rate=2e-3 --min_lr=2e-4}
export PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
if [ ! -f "$DATA/val.bin" ]; then
  python3 -m data.prepare --source=installed --vocab_size=16384 --out="$DATA" ${TOKENIZER:+--tokenizer=$TOKENIZER} \
    > "$RESULTS/prepare.log" 2>&1 || { tail -3 "$RESULTS/prepare.log"; exit 1; }
fi
echo "prepared at $(( $(date +%s) - start )) s"
names=()
while read -r name overrides; do  # train.py saves every eval_interval steps: what the time limit leaves is scored
  [ -n "$name" ] || continue
  names+=("$name")
  # shellcheck disable=SC2086
  timeout $(( $(left) - 80 )) python3 train.py "$CONFIG" --retrieval_mix="$MIX" $SIZE --max_iters="$STEPS" \
    --lr_decay_iters="$STEPS" --eval_interval=100 --eval_iters=2 --out_dir="out/calibration_$name" \
    --data_dir="$DATA" $overrides > "$RESULTS/$name.train.log" 2>&1 &
done <<< "$RUNS"
wait
echo "trained at $(( $(date +%s) - start )) s"
for name in "${names[@]}"; do  # as users decode (the cache), and through the training path as a check on it
  for scorer in $SCORERS; do
    timeout $(( $(left) - 5 )) python3 -m eval.retrieval --ckpt "out/calibration_$name/ckpt.pt" --scorer $scorer \
      --distances "$DISTANCES" --trials 32 --out "$RESULTS/${name}_$scorer" > "$RESULTS/${name}_$scorer.log" 2>&1 &
  done
done
wait
for name in "${names[@]}"; do
  echo "== $name: $(grep -E '^iter [0-9]+: loss' "$RESULTS/$name.train.log" | tail -1)"
  grep -E 'val loss' "$RESULTS/$name.train.log" | tail -1
  echo "retrieval loss by iteration: $(grep -oE '^iter [0-9]+: val loss [0-9.]+, retrieval loss [0-9.]+' \
    "$RESULTS/$name.train.log" | sed -E 's/^iter ([0-9]+): .*retrieval loss /\1 /' | paste -sd, -)"
  grep -q '^done at iter' "$RESULTS/$name.train.log" ||
    echo "stopped before iter $STEPS (the deadline): scored is the last checkpoint saved, $(grep -E '^iter [0-9]+: val' "$RESULTS/$name.train.log" | tail -1 | cut -d: -f1)"
  for scorer in $SCORERS; do
    grep -E 'exact match [0-9.]+ ' "$RESULTS/${name}_$scorer.log" | sed "s/^/$scorer: /"
  done
done
echo "total $(( $(date +%s) - start )) s"
