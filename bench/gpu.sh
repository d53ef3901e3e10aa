#!/usr/bin/env bash
# GPU baseline for harvest's engine and pipeline; finishes inside --budget seconds (default 420).
#
#   bench/gpu.sh                 # H200: random 0.5b/1.5b shapes, bf16; prefill (lanes x chunk sweep),
#                                # decode (decode_slots sweep), whole pipeline, compiles
#   JAX_PLATFORMS=cpu bench/gpu.sh --quick   # smoke test on a CPU: tiny preset, tiny batches
#
# Needs harvest importable (repo root on PYTHONPATH, or installed) and its dependencies. Writes
# under $OUT (default /tmp/harvest-gpu-bench): gpu_report.txt (everything printed on stdout),
# gpu_stderr.txt, results.jsonl (every number as JSON), run/summary.json and run/run.json (the
# pipeline run's shards are deleted afterwards).
set -u
cd "$(dirname "$0")/.."
QUICK=""
BUDGET=420
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=--quick ;;
    --budget) BUDGET="$2"; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-/tmp/harvest-gpu-bench}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_report.txt"
ERRLOG="$OUT/gpu_stderr.txt"
RES="$OUT/results.jsonl"
RUN="$OUT/run"
rm -rf "$REPORT" "$ERRLOG" "$RES" "$RUN"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
left() { echo $((DEADLINE - $(date +%s))); }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.1f", b-a}'; }

body() {
  echo "harvest GPU baseline  $(date -u +%Y-%m-%dT%H:%M:%SZ)  budget ${BUDGET}s ${QUICK}"
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?')$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo +dirty)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  "$PY" -c 'import sys, jax, numpy, zarr; print(f"python {sys.version.split()[0]}, jax {jax.__version__} ({jax.default_backend()}: {jax.devices()[0].device_kind}), numpy {numpy.__version__}, zarr {zarr.__version__}")'
  if [ -n "$QUICK" ]; then
    MODELS=(tiny small); PIPE_MODEL=random:tiny; LIMIT=2; NEW=8; BATCH=2; SLOTS=4; CHUNK=256
    HOOKS="[blocks.1.hook_resid_post,blocks.2.hook_resid_post,blocks.3.hook_resid_post]"; EXTRA=(--set data.max_prompt_tokens=2048)
  else
    MODELS=(0.5b 1.5b); PIPE_MODEL=random:0.5b; LIMIT=32; NEW=256; BATCH=16; SLOTS=64; CHUNK=512
    HOOKS="[blocks.6.hook_resid_post,blocks.12.hook_resid_post,blocks.18.hook_resid_post]"
    EXTRA=(--set runtime.max_capture_gb=32)  # 64 slots of up-to-4096-token prompts pass 8 GB; an H200 has 141
  fi

  echo
  t=$(now)
  D=$((START + BUDGET * 2 / 5))  # the 0.5b part: about 40% of the budget
  timeout --kill-after=10 $((D - $(date +%s) + 40)) \
    "$PY" bench/gpu_harvest.py micro --model "${MODELS[0]}" --results "$RES" --deadline $D $QUICK \
    || echo "micro ${MODELS[0]} exited with $?"
  echo "  (process $(since "$t") s)"

  echo
  echo "== pipeline: python -m harvest.run configs/demo.yaml (model $PIPE_MODEL bf16, $LIMIT tasks, $NEW new tokens fixed, prefill $BATCH lanes x $CHUNK, $SLOTS decode slots)"
  T=$(( $(left) - 40 )); [ $T -gt 300 ] && T=300
  if [ $T -lt 30 ]; then
    echo "  skipped: $(left) s left"
  else
    t=$(now)
    timeout --signal=TERM --kill-after=15 "$T" "$PY" bench/gpu_harvest.py pipeline --results "$RES" -- configs/demo.yaml \
      --set model.path=$PIPE_MODEL --set model.dtype=bfloat16 --set data.limit=$LIMIT \
      --set generation.max_new_tokens=$NEW --set generation.fixed_length=true --set runtime.batch_size=$BATCH \
      --set runtime.decode_slots=$SLOTS --set runtime.prefill_chunk=$CHUNK \
      --set "capture.hooks=$HOOKS" --set output.path="$RUN" --set runtime.compile_cache=null \
      --set runtime.progress=false "${EXTRA[@]}"
    rc=$?
    wall=$(since "$t")
    echo "  exit $rc; whole process ${wall} s (timeout ${T} s)"
    "$PY" bench/gpu_harvest.py pipeline-report --results "$RES" --run-dir "$RUN" --wall "$wall"
    if [ -d "$RUN" ]; then  # keep only the small JSON files
      for p in "$RUN"/* "$RUN"/.[!.]*; do
        [ -e "$p" ] || continue
        case "$(basename "$p")" in summary.json|run.json) ;; *) rm -rf "$p" ;; esac
      done
      [ -f "$RUN/run.json" ] && [ "$(stat -c %s "$RUN/run.json")" -gt 4000000 ] && rm -f "$RUN/run.json"
    fi
  fi

  echo
  t=$(now)
  timeout --kill-after=10 $(( $(left) + 5 )) \
    "$PY" bench/gpu_harvest.py micro --model "${MODELS[1]}" --results "$RES" --deadline $((DEADLINE - 20)) $QUICK \
    || echo "micro ${MODELS[1]} exited with $?"
  echo "  (process $(since "$t") s)"

  echo
  "$PY" bench/gpu_harvest.py report --results "$RES"
  echo "  total $(( $(date +%s) - START )) s of budget ${BUDGET} s"
}

body 2> >(tee -a "$ERRLOG" >&2) | tee "$REPORT"
sleep 0.3
ls -la "$OUT" "$RUN" 2>/dev/null
