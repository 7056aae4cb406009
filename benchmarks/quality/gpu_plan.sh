#!/usr/bin/env bash
# The GPU calls of the issue-16 quality study (benchmarks/quality/study.py), each about 9 minutes, each resumable.
#
#   bash benchmarks/quality/gpu_plan.sh STAGE IN OUT
#
# STAGE: call1 | call2 | call3 | addition (optional, if device time is left). IN: the folder that holds what the
# earlier calls wrote (carry it back in an ignored path, e.g. runs/q2: archive/, sweep/, main1/, ...). OUT: where this
# call writes (the device's $OUT). Every stage stops starting runs when its BUDGET (seconds, default 500) would be
# exceeded; runs it could not start are listed as skipped in its quality.json and run by the next call (--done).
# Files written to OUT (at most 8 come back): call1 4 (archive/quality_models.tar, archive/bounds.json,
# sweep/quality.json, main1/quality.json), call2 1, call3 3, addition 2.
# PREPARE_EXTRA and RUN_EXTRA (words) are appended to every prepare and run command (a later option wins): for a dry
# run on a CPU, e.g. RUN_EXTRA="--cpu --steps 2 --batch 2 --n_test 4 --eval_k 0 --seeds 0".
set -uo pipefail

stage=${1:?stage: call1, call2, call3 or addition}
in=${2:?IN folder (what earlier calls wrote)}
out=${3:?OUT folder}
budget=${BUDGET:-500}
jobs=${JOBS:-16}
py=${PYTHON:-python}
export TRL_TIP_COMPILE=${TRL_TIP_COMPILE:-0} TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
study=benchmarks/quality/study.py
end=$(($(date +%s) + budget))
left() { echo $((end - $(date +%s))); }
mkdir -p "$out"

# The main setting: the paper's loss (reverse KL, beta=1), lmbda=1, temperature 1, cosine; 128 rollouts per step.
common=(--steps 30 --batch 128 --logging_steps 5 --schedule cosine --n_test 500 --eval_k 16 --jobs "$jobs"
  --json_only --print_every 16)
seeds=(0 1 2 3 4 5 6 7 8 9)
beta05_rules=("TIP all" "entropy 0.5" "Soft-OR 0.5" "Q3 score 0.1" "random 0.1")
diagnostic_rules=("quadrants Q3 + random 0.1" "Q3 score 0.1 + random 0.1" "ssToken (paper) + random 0.1")

run() {  # run OUTDIR SECONDS ARGS...: one study.py run with a time budget (skipped when no time is left)
  local dir=$1 secs=$2
  shift 2
  if ((secs < 60)); then
    echo "== skip $dir: ${secs}s left"
    return 0
  fi
  echo "== $dir (budget ${secs}s)"
  # shellcheck disable=SC2086
  "$py" "$study" run --out "$dir" --time_budget "$secs" "${common[@]}" "$@" ${RUN_EXTRA:-} ||
    echo "== $dir exited with $?"
}

case "$stage" in
  call1)
    archive="$out/archive/quality_models.tar"
    echo "== prepare"
    # shellcheck disable=SC2086
    "$py" "$study" prepare --out "$out/archive" --tasks words addition --jobs 4 --max_seconds 210 ${PREPARE_EXTRA:-} ||
      { echo "== prepare failed"; exit 1; }
    # The all-token learning-rate sweep, on its own seeds (100, 101), for both students and both betas.
    run "$out/sweep" $(($(left) - 60)) --archive "$archive" --tasks words --rules "TIP all" \
      --lrs 3e-5 1e-4 3e-4 1e-3 --betas 1 0.5 --seeds 100 101
    run "$out/main1" "$(left)" --archive "$archive" --tasks words --lr_from "$out/sweep" --betas 1 \
      --seeds "${seeds[@]}" --require_all_rules
    ;;
  call2)
    sweep="$in/sweep"
    if [[ ! -f $sweep/quality.json ]]; then # call1 ran out of time before the sweep
      sweep="$out/sweep"
      run "$sweep" $(($(left) - 60)) --archive "$in/archive/quality_models.tar" --tasks words --rules "TIP all" \
        --lrs 3e-5 1e-4 3e-4 1e-3 --betas 1 0.5 --seeds 100 101
    fi
    run "$out/main2" "$(left)" --archive "$in/archive/quality_models.tar" --tasks words --lr_from "$sweep" \
      --betas 1 --seeds "${seeds[@]}" --require_all_rules --done "$in/main1"
    ;;
  call3)
    archive="$in/archive/quality_models.tar"
    run "$out/main3" $(($(left) - 230)) --archive "$archive" --tasks words --lr_from "$in/sweep" --betas 1 \
      --seeds "${seeds[@]}" --require_all_rules --done "$in/main1" "$in/main2"
    run "$out/beta05" $(($(left) - 80)) --archive "$archive" --tasks words --lr_from "$in/sweep" --betas 0.5 \
      --seeds 0 1 2 3 --rules "${beta05_rules[@]}"
    run "$out/diagnostics" "$(left)" --archive "$archive" --tasks words --lr_from "$in/sweep" --betas 1 \
      --seeds 0 1 2 3 4 --rules "${diagnostic_rules[@]}"
    ;;
  addition)
    archive="$in/archive/quality_models.tar"
    run "$out/addition_sweep" $(($(left) * 2 / 5)) --archive "$archive" --tasks addition --rules "TIP all" \
      --lrs 3e-5 1e-4 3e-4 1e-3 --betas 1 --seeds 100 101
    run "$out/addition" "$(left)" --archive "$archive" --tasks addition --lr_from "$out/addition_sweep" --betas 1 \
      --seeds 0 1 2 3 4 --rules "TIP all" "entropy 0.5" "Soft-OR 0.5" "Soft-OR 0.2" "Q3 score 0.1" \
      "Q3 score 0.2" "random 0.1" "Soft-OR bottom 0.5" "quadrants Q3"
    ;;
  *)
    echo "unknown stage $stage (call1, call2, call3, addition)"
    exit 2
    ;;
esac
echo "== $stage done in $((budget - $(left)))s"
