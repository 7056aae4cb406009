#!/usr/bin/env bash
# benchmarks/multigpu_check.py for both trainers under DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 (the recipes'
# accelerate configs, 2 processes), after the one-process references on one GPU; prints one PASS/FAIL table.
#
#   bash benchmarks/multigpu_run.sh OUT_DIR            # on a machine with 2 GPUs
#   RULES=all,tip:0.5 CONFIGS="fsdp2" bash benchmarks/multigpu_run.sh /tmp/mg
#
# Each launch has its own time limit (LAUNCH_TIMEOUT seconds) so that one hang cannot take the whole run; the logs of
# every launch are kept in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/multigpu}
RULES=${RULES:-all,tip:0.5,q3_score:0.1}
CONFIGS=${CONFIGS:-"deepspeed_zero2 deepspeed_zero3 fsdp2"}
TRAINERS=${TRAINERS:-"gkd distillation"}
LAUNCH_TIMEOUT=${LAUNCH_TIMEOUT:-300}
mkdir -p "$OUT"
export TRL_EXPERIMENTAL_SILENCE=1 PYTHONUNBUFFERED=1

for trainer in $TRAINERS; do
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES=0 timeout "$LAUNCH_TIMEOUT" python3 benchmarks/multigpu_check.py --reference \
    --trainer "$trainer" --out "$OUT" --rules "$RULES" > "$OUT/reference_$trainer.log" 2>&1 \
    || { echo "reference $trainer FAILED:"; tail -20 "$OUT/reference_$trainer.log"; }
  echo "reference $trainer: $(( $(date +%s) - start )) s"
done

for config in $CONFIGS; do
  resume=""
  case "$config" in deepspeed_zero3|fsdp2) resume="--resume" ;; esac
  for trainer in $TRAINERS; do
    start=$(date +%s)
    log="$OUT/${config}_${trainer}.log"
    timeout "$LAUNCH_TIMEOUT" accelerate launch --config_file "recipes/accelerate/$config.yaml" --num_processes 2 \
      benchmarks/multigpu_check.py --trainer "$trainer" --out "$OUT" --label "$config" --rules "$RULES" $resume \
      > "$log" 2>&1
    status=$?
    echo "$config $trainer: exit $status, $(( $(date +%s) - start )) s"
    if ! grep -q "MULTIGPU CHECK" "$log"; then
      grep -E "Error|error" "$log" | grep -v Warning | tail -8
      tail -5 "$log"
    fi
  done
done

echo
echo "| config | trainer | rule | training | fixed-batch loss vs 1 process | gradient norm vs 1 process | peak GiB per GPU | resume | result |"
echo "|---|---|---|---|---|---|---|---|---|"
for config in $CONFIGS; do
  for trainer in $TRAINERS; do
    grep -E "^\| $config \| $trainer \|" "$OUT/${config}_${trainer}.log" || echo "| $config | $trainer | (no result: see ${config}_${trainer}.log) | | | | | | FAIL |"
  done
done
