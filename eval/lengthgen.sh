#!/usr/bin/env bash
# The length-generalisation experiment (docs/length_generalization.md), end to end on one GPU: the default corpus,
# three models that differ only in attention (config/lengthgen_{wall,rope,fox}.py), trained side by side (the
# models are small enough that three share an H100), then loss by position and the needle grid up to 16x their
# 2048-token training documents. Results and logs go to $RESULTS (default out/lengthgen).
#   bash eval/lengthgen.sh [wall rope fox]
set -uo pipefail
RESULTS=${RESULTS:-out/lengthgen}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
models=${*:-wall rope fox}
[ -f data/pystdlib/val.bin ] || python3 data/prepare.py > "$RESULTS/prepare.log" 2>&1 || { tail "$RESULTS/prepare.log"; exit 1; }
start=$(date +%s)
for a in $models; do
  (python3 train.py "config/lengthgen_$a.py" > "$RESULTS/train_$a.log" 2>&1
   echo "$a: exit $?, trained in $(( $(date +%s) - start )) s" >> "$RESULTS/times.txt") &
done
wait
cat "$RESULTS/times.txt"
for a in $models; do grep -E 'parameters|val loss' "$RESULTS/train_$a.log" | sed -n '1p;$p'; done
ckpts=$(for a in $models; do echo "out/lengthgen_$a/ckpt.pt"; done)
python3 eval/length.py --ckpt $ckpts --length 32768 --docs 16 --out "$RESULTS/length" > "$RESULTS/length.log" 2>&1 &
for a in $models; do
  python3 eval/niah.py --ckpt "out/lengthgen_$a/ckpt.pt" --lengths 1024,2048,4096,8192,16384,32768 \
    --depths 0,0.25,0.5,0.75,1 --trials 4 --out "$RESULTS/niah_$a" > "$RESULTS/niah_$a.log" 2>&1 &
done
wait
for log in "$RESULTS"/length.log "$RESULTS"/niah_*.log; do tail -1 "$log"; done
