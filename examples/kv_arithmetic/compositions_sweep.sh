#!/usr/bin/env bash
# Four compositions of the same two base models, trained at once on two GPUs: the paper's composition data
# (calm: KV-substitution) and the fallbacks (calm_replay, calm_kv_mix, calm_kv_mix_replay; run_all.py).
# The first pipeline trains m_A and m_B, then calm; the other three start from its base models once saved.
#   bash examples/kv_arithmetic/compositions_sweep.sh OUTDIR BUDGET_S N_KEYS [REREAD_LETTERS]   # runs/comp 400 300
# BUDGET_S is the first pipeline's (m_A 20%, m_B 55%, calm 25%); each other composition gets calm's share.
# KV_EXTRA is appended to every command (--smoke for a CPU check).
set -u
out=${1:-runs/comp}
budget=${2:-400}
keys=${3:-300}
letters=${4:-0}
mkdir -p "$out"
base=/tmp/kv_comp_base
common=(--base-steps 40000 --calm-steps 20000 --workers 6)
CUDA_VISIBLE_DEVICES=0 python3 -m examples.kv_arithmetic.run_all --out $base --budget-s "$budget" --n-keys "$keys" \
    --reread-letters "$letters" --shares m_A=0.2,m_B=0.55 --compositions calm "${common[@]}" --json "$out/calm.json" ${KV_EXTRA:-} \
    > "$out/calm.log" 2>&1 &
first=$!
while [ ! -f $base/m_B.safetensors ] && kill -0 $first 2>/dev/null; do sleep 2; done
sleep 2  # the file is written whole before run_all moves on; give the write a moment to land
share=$(python3 -c "print($budget * 0.25)")
pids=($first)
for job in 1:calm_replay 1:calm_kv_mix 0:calm_kv_mix_replay; do
    gpu=${job%%:*} name=${job#*:}
    CUDA_VISIBLE_DEVICES=$gpu python3 -m examples.kv_arithmetic.run_all --base $base --out "/tmp/kv_comp_$name" \
        --budget-s "$share" --compositions "$name" "${common[@]}" --json "$out/$name.json" ${KV_EXTRA:-} \
        > "$out/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
