#!/usr/bin/env bash
# How far the composition generalises as the number of keys grows: four full pipelines (base models,
# composition, table) at once on two GPUs, two per GPU; each writes <name>.json and <name>.log to OUTDIR.
#   bash examples/kv_arithmetic/keys_sweep.sh OUTDIR BUDGET_S      # e.g. runs/keys 440 (about 8 minutes)
# All use seed 0, so the 1000-key runs share their keys, values, composition keys and held-out expressions.
# KV_EXTRA is appended to every command (--smoke for a CPU check); PYTHON picks the interpreter.
set -u
out=${1:-runs/keys}
budget=${2:-440}
mkdir -p "$out"
run() {
    local gpu=$1 name=$2
    shift 2
    CUDA_VISIBLE_DEVICES=$gpu "${PYTHON:-python3}" -m examples.kv_arithmetic.run_all --out "/tmp/kv_$name" --budget-s "$budget" \
        --base-steps 40000 --calm-steps 20000 --workers 6 --shares m_A=0.3,m_B=0.4 --compositions calm \
        --json "$out/$name.json" "$@" ${KV_EXTRA:-} > "$out/$name.log" 2>&1 &
}
run 0 scratchpad_1000keys_every1 --n-keys 1000
run 0 scratchpad_1000keys_last --n-keys 1000 --layers last
run 1 direct_1000keys_every1 --n-keys 1000 --protocol direct
run 1 scratchpad_300keys_every1 --n-keys 300
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status
