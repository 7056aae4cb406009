#!/usr/bin/env bash
# One GPU session of the loss-step benchmarks (issue 23), in about 540 s on one H100 80GB:
#
#   (a) the loss step at 4x2048, default rows (Qwen2.5-0.5B student, 1.5B teacher, full fine-tuning):
#       python benchmarks/memory_speed.py --shapes 4x2048 --json OUT/loss_4x2048.json
#       expected ~1.5 min (12 rows x 7 steps of ~0.3 s, first-step warm-ups, start-up);
#   (b) the TIP paper's pair at its scale, 4x4096 bf16: Qwen3-4B-shaped student with a rank-64 LoRA adapter,
#       Qwen3-8B-shaped teacher; DistillationTrainer, then all / entropy sampling 50% / Soft-OR 50% and 20% with
#       TIPTrainer and TIPDistillationTrainer, then GKDTrainer last (the full-logit reference; it may run out of
#       memory, which the harness records as a row and which can no longer disturb the rows before it);
#       expected ~3 min (10 rows x 3 steps of ~2 s, 8 GB of student weights restored per row, start-up).
#
# Usage: benchmarks/gpu_session.sh OUT   (from anywhere; PYTHON=... to pick the interpreter, default `python`;
# BENCH_ARGS=... is appended to both steps' arguments, e.g. a CPU dry run of the script itself:
# BENCH_ARGS="--tiny --device cpu --shapes 2x64 --steps 1 --warmup 1" benchmarks/gpu_session.sh /tmp/dry).
# Writes at most 6 files under OUT: env.txt, loss_4x2048.{json,log}, paper_4x4096_lora64.{json,log}, summary.md.
# Every step runs under `timeout` (the paper rows get what is left of the budget), so one hang cannot eat the rest;
# the harness writes its JSON after every row, so a step cut short still leaves the rows it finished.
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_session.sh OUT}
BUDGET_S=${BUDGET_S:-530}
PYTHON=${PYTHON:-python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1
SECONDS=0

PAPER_RULES="dist,all,entropy_sample:0.5,tip:0.5,tip:0.2,dist/all,dist/entropy_sample:0.5,dist/tip:0.5,dist/tip:0.2,gkd"

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    git -C "$ROOT" log -1 --format='commit %H %s' 2>&1
    "$PYTHON" -c 'import torch, transformers, trl, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "trl", trl.__version__, "peft", peft.__version__)' 2>&1
} >"$OUT/env.txt"
cat "$OUT/env.txt"

run_step() {  # run_step NAME LIMIT_S ARGS...: one benchmark under `timeout`, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, at ${SECONDS} s): memory_speed.py $* ${BENCH_ARGS:-}"
    local start=$SECONDS
    # shellcheck disable=SC2086  # BENCH_ARGS: words on purpose
    timeout -k 10 "$limit" "$PYTHON" benchmarks/memory_speed.py "$@" ${BENCH_ARGS:-} --json "$OUT/$name.json" \
        >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (timed out)')"
    tail -n 3 "$OUT/$name.log"
}

# (a) The default loss-step rows at 4x2048.
run_step loss_4x2048 180 --shapes 4x2048

# (b) The paper's pair, with what is left of the budget (at least 60 s).
left=$((BUDGET_S - SECONDS - 15))
run_step paper_4x4096_lora64 $((left > 60 ? left : 60)) \
    --student qwen3-4b --teacher qwen3-8b --lora 64 --shapes 4x4096 --rules "$PAPER_RULES" --steps 2 --warmup 1

# Summary: peak memory and step time of every row against DistillationTrainer's, per file.
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, math, os, sys

out = sys.argv[1]
for name in ("loss_4x2048", "paper_4x4096_lora64"):
    path = os.path.join(out, f"{name}.json")
    if not os.path.exists(path):
        print(f"## {name}: no JSON (the step failed before its first row; see {name}.log)\n")
        continue
    data = json.load(open(path))
    rows = data["results"]
    ref = next((r for r in rows if r["trainer"] == "dist" and r["status"] == "ok"), None)
    print(f"## {name}\n\n{data['header']}\n")
    print("| trainer / rule | status | kept | peak GiB | × Dist | step s | × Dist | trainable params |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        def x(key):
            a, b = r.get(key), ref.get(key) if ref else None
            ok = a is not None and b and not (math.isnan(a) or math.isnan(b))
            return f"{a / b:.2f}" if ok else "—"
        num = lambda v, f: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)
        print(f"| {r['rule']} | {r['status']} | {num(r['kept_frac'], '.2f')} | {num(r['peak_gib'], '.2f')} | "
              f"{x('peak_gib')} | {num(r['step_s'], '.3f')} | {x('step_s')} | {r.get('trainable_params', 0):,} |")
    print()
EOF
echo "== done in ${SECONDS} s; files:"
ls -la "$OUT"
