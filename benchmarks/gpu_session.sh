#!/usr/bin/env bash
# One lent GPU session, as one command (device tool; budget ~10 minutes of GPU time):
#   1. CUDA paths: every method's debug preset trains on the GPU in bf16-mixed and in 16-mixed (GradScaler,
#      also under manual optimisation) -> gpu_check_<precision>.json (pass/fail; images/s there are not
#      comparable: the replicate runs share the GPU from step 3 on)
#   2. throughput alone on the GPU: the full digits presets of the teacher and DMD2, 32-true vs bf16-mixed
#   (profile: torch.profiler of the teacher and DMD2 digits presets, when STAGES names it)
#   3. DMD2 digits replicates: seeds x groups, concurrently, until a deadline; in-run FD every EVAL_EVERY
#      (500) iterations -> replicates_summary.json (benchmarks/fid_log_summary.py), exported best students.
#      A group is "preset", "batch<N>" (--data.batch_size N) or "nogan"/"batch<N>_nogan" (gan off), and may
#      carry its own seeds: RUN_GROUPS="batch256@2 batch512@0,1" (otherwise SEEDS applies).
#      RUN_CONFIG (a config path relative to the repository root), RUN_ARGS (more overrides for every run)
#      and METRIC run other presets the same way, e.g. the ADD second stage from a carried first stage:
#        RUN_CONFIG=configs/add/digits_stage2.yaml METRIC=fid/digits-feat/2step/n2000 EVAL_EVERY= \
#        RUN_ARGS="--model.init_args.init_from $PWD/runs/add_2step/checkpoints/last.ckpt"
# Run from the repository root with the project wheel and its missing dependencies in .whl/ (see
# benchmarks/results/gpu/README.md):  bash benchmarks/gpu_session.sh  (OUT=<dir> collects the results)
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"; mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-540}"   # seconds this script may take in all
ACCEL="${ACCEL:-gpu}"
STAGES="${STAGES:-throughput check replicates}"   # a later call may run fewer
RUN_GROUPS="${RUN_GROUPS:-preset batch256}"; SEEDS="${SEEDS:-}"   # SEEDS empty: chosen from the measured rate
EVAL_EVERY="${EVAL_EVERY-500}"   # empty: the config's own intervals
RUN_CONFIG="${RUN_CONFIG:-configs/dmd2/digits.yaml}"; RUN_ARGS="${RUN_ARGS:-}"; METRIC="${METRIC:-fid/digits-feat/1step/n2000}"
TP_STEPS="${TP_STEPS:-150}"; CHECK_STEPS="${CHECK_STEPS:-12}"   # smaller for a dry run on CPU
# CHECK_PRESETS (e.g. "add apt dmd2") / CHECK_PRECISIONS narrow stage 1 to some methods / precisions
T0=$(date +%s)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$REPO"/.whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
WORK="$(mktemp -d)"; cd "$WORK"   # not the repo root: its lightning_distill/ would shadow the installed package
RES="$WORK/results"; mkdir -p "$RES/logs"
python3 - <<'PY' 2>&1 | tee "$RES/device.txt"
import torch, lightning, diffusers
print("torch", torch.__version__, "| lightning", lightning.__version__, "| diffusers", diffusers.__version__)
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0), "| bf16:", torch.cuda.is_bf16_supported(), "| GPUs:", torch.cuda.device_count())
PY
elapsed() { echo $(( $(date +%s) - T0 )); }

# 2 first (alone on the GPU), then 1 alongside the replicates.
[[ " $STAGES " == *" throughput "* ]] && for prec in 32-true bf16-mixed; do
  timeout 120 python3 "$REPO/benchmarks/gpu_throughput.py" --accelerator "$ACCEL" --precision "$prec" --steps "$TP_STEPS" --warmup $(( TP_STEPS / 6 )) \
    --configs "$REPO/configs/dmd2/digits.yaml" "$REPO/configs/teacher/digits.yaml" \
    --out "$RES/digits_throughput_$prec.json" > "$RES/logs/throughput_$prec.log" 2>&1
  grep -E "images/s|Error" "$RES/logs/throughput_$prec.log"
done
echo "[$(elapsed) s] throughput done"

# Where an iteration's time goes on the GPU (torch.profiler), alone on the GPU.
[[ " $STAGES " == *" profile "* ]] && {
  timeout 150 python3 "$REPO/benchmarks/gpu_profile.py" --accelerator "$ACCEL" --precision 32-true \
    --configs "$REPO/configs/teacher/digits.yaml" "$REPO/configs/dmd2/digits.yaml" --out "$RES/profile_32-true.txt" \
    > "$RES/logs/profile.log" 2>&1
  grep -E "^== " "$RES/logs/profile.log"; echo "[$(elapsed) s] profile done"; }

