#!/usr/bin/env bash
# Several compositions of the same two base models, trained at once on two GPUs.
#   bash examples/kv_arithmetic/compositions_sweep.sh OUTDIR BUDGET_S N_KEYS [REREAD_LETTERS [JOBS]]
# JOBS: comma-separated NAME/POSITIONS, NAME a row of run_all.py (calm: the paper's composition data; calm_replay,
# calm_kv_mix, calm_kv_mix_replay: the fallbacks), POSITIONS the cross-attention's (none | rotary); default
# the fourth attempt's: calm/none,calm_replay/none,calm_kv_mix/none,calm_kv_mix_replay/none.
# The first job's pipeline trains m_A and m_B, then its composition, on GPU 0; the other jobs start from those
# base models once saved, on GPUs 1, 0, 1, ... Each writes NAME.json and NAME.log to OUTDIR, with
# _rotary appended to NAME where POSITIONS is rotary.
# BUDGET_S is the first pipeline's (m_A 20%, m_B 55%, its composition 25%); each other job gets that 25%.
# KV_EXTRA is appended to every command (tests/test_kv_arithmetic.py passes --smoke); PYTHON, KV_BASE (where the
# base models go; /tmp/kv_comp_base) can be set.
set -u
out=${1:-runs/comp}
budget=${2:-400}
keys=${3:-300}
letters=${4:-0}
jobs=${5:-calm/none,calm_replay/none,calm_kv_mix/none,calm_kv_mix_replay/none}
mkdir -p "$out"
base=${KV_BASE:-/tmp/kv_comp_base}
common=(--base-steps 40000 --calm-steps 20000 --workers 6)
tag() { [ "${1#*/}" = rotary ] && echo "${1%/*}_rotary" || echo "${1%/*}"; }

IFS=, read -ra job_list <<< "$jobs"
first_job=${job_list[0]}
first_tag=$(tag "$first_job")
CUDA_VISIBLE_DEVICES=0 "${PYTHON:-python3}" -m examples.kv_arithmetic.run_all --out "$base" --budget-s "$budget" --n-keys "$keys" \
    --reread-letters "$letters" --shares m_A=0.2,m_B=0.55 --compositions "${first_job%/*}" \
    --positions "${first_job#*/}" "${common[@]}" --json "$out/$first_tag.json" ${KV_EXTRA:-} \
    > "$out/$first_tag.log" 2>&1 &
first=$!
while [ ! -f "$base/m_B.safetensors" ] && kill -0 $first 2>/dev/null; do sleep 2; done
sleep 2  # the file is written whole before run_all moves on; give the write a moment to land
share=$("${PYTHON:-python3}" -c "print($budget * 0.25)")
pids=($first)
for i in "${!job_list[@]}"; do
    [ "$i" -eq 0 ] && continue
    job=${job_list[$i]} name=$(tag "${job_list[$i]}")
    CUDA_VISIBLE_DEVICES=$((i % 2)) "${PYTHON:-python3}" -m examples.kv_arithmetic.run_all --base "$base" --out "/tmp/kv_comp_$name" \
        --budget-s "$share" --compositions "${job%/*}" --positions "${job#*/}" "${common[@]}" \
        --json "$out/$name.json" ${KV_EXTRA:-} > "$out/$name.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
