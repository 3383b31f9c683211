#!/usr/bin/env bash
# Several compositions of the same two base models, trained at once on two GPUs.
#   bash examples/kv_arithmetic/compositions_sweep.sh OUTDIR BUDGET_S N_KEYS [REREAD_LETTERS [JOBS]]
# JOBS: comma-separated TAG:ROW [ARGS], ROW a row of run_all.py (calm: the paper's composition data; calm_replay:
# that and the anchor's own tasks; calm_kv_mix, calm_kv_mix_replay: the fallbacks) and ARGS more run_all.py options
# for its composition (--layers, --positions, --window, --null-kv, --compose-no-eos); default the fourth attempt's
# four rows, tagged by their row names.
# The first job's pipeline trains m_A and m_B, then its composition, on GPU 0; the other jobs start from those
# base models once saved, on GPUs 1, 0, 1, ... Each writes TAG.json and TAG.log to OUTDIR.
# BUDGET_S is the first pipeline's (m_A 20%, m_B 55%, its composition 25%); each other job gets that 25%.
# BASE_ARGS go to the first pipeline only (the base models' options, e.g. --augment-markers '>=');
# KV_EXTRA to every command (tests/test_kv_arithmetic.py passes --smoke); PYTHON picks the interpreter,
# KV_BASE where the base models go (/tmp/kv_comp_base).
set -u
out=${1:-runs/comp}
budget=${2:-400}
keys=${3:-300}
letters=${4:-0}
jobs=${5:-calm:calm,calm_replay:calm_replay,calm_kv_mix:calm_kv_mix,calm_kv_mix_replay:calm_kv_mix_replay}
python=${PYTHON:-python3}
base=${KV_BASE:-/tmp/kv_comp_base}
common=(--base-steps 40000 --calm-steps 20000 --workers 6)
mkdir -p "$out"

IFS=, read -ra job_list <<< "$jobs"
run_job() {  # GPU, job, more run_all options
    local gpu=$1 tag=${2%%:*} spec=${2#*:}
    shift 2
    read -ra row_args <<< "$spec"
    CUDA_VISIBLE_DEVICES=$gpu "$python" -m examples.kv_arithmetic.run_all "$@" --compositions "${row_args[@]}" \
        "${common[@]}" --json "$out/$tag.json" ${KV_EXTRA:-} > "$out/$tag.log" 2>&1 &
}
# shellcheck disable=SC2086  # BASE_ARGS is a list of options
run_job 0 "${job_list[0]}" --out "$base" --budget-s "$budget" --n-keys "$keys" --reread-letters "$letters" \
    --shares m_A=0.2,m_B=0.55 ${BASE_ARGS:-}
first=$!
while [ ! -f "$base/m_B.safetensors" ] && kill -0 $first 2>/dev/null; do sleep 2; done
sleep 2  # the file is written whole before run_all moves on; give the write a moment to land
share=$("$python" -c "print($budget * 0.25)")
pids=($first)
for i in "${!job_list[@]}"; do
    [ "$i" -eq 0 ] && continue
    tag=${job_list[$i]%%:*}
    run_job $((i % 2)) "${job_list[$i]}" --base "$base" --out "/tmp/kv_comp_$tag" --budget-s "$share"
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
