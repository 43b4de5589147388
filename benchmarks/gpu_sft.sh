#!/usr/bin/env bash
# Every GPU measurement of SFT speed and memory (issue 16) in one run, so that all figures come from
# the same card and session. Results (tables, JSON, PNG) go to $OUT (default benchmarks/results).
#
#   bash benchmarks/gpu_sft.sh                 # on a GPU: Llama-2-7B and Llama-3.1-8B shapes
#   SIZE=tiny bash benchmarks/gpu_sft.sh       # the same commands on the tiny shape (a CPU check)
#
# Order: cheapest first, so a run cut short by its time limit still leaves the main comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
SIZE=${SIZE:-full}
mkdir -p "$OUT"
if [ "$SIZE" = tiny ]; then
  M7=tiny; M8=tiny; SEQ=256; SWEEP="--seq 256 --sweep-max 1024 --budget-gib 100 --sweep-step 256"; ATT="--seqs 256 1024"
else
  M7=llama2-7b; M8=llama3-8b; SEQ=2048; SWEEP="--seq 16384 --sweep-max 131072 --budget-gib 24 --sweep-step 4096"
  ATT="--seqs 2048 8192 32768 --tokens 32768 --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16"
fi
run() { echo "+ $*"; python "$@" --out "$OUT"; }

# 1. packed QLoRA step, compiled layers, against transformers+peft on the same packed blocks (goal: >= 2x tokens/s, <= 0.8x peak)
run benchmarks/memory.py --model $M7 --mode qlora --seq $SEQ --batch 1 --gc --packed --compile --compare-hf
# 2. the same unpacked (goal: packed >= 0.98x unpacked) and eager packed (what compilation adds)
run benchmarks/memory.py --model $M7 --mode qlora --seq $SEQ --batch 1 --gc --compile --name "unpacked_${M7}_compile"
run benchmarks/memory.py --model $M7 --mode qlora --seq $SEQ --batch 1 --gc --packed --name "packed_${M7}_eager"
# 3. batch 4 (goal: MFU >= 50%)
run benchmarks/memory.py --model $M7 --mode qlora --seq $SEQ --batch 4 --gc --packed --compile
# 4. packed attention paths at long sequences (flex, per-document SDPA, dense mask vs causal)
run benchmarks/attention.py $ATT
# 5. the longest sequence under 24 GiB, Llama-3.1-8B shape, QLoRA, checkpointing + CPU offload (goal: >= 80k)
run benchmarks/memory.py --model $M8 --mode qlora --batch 1 --gc --offload --compile --seq-sweep $SWEEP