# 3. replicates: how many at once depends on the single-run rate just measured.
RATE=$(python3 -c "import json; print(json.load(open('$RES/digits_throughput_32-true.json'))['presets']['$REPO/configs/dmd2/digits.yaml'].get('batches_per_s', 0))" 2>/dev/null || echo 0)
LEFT=$(( BUDGET_S - $(elapsed) - 75 ))   # keep time to export, pack and return
[ "$LEFT" -lt 60 ] && LEFT=60
[[ " $STAGES " == *" replicates "* ]] || RUN_GROUPS=""
[ -z "$SEEDS" ] && SEEDS=$(python3 -c "r = float('$RATE'); print(' '.join(map(str, range(4 if r >= 45 else 3 if r >= 30 else 2 if r >= 15 else 1))))")
echo "[$(elapsed) s] DMD2 single-run rate $RATE it/s -> seeds '$SEEDS' per group, $LEFT s each"
MAXT=$(printf "00:00:%02d:%02d" $(( LEFT / 60 )) $(( LEFT % 60 )))
pids=(); names=()
# the preset with FD evaluations and best-checkpoint candidates every EVAL_EVERY iterations
cp "$REPO/$RUN_CONFIG" "$WORK/run_config.yaml"
[ -n "$EVAL_EVERY" ] && sed -i -E "s/(every_n_train_steps|every_n_steps): [0-9]+\b/\1: $EVAL_EVERY/" "$WORK/run_config.yaml"
for spec in $RUN_GROUPS; do
  group="${spec%%@*}"; seeds="$SEEDS"; [[ "$spec" == *@* ]] && seeds="${spec#*@}" && seeds="${seeds//,/ }"
  extra=()
  [[ "$group" =~ ^batch([0-9]+) ]] && extra+=(--data.batch_size "${BASH_REMATCH[1]}")
  [[ "$group" == *nogan ]] && extra+=(--model.init_args.gan false)
  for seed in $seeds; do
    name="${group}_seed$seed"; names+=("$name")
    OMP_NUM_THREADS=1 python3 -m lightning_distill fit --config "$WORK/run_config.yaml" $RUN_ARGS \
      --seed_everything "$seed" --model.init_args.seed "$seed" --trainer.default_root_dir "$WORK/runs/$name" --trainer.accelerator "$ACCEL" \
      --trainer.max_time "$MAXT" --trainer.enable_progress_bar false "${extra[@]}" > "$RES/logs/$name.log" 2>&1 &
    pids+=($!)
  done
done
# 1. CUDA paths of every method, alongside.
[[ " $STAGES " == *" check "* ]] && for prec in ${CHECK_PRECISIONS:-bf16-mixed 16-mixed}; do
  timeout 200 python3 "$REPO/benchmarks/gpu_throughput.py" --accelerator "$ACCEL" --precision "$prec" --steps "$CHECK_STEPS" --warmup 2 \
    ${CHECK_PRESETS:+--presets $CHECK_PRESETS} \
    --out "$RES/gpu_check_$prec.json" > "$RES/logs/gpu_check_$prec.log" 2>&1
  echo "[$(elapsed) s] CUDA paths, $prec:"; grep -E "images/s|Error|error" "$RES/logs/gpu_check_$prec.log" | grep -v "^ " | head -20
done
wait "${pids[@]}"
echo "[$(elapsed) s] replicates done"
python3 "$REPO/benchmarks/fid_log_summary.py" "$RES"/logs/*_seed*.log --metric "$METRIC" \
  --out "$RES/replicates_summary.json"
for f in "$RES"/logs/*_seed*.log; do
  echo "== $(basename "$f")"; grep -E "FIDCallback step|max_time|Error|rror:" "$f" | tail -14
done
cp "$RES/replicates_summary.json" "$OUT/" 2>/dev/null
tar czf "$OUT/results.tgz" -C "$WORK" results
for name in "${names[@]}"; do   # one run per archive: each file that comes back is capped at 16 MiB
  [ -d "$WORK/runs/$name/student" ] && tar czf "$OUT/student_$name.tgz" -C "$WORK/runs" "$name/student"
done
ls -la "$OUT"; echo "[$(elapsed) s] end"
