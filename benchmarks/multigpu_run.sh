#!/usr/bin/env bash
# benchmarks/multigpu_check.py for both trainers under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (the recipes' accelerate
# configs) with NPROC processes (default 2), after the one-process references on one GPU; prints one PASS/FAIL table.
#
#   bash benchmarks/multigpu_run.sh OUT_DIR            # 2 processes, on a machine with 2 GPUs
#   bash benchmarks/multigpu_run.sh OUT_DIR 1          # world size 1 on one GPU: still DeepSpeed's engine (ZeRO-3
#                                                      # partitioning and gathering hooks, its checkpoint format) and
#                                                      # FSDP2's fully_shard / DTensor paths
#   RULES=all,tip:0.5 CONFIGS="fsdp2" bash benchmarks/multigpu_run.sh /tmp/mg
#
# Each config is one launch running both trainers (TRAINERS), with its own time limit (LAUNCH_TIMEOUT seconds) so
# that one hang cannot take the whole run; the logs of every launch are kept in OUT_DIR. Every launch also checks that
# TIPTrainer's fast_generation=True is refused under FSDP and ZeRO-3 and accepted elsewhere (docs/generation.md);
# FAST_GENERATION_STEPS (default 2) compiled-generation steps are trained where it is accepted.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/multigpu}
NPROC=${2:-2}
RULES=${RULES:-all,tip:0.5,q3_score:0.1}
CONFIGS=${CONFIGS:-"deepspeed_zero2 deepspeed_zero3 fsdp2"}
TRAINERS=${TRAINERS:-"gkd distillation"}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-300}
FAST_GENERATION_STEPS=${FAST_GENERATION_STEPS:-2}
case "$NPROC" in 1|2|4|8) ;; *) echo "NPROC must be 1, 2, 4 or 8 (the check splits 8 rows evenly), got $NPROC"; exit 2 ;; esac
mkdir -p "$OUT"
export TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1
trainers=${TRAINERS// /,}

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout "$LAUNCH_TIMEOUT" python3 benchmarks/multigpu_check.py --reference \
  --trainer "$trainers" --out "$OUT" --rules "$RULES" > "$OUT/reference.log" 2>&1 \
  || { echo "reference FAILED:"; tail -20 "$OUT/reference.log"; }
echo "reference ($trainers, 1 process): $(( $(date +%s) - start )) s"

for config in $CONFIGS; do
  resume=""
  case "$config" in deepspeed_zero3|fsdp2) resume="--resume" ;; esac
  start=$(date +%s)
  log="$OUT/$config.log"
  timeout "$LAUNCH_TIMEOUT" accelerate launch --config_file "recipes/accelerate/$config.yaml" \
    --num_processes "$NPROC" benchmarks/multigpu_check.py --trainer "$trainers" --out "$OUT" --label "$config" \
    --rules "$RULES" $resume --fast-generation --fast-generation-steps "$FAST_GENERATION_STEPS" > "$log" 2>&1
  status=$?
  echo "$config ($NPROC processes): exit $status, $(( $(date +%s) - start )) s"
  if ! grep -q "MULTIGPU CHECK" "$log"; then
    grep -E "Error|error" "$log" | grep -v Warning | tail -8
    tail -5 "$log"
  fi
done

echo
echo "| config | processes | trainer | rule | training | fixed-batch loss vs 1 process | gradient norm vs 1 process | peak GiB per GPU (resident before the row) | resume | result |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for config in $CONFIGS; do
  grep -E "^\| $config \|" "$OUT/$config.log" \
    || echo "| $config | $NPROC | (no result: see $config.log) | | | | | | | FAIL |"
done
